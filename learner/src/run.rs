//! A run, from its configuration to its end: [`serve`] loads it, runs it
//! (the gRPC server, the credit controller, the batcher and trainer
//! threads, local actors, the live progress line), and closes it (drains
//! the sessions, writes the summary).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use flgfn_common::auth;
use flgfn_common::config::{BatchGrowth, Config, LearnerConfig};
use flgfn_common::env::Environment;
use flgfn_common::objectives;
use flgfn_common::policy::{ModelSpec, Policy, select_device, set_threads};
use flgfn_common::signals::StopRequest;
use flgfn_common::tasks;
use flgfn_common::wire;
use flgfn_common::wire::proto::learner_server::LearnerServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::batcher::Batcher;
use crate::credits::{Controller, CreditPool};
use crate::error::LearnerError;
use crate::ingest::IngestStats;
use crate::launcher::LocalActors;
use crate::preflight::{check_exposure, check_local_actors_fit, check_run_fits};
use crate::publisher::Publisher;
use crate::report::MetricsFile;
use crate::service::{LearnerService, LearnerState};
use crate::session::IngestPool;
use crate::trainer::{EndedBy, Trainer, TrainingOutcome};
use crate::transport::{
    HEALTH_REQUEST_BYTES, accepted_handshake_bytes, accepted_message_bytes, secured_transport,
    token_check,
};
use crate::{
    BUILD, BUILD_METADATA_KEY, RunOptions, checkpoint, connections, launcher, report, resume,
};

/// Resolves, with why, when every local actor has exited before training
/// finished (checked twice a second); never without local actors.
async fn every_local_actor_exited(
    actors: Option<&LocalActors>,
    training_done: watch::Receiver<bool>,
) -> String {
    let Some(actors) = actors else {
        return std::future::pending().await;
    };
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticks.tick().await;
        let (exited, all) = actors.exits();
        // Actors leave by themselves once told training is done (read
        // after their exits: they exit only after it turned true), and
        // that is no news.
        if *training_done.borrow() {
            return std::future::pending().await;
        }
        actors.log_exits_while_training(&exited);
        if all {
            let failed = exited
                .iter()
                .filter(|(_, status)| !status.success())
                .count();
            return format!(
                "every local actor exited before training finished ({failed} with an error: see their lines in the learner's log)"
            );
        }
    }
}

/// How long open connections get to finish once training is over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the drain goes on before the learner says what it waits for.
const DRAIN_NOTICE_AFTER: Duration = Duration::from_millis(500);

/// Runs a learner on `listener` until training ends (`learner.max_steps`)
/// or `shutdown` resolves, and returns what training produced.
///
/// What `shutdown` resolves to says what the actors are told: a
/// [`StopRequest::Restart`] has them reconnect, to wait for this learner
/// started again on its checkpoint; `()` or [`StopRequest::EndRun`] ends
/// their run.
///
/// In phases: the server answers at once (probes see the learner
/// loading); the model and the checkpoint are loaded; the sessions'
/// state, the local actors, the batch builder and the trainer start;
/// training runs until it ends or a stop comes; then the connections
/// drain and the run's accounts close.
///
/// A run with local actors of which some failed on the way ends in
/// [`LearnerError::LocalActorsFailed`], its figures logged and in its
/// summary all the same.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    options: RunOptions,
    shutdown: impl Future<Output: Into<StopRequest>> + Send,
) -> Result<TrainingOutcome, LearnerError> {
    config.validate()?;
    check_local_actors_fit(&config, options.local_actors.as_ref())?;
    let env = tasks::build(&config.task)?;
    let server = GrpcServer::start(&config, env.as_ref(), listener).await?;
    check_run_fits(&config, env.as_ref())?;
    let loaded = Loaded::load(&config, env.as_ref(), &server.model, &options).await?;
    let summary_path = loaded.metrics.as_ref().and_then(MetricsFile::summary_path);
    let steps_done = loaded.steps_done.clone();
    let closed = async {
        let mut running = Running::start(config, env, server, loaded, &options).await?;
        tokio::pin!(shutdown);
        let ending = running.until_training_ends(shutdown.as_mut()).await;
        running.close(ending, shutdown).await
    }
    .await;
    // Every end past the metrics file's opening has a summary, a failed
    // one's too: one from an earlier run left there would read as this
    // run's.
    let ended = closed.map(|closed| {
        let failed = closed.outcome.failed_local_actors;
        let failure = match closed.actors_failure {
            Some(message) => Some(LearnerError::LocalActorsExited(message)),
            None => (failed > 0).then_some(LearnerError::LocalActorsFailed(failed)),
        };
        (closed.outcome, failure)
    });
    if let Some(path) = &summary_path {
        let written = match &ended {
            Ok((outcome, failure)) => report::write_summary(path, outcome, failure.as_ref()),
            Err(error) => report::write_failed_summary(path, steps_done.step(), error),
        };
        if let Err(error) = written {
            warn!(%error, "the run's summary was not written");
        }
    }
    let (outcome, failure) = ended?;
    match failure {
        // Training stopped short: no `training finished` line.
        Some(error @ LearnerError::LocalActorsExited(_)) => Err(error),
        failure => {
            log_training_finished(&outcome);
            failure.map_or(Ok(outcome), Err)
        }
    }
}

/// How far the trainer got: the version its weights are at, written by
/// the trainer and read by the batch builder, the live line and a failed
/// run's summary.
#[derive(Clone)]
struct StepsDone {
    /// Steps done, plus a resumed run's version offset.
    version: Arc<AtomicU64>,
    /// The version this process started from.
    start_version: u64,
    /// The step this process resumed at (0 for a fresh run).
    first_step: u64,
}

impl StepsDone {
    /// The run's step (a resumed run's steps before this process counted).
    fn step(&self) -> u64 {
        self.first_step
            + self
                .version
                .load(Ordering::Acquire)
                .saturating_sub(self.start_version)
    }
}

/// The gRPC server, answering from the start: health NOT_SERVING until
/// the checkpoint, if any, is loaded and the trainer takes data; Learner
/// calls meanwhile wait. Dropped on an early return, it shuts the server
/// down (`stop_sender`) and answers the waiting calls UNAVAILABLE
/// (`ready_sender`).
struct GrpcServer {
    /// Sent true at the stop: the server, the credits, the batch builder
    /// and the live line stop taking work.
    stop_sender: watch::Sender<bool>,
    /// Cloned for each part that stops at the stop.
    stop: watch::Receiver<bool>,
    /// Hands the sessions their shared state once the learner is ready.
    ready_sender: watch::Sender<Option<Arc<LearnerState>>>,
    /// Sets the health service's status (SERVING once the trainer runs).
    health: tonic_health::server::HealthReporter,
    /// The server's task, drained at the end.
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Counters the sessions, the batch builder and the trainer share.
    stats: Arc<IngestStats>,
    /// The network's shape, compared with each actor's at the handshake.
    model: ModelSpec,
    /// The largest message decoded (advertised at the handshake).
    accepted_bytes: usize,
    /// Where local actors connect, and what the listening line names.
    local_address: Option<std::net::SocketAddr>,
    /// For the listening line, with `authentication`: what an operator
    /// checks first.
    transport: connections::Transport,
    authentication: &'static str,
}

impl GrpcServer {
    /// Checks the transport and token settings, sets health NOT_SERVING
    /// and the process's message limits (chunks, handshakes), then starts
    /// serving on `listener`.
    async fn start(
        config: &Config,
        env: &dyn Environment,
        listener: TcpListener,
    ) -> Result<GrpcServer, LearnerError> {
        let token = auth::load_token(&config.auth)?;
        let transport = connections::Transport::configured(&config.tls);
        let authentication = if token.is_some() { "token" } else { "none" };
        // Read before anything starts: a bad file is a configuration error.
        let mut secured = secured_transport(config)?;
        let local_address = listener.local_addr().ok();
        check_exposure(config, token.is_some(), local_address)?;
        let (stop_sender, stop) = watch::channel(false);
        let stats = Arc::new(IngestStats::default());
        let (ready_sender, ready) = watch::channel(None);
        let (health, health_service) = tonic_health::server::health_reporter();
        // Open to anyone, token or not: tonic reserves a message's declared
        // length as it starts reading it, and a health request is a service
        // name, not the 4 MiB a stranger could otherwise make each stream hold.
        let health_service = health_service.max_decoding_message_size(HEALTH_REQUEST_BYTES);
        not_serving(&health).await;
        let service = LearnerService { ready };
        let model = ModelSpec::new(env, &config.model);
        let handshake_bytes = accepted_handshake_bytes(env, &model);
        let accepted_bytes = accepted_message_bytes(&config.learner, env, handshake_bytes);
        wire::codec::refuse_chunks_beyond(config.learner.max_chunk_trajectories);
        wire::codec::refuse_handshakes_beyond(handshake_bytes);
        let grpc = LearnerServer::new(service)
            .max_decoding_message_size(accepted_bytes)
            .max_encoding_message_size(config.learner.max_message_bytes);
        // Only calls past the token check keep a connection from being idle
        // (health checks are open to anyone, and a Watch never ends).
        let grpc = tonic::service::interceptor::InterceptedService::new(
            connections::CountsCalls(grpc),
            token_check(token, stats.clone()),
        );
        let mut server_stop = stop.clone();
        let task = tokio::spawn(
            secured
                .add_service(health_service)
                .add_service(grpc)
                .serve_with_incoming_shutdown(
                    connections::incoming(
                        listener,
                        transport,
                        connections::connection_cap(config.learner.max_connections),
                        Duration::from_secs_f64(config.learner.idle_connection_s),
                        stats.clone(),
                        stop.clone(),
                    ),
                    async move {
                        let _ = server_stop.wait_for(|stopped| *stopped).await;
                    },
                ),
        );
        Ok(GrpcServer {
            stop_sender,
            stop,
            ready_sender,
            health,
            task,
            stats,
            model,
            accepted_bytes,
            local_address,
            transport,
            authentication,
        })
    }
}

/// What the run starts from: the model and objective on their device, the
/// checkpoint it resumes (its weights already in `policy`), and where
/// versions and reports go on.
struct Loaded {
    device: tch::Device,
    objective: Box<dyn objectives::Objective>,
    policy: Policy,
    checkpoint_dir: Option<PathBuf>,
    /// Held by the trainer, until its thread ends.
    checkpoint_lock: Option<checkpoint::FolderLock>,
    resume: Option<checkpoint::Checkpoint>,
    /// The checkpoint is at `max_steps` already: nothing is left to train.
    finished_already: bool,
    /// The version floor recorded in the checkpoint folder (0 without
    /// one): versions published from now on stay above it.
    version_floor: u64,
    /// How far the trainer got, from the first version this process
    /// publishes on (the resumed one, or the floor where that is higher).
    steps_done: StepsDone,
    publisher: Arc<Publisher>,
    metrics: Option<MetricsFile>,
}

impl Loaded {
    /// Makes the model and objective off the async workers, so that the
    /// server answers probes meanwhile (a CUDA context takes seconds to
    /// make); then opens the checkpoint folder, restores the checkpoint to
    /// resume, and opens the metrics file.
    async fn load(
        config: &Config,
        env: &dyn Environment,
        model: &ModelSpec,
        options: &RunOptions,
    ) -> Result<Loaded, LearnerError> {
        let mut metadata = model.weight_metadata(&env.spec());
        // Final weights (and every copy actors receive) say which build
        // trained them.
        metadata.insert(BUILD_METADATA_KEY.to_owned(), BUILD.to_owned());
        let device = select_device(config.learner.device).map_err(|reason| {
            flgfn_common::config::ConfigError::invalid("learner.device", reason)
        })?;
        set_threads(config.learner.threads);
        let (objective, mut policy) = {
            let (objective_config, model, seed) = (config.objective, model.clone(), config.seed);
            tokio::task::spawn_blocking(move || {
                // Reproducible initial weights.
                tch::manual_seed(seed as i64);
                let objective = objectives::build(&objective_config, device);
                (objective, Policy::new(&model, device))
            })
            .await
            .map_err(|e| LearnerError::Trainer(format!("making the model: {e}")))?
        };
        let learner = &config.learner;
        let checkpoint_dir =
            (!learner.checkpoint_dir.is_empty()).then(|| PathBuf::from(&learner.checkpoint_dir));
        let (checkpoint_lock, resume) =
            resume::open_folder(checkpoint_dir.clone(), options.fresh).await?;
        let finished_already = resume
            .as_ref()
            .is_some_and(|c| learner.max_steps > 0 && c.state.step >= learner.max_steps);
        if let Some(checkpoint) = &resume {
            resume::restore(
                checkpoint,
                &mut policy,
                &env.spec().to_string(),
                model,
                config,
                options.resume_changed,
            )?;
            if finished_already {
                warn!(
                    step = checkpoint.state.step,
                    max_steps = learner.max_steps,
                    "this run already finished: nothing left to train (raise learner.max_steps to go on, or --fresh to start over)"
                );
            }
        }
        let version_floor = match &checkpoint_dir {
            Some(dir) => checkpoint::read_version_floor(dir)?,
            None => 0,
        };
        let start_version =
            resume::start_version(resume.as_ref(), version_floor, &learner.checkpoint_dir)?;
        let publisher = Publisher::starting_at(
            start_version,
            policy.snapshot(),
            learner.weight_encoding,
            metadata,
        );
        let metrics = options
            .metrics_path
            .as_deref()
            // A run that resumes keeps its reports up to the step it resumes
            // at; one whose predecessor stopped before any checkpoint (a
            // version floor, no checkpoint) starts again at step 0.
            .map(|path| {
                let resumed_at = match &resume {
                    Some(checkpoint) => Some(checkpoint.state.step),
                    None => (version_floor > 0).then_some(0),
                };
                MetricsFile::open(path, resumed_at)
            })
            .transpose()?;
        let steps_done = StepsDone {
            version: Arc::new(AtomicU64::new(start_version)),
            start_version,
            first_step: resume.as_ref().map_or(0, |c| c.state.step),
        };
        Ok(Loaded {
            device,
            objective,
            policy,
            checkpoint_dir,
            checkpoint_lock,
            resume,
            finished_already,
            version_floor,
            steps_done,
            publisher,
            metrics,
        })
    }
}

/// A learner that trains: what its end needs.
struct Running {
    config: Config,
    stop_sender: watch::Sender<bool>,
    /// Kept until the run ends, as the state it sent (the sessions read
    /// it through their receivers).
    _ready_sender: watch::Sender<Option<Arc<LearnerState>>>,
    health: tonic_health::server::HealthReporter,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// The sessions' shared state (a stop for a restart is marked there).
    state: Arc<LearnerState>,
    stats: Arc<IngestStats>,
    local_actors: Option<LocalActors>,
    batcher: std::thread::JoinHandle<()>,
    /// The trainer's outcome, when its thread ends.
    trainer_outcome: oneshot::Receiver<Result<TrainingOutcome, LearnerError>>,
    /// True once the trainer published its final weights.
    training_done: watch::Receiver<bool>,
    checkpoints_off: bool,
}

/// How training came to its end.
struct Ending {
    /// What the trainer's thread returned.
    trained: Result<Result<TrainingOutcome, LearnerError>, oneshot::error::RecvError>,
    /// A stop signal ended training (a stop that comes later cuts the
    /// drain short instead).
    stop_requested: bool,
    /// That stop was for a restart.
    restart: bool,
    /// Every local actor exited while training went on: why.
    actors_failure: Option<String>,
}

/// A run's accounts, closed.
struct Closed {
    outcome: TrainingOutcome,
    /// Every local actor exited while training went on: why (the run ends
    /// in that error, its accounts closed all the same).
    actors_failure: Option<String>,
}

impl Running {
    /// Opens the learner to actors: the sessions' state, the listening
    /// line, the local actors, the batch builder and the trainer; then
    /// health SERVING.
    async fn start(
        config: Config,
        env: Arc<dyn Environment>,
        server: GrpcServer,
        loaded: Loaded,
        options: &RunOptions,
    ) -> Result<Running, LearnerError> {
        let GrpcServer {
            stop_sender,
            stop,
            ready_sender,
            health,
            task: server_task,
            stats,
            model,
            accepted_bytes,
            local_address,
            transport,
            authentication,
        } = server;
        let Loaded {
            device,
            objective,
            policy,
            checkpoint_dir,
            checkpoint_lock,
            resume,
            finished_already,
            version_floor,
            steps_done,
            publisher,
            metrics,
        } = loaded;
        let start_version = steps_done.start_version;
        let learner = &config.learner;
        let pool = credit_pool(learner, &steps_done);
        // Every queued chunk holds a credit of at least one transition.
        let (queue_sender, queue) = mpsc::channel(pool.ceiling() as usize + 1);
        let next_training_step = Arc::new(AtomicU64::new(start_version + 1));
        let state = Arc::new(LearnerState {
            env: env.clone(),
            task: env.spec(),
            model: model.clone(),
            keep_truncated: objective.trains_on_truncated() && !config.objective.drop_truncated,
            max_message_bytes: accepted_bytes,
            max_grant_bytes: learner.max_message_bytes,
            max_chunk_trajectories: learner.max_chunk_trajectories,
            max_session_bytes: learner.max_session_bytes,
            weights_refresh_steps: learner.weights_refresh_steps,
            max_policy_lag: learner.max_policy_lag,
            next_training_step: next_training_step.clone(),
            stalled_after: Duration::from_secs_f64(learner.stall_timeout_s),
            last_actor_id: AtomicU64::new(0),
            credits: Controller::spawn(pool.clone(), stop.clone()),
            queue: queue_sender,
            publisher: publisher.clone(),
            stats: stats.clone(),
            ingest_pool: IngestPool::new(learner.ingest_threads),
            max_sessions: learner.max_sessions,
            open_sessions: std::sync::atomic::AtomicUsize::new(0),
            sequences: Default::default(),
            stopping_for_restart: AtomicBool::new(false),
        });
        if !finished_already {
            check_local_actor_chunks(options, &config, env.as_ref(), &state)?;
        }
        ready_sender.send_replace(Some(state.clone()));
        info!(
            address = %local_address.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            task = %env.spec(),
            %model,
            objective = objective.name(),
            device = flgfn_common::policy::device_label(device),
            threads = learner.threads,
            transport = transport.name(),
            auth = authentication,
            build = BUILD,
            "learner listening"
        );

        if flgfn_common::telemetry::has_live_line() {
            tokio::spawn(live_progress(LiveProgress {
                steps_done: steps_done.clone(),
                max_steps: learner.max_steps,
                stats: stats.clone(),
                stop: stop.clone(),
            }));
        }
        // Now that there is a server to reach; before the trainer starts, so
        // that a failure to start them leaves nothing running.
        let local_actors = start_local_actors(
            options.local_actors.as_ref(),
            finished_already,
            local_address,
            &config,
        )?;

        // A rendezvous: the batcher builds the next batch while the trainer
        // runs the current one, and no further.
        let (batch_sender, batches) = std::sync::mpsc::sync_channel(0);
        let batcher_failure = Arc::new(std::sync::OnceLock::new());
        let batcher = Batcher {
            queue,
            out: batch_sender,
            steps_done: steps_done.version.clone(),
            last_handed_step: 0,
            next_training_step,
            pool: pool.clone(),
            stats: stats.clone(),
            max_transitions: learner.max_batch_transitions,
            take_waiting: match learner.batch_growth {
                BatchGrowth::Supply => true,
                BatchGrowth::Lag => false,
                BatchGrowth::Auto => device.is_cuda(),
            },
            max_policy_lag: learner.max_policy_lag,
            dims: (
                env.state_dim(),
                env.forward_actions(),
                env.backward_actions(),
            ),
            pinned: device.is_cuda(),
            stop: stop.clone(),
            failure: batcher_failure.clone(),
            collating: 0,
            runtime: tokio::runtime::Handle::current(),
            waited_for_data: false,
            waiting: Default::default(),
        };
        let batcher = spawn_thread("flgfn-batcher", "batch builder", move || batcher.run())?;
        let checkpoints_off = checkpoint_dir.is_none();
        let training_done = publisher.done();
        let trainer = Trainer {
            policy,
            objective,
            env,
            config: config.clone(),
            batches,
            batcher_failure,
            steps_done: steps_done.version,
            publisher,
            stats: stats.clone(),
            pool,
            metrics,
            checkpoint_dir,
            resume,
            start_version,
            version_floor,
            checkpoint_lock,
        };
        let (done_sender, trainer_done) = oneshot::channel();
        // (Its handle is not kept: the outcome comes through the channel.)
        spawn_thread("flgfn-trainer", "trainer", move || {
            let _ = done_sender.send(trainer.run());
        })?;

        // The checkpoint is loaded and the trainer runs: actors are welcome.
        set_health(&health, tonic_health::ServingStatus::Serving).await;
        Ok(Running {
            config,
            stop_sender,
            _ready_sender: ready_sender,
            health,
            server: server_task,
            state,
            stats,
            local_actors,
            batcher,
            trainer_outcome: trainer_done,
            training_done,
            checkpoints_off,
        })
    }

    /// Waits for training to end: by itself, at a stop (`shutdown`), or
    /// when every local actor has exited; then stops taking work.
    async fn until_training_ends<S: Future<Output: Into<StopRequest>>>(
        &mut self,
        shutdown: Pin<&mut S>,
    ) -> Ending {
        let (mut stop_requested, mut restart, mut actors_failure) = (false, false, None);
        let actors_gone =
            every_local_actor_exited(self.local_actors.as_ref(), self.training_done.clone());
        let done = &mut self.trainer_outcome;
        let trained = tokio::select! {
            trained = &mut *done => trained,
            request = shutdown => {
                stop_requested = true;
                restart = Into::<StopRequest>::into(request) == StopRequest::Restart;
                if restart {
                    // Before the stop reaches the trainer: no session may
                    // see training end before it knows how to tell its
                    // actor.
                    self.state.stopping_for_restart.store(true, Ordering::Release);
                    info!("stop for a restart requested: finishing the current step (and an evaluation or checkpoint under way); the actors will be told to reconnect");
                    if self.checkpoints_off {
                        warn!("checkpoints are off (learner.checkpoint_dir = \"\"): the learner started again starts over from version 0");
                    }
                } else {
                    info!("shutdown requested: finishing the current step (and an evaluation or checkpoint under way)");
                }
                self.stop_sender.send_replace(true);
                not_serving(&self.health).await;
                done.await
            }
            message = actors_gone => {
                warn!("{message}: stopping (the final checkpoint is written)");
                actors_failure = Some(message);
                self.stop_sender.send_replace(true);
                not_serving(&self.health).await;
                done.await
            }
        };
        self.stop_sender.send_replace(true);
        // A Watch already open sees the learner going away while it writes
        // its final checkpoint and drains its connections (new connections,
        // probes' included, are no longer taken since the stop).
        not_serving(&self.health).await;
        Ending {
            trained,
            stop_requested,
            restart,
            actors_failure,
        }
    }

    /// Drains the connections, ends the local actors and closes the run's
    /// accounts. A stop asked for now (training ended by itself) cuts the
    /// drain short rather than go unheard.
    async fn close<S: Future<Output: Into<StopRequest>>>(
        self,
        ending: Ending,
        shutdown: Pin<&mut S>,
    ) -> Result<Closed, LearnerError> {
        let mut outcome = ending
            .trained
            .map_err(|_| LearnerError::Trainer("the trainer thread panicked".to_owned()))??;
        wait_for_batcher(self.batcher).await?;
        let stop_now = async {
            if ending.stop_requested {
                std::future::pending().await
            } else {
                let _ = shutdown.await;
            }
        };
        if drain_connections(self.server, stop_now).await? {
            wait_for_sessions(&self.stats).await;
        }
        if let Some(actors) = self.local_actors {
            if ending.restart {
                // They were told to reconnect, as remote actors were, but a
                // learner started again starts its own: these end with it.
                actors.ask_to_stop();
            }
            outcome.failed_local_actors = tokio::task::spawn_blocking(move || actors.finish())
                .await
                .unwrap_or(0);
        }
        let stats = &self.stats;
        outcome.sessions = stats
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // Sessions go on counting after the last step (chunks in flight,
        // refusals, lost chunks, what was never trained): the last report
        // takes their final values, so that the run's accounts close.
        outcome.final_report.count_from(stats);
        outcome.untrained_at_stop_transitions =
            IngestStats::get(&stats.untrained_at_stop_transitions);
        let max_steps = self.config.learner.max_steps;
        // From the steps, not from whether a stop came: one during the last
        // step's evaluation or checkpoint comes after the end.
        outcome.ended_by = if max_steps > 0 && outcome.steps >= max_steps {
            EndedBy::MaxSteps
        } else if ending.restart {
            EndedBy::Restart
        } else {
            EndedBy::Stop
        };
        Ok(Closed {
            outcome,
            actors_failure: ending.actors_failure,
        })
    }
}

/// The credits actors roll out against. They taper off before the last
/// step: what actors would roll out beyond it could only be counted
/// untrained. (Set before the batch builder starts, so that its first
/// batch counts too.)
fn credit_pool(learner: &LearnerConfig, steps_done: &StepsDone) -> Arc<CreditPool> {
    let pool = CreditPool::new(
        learner.batch_transitions as u64,
        learner.max_batch_transitions as u64,
        learner.max_in_flight_batches,
    );
    if learner.max_steps > 0 {
        pool.last_step(
            learner.max_steps.saturating_add(
                steps_done
                    .start_version
                    .saturating_sub(steps_done.first_step),
            ),
            steps_done.start_version,
        );
    }
    pool
}

/// The local actors, if asked for and there is something to train (a
/// finished run would leave them retrying a closed port until killed).
fn start_local_actors(
    plan: Option<&launcher::LocalActorsPlan>,
    finished_already: bool,
    local_address: Option<std::net::SocketAddr>,
    config: &Config,
) -> Result<Option<LocalActors>, LearnerError> {
    let Some(plan) = plan else {
        return Ok(None);
    };
    if finished_already {
        info!("no local actors started: nothing left to train");
        return Ok(None);
    }
    let address = local_address.ok_or_else(|| {
        LearnerError::LocalActors(std::io::Error::other("the listener has no address"))
    })?;
    LocalActors::spawn(plan.count, address, config, &plan.executable)
        .map(Some)
        .map_err(LearnerError::LocalActors)
}

/// Waits up to [`DRAIN_TIMEOUT`] for the batch builder to end, as it does
/// once the trainer is gone (its next batch has no taker) or told to stop;
/// past that it warns and goes on. One that panicked instead ended
/// training early, as a stop would have: a failure, not a finished run.
/// Polled, not joined on a blocking task, which would hold up the
/// process's exit if the builder never ended.
async fn wait_for_batcher(batcher: std::thread::JoinHandle<()>) -> Result<(), LearnerError> {
    if !within_drain_timeout(|| batcher.is_finished()).await {
        warn!("the batch builder did not stop within {DRAIN_TIMEOUT:?}");
    } else if batcher.join().is_err() {
        return Err(LearnerError::Trainer(
            "the batch builder thread panicked".to_owned(),
        ));
    }
    Ok(())
}

/// Whether `done` comes true within [`DRAIN_TIMEOUT`], asked every 5 ms:
/// for what ends on a thread or task of its own, which the learner must
/// not wait for without bound.
async fn within_drain_timeout(mut done: impl FnMut() -> bool) -> bool {
    let waited = std::time::Instant::now();
    while !done() {
        if waited.elapsed() >= DRAIN_TIMEOUT {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Gives the open connections [`DRAIN_TIMEOUT`] to finish once the server
/// stopped taking new ones, then closes what is left; `stop_now` resolving
/// closes them at once. The server's own failure is the learner's. False
/// when cut short by `stop_now`: nothing more is to be waited for.
async fn drain_connections(
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    stop_now: impl Future<Output = ()>,
) -> Result<bool, LearnerError> {
    let abort = server.abort_handle();
    // Connections close within milliseconds as actors leave; one that
    // does not (a frozen actor's) would make the learner wait seconds
    // with nothing said. (It only speaks: it never ends the wait.)
    let waiting_said = async {
        tokio::time::sleep(DRAIN_NOTICE_AFTER).await;
        info!(
            "training is over: waiting (up to {DRAIN_TIMEOUT:?}) for the open connections to close; a stop signal ends the wait"
        );
        std::future::pending().await
    };
    let drained = tokio::select! {
        drained = tokio::time::timeout(DRAIN_TIMEOUT, server) => Some(drained),
        () = stop_now => None,
        drained = waiting_said => drained,
    };
    match drained {
        Some(Ok(Ok(result))) => result?,
        Some(Ok(Err(join))) => warn!(%join, "gRPC server task failed"),
        Some(Err(_)) => {
            warn!("connections still open after {DRAIN_TIMEOUT:?}; closing anyway");
            abort.abort();
        }
        None => {
            info!("shutdown requested: closing the open connections now");
            abort.abort();
            return Ok(false);
        }
    }
    Ok(true)
}

/// Waits up to [`DRAIN_TIMEOUT`] for the sessions still open to end. Each
/// runs on a task of its own, which may outlive its connection (one reading
/// its actor's last chunks, see `session.rs`): the run's records and
/// counts are taken once they have ended.
async fn wait_for_sessions(stats: &IngestStats) {
    let open = || stats.connected_actors.load(Ordering::Relaxed);
    if !within_drain_timeout(|| open() <= 0).await {
        warn!(
            open = open(),
            "sessions still open {DRAIN_TIMEOUT:?} after training ended: the final counts leave out what they do from now on"
        );
    }
}

/// The run's last line: what it trained, how fast, and how good.
fn log_training_finished(outcome: &TrainingOutcome) {
    let r = &outcome.final_report;
    info!(
        steps = outcome.steps,
        version = outcome.version,
        // To the millisecond (the metrics file keeps every digit).
        wall_s = (r.wall_s * 1000.0).round() / 1000.0,
        // Numbers when known, left out when not (JSON logs too).
        time_to_quality_s = outcome.time_to_quality_s,
        // Said where the task has a quality target: a time to quality
        // left out may otherwise read as one not logged.
        quality_reached = r.at_quality.map(|_| outcome.time_to_quality_s.is_some()),
        logz_error = r.logz_exact.map(|exact| (r.logz_est - exact).abs()),
        marginal_tv = r.marginal_tv,
        energy_w1 = r.energy_w1,
        top100_mean_reward = (r.top100_samples > 0).then_some(r.top100_mean_reward),
        trained_transitions = r.trained_transitions,
        resumed_trained_transitions = r.resumed_trained_transitions,
        ingested_transitions = r.ingested_transitions,
        wire_bytes_per_transition = r.wire_bytes_per_transition,
        weight_bytes_per_trained_transition = r.weight_bytes_per_trained_transition,
        stale_transitions = r.stale_transitions,
        stale_fraction = r.stale_fraction,
        untrained_at_stop_transitions = outcome.untrained_at_stop_transitions,
        skipped_batches = r.skipped_batches,
        rejected_chunks = r.rejected_chunks,
        // Sent before their actors heard that training was over.
        late_chunks = r
            .rejections
            .get(crate::error::RequestError::ShuttingDown.reason())
            .copied()
            .unwrap_or(0),
        lost_chunks = r.lost_chunks,
        stalled_sessions = r.stalled_sessions,
        // Truncated trajectories an objective of complete ones (TB) cannot
        // use: received, not ingested; said where there were any.
        unusable_truncated_transitions =
            (r.unusable_truncated_transitions > 0).then_some(r.unusable_truncated_transitions),
        // A run stopped mid-way otherwise reads as one that went to the
        // end: both end with this line. (Last: scripts read `steps=` first.)
        ended_by = %outcome.ended_by.as_str(),
        "training finished"
    );
}

/// What the live progress line reads.
struct LiveProgress {
    steps_done: StepsDone,
    max_steps: u64,
    stats: Arc<IngestStats>,
    stop: watch::Receiver<bool>,
}

/// Redraws the terminal's live line four times a second until the learner
/// stops: step, connected actors, transitions arriving per second.
async fn live_progress(mut live: LiveProgress) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (mut last_in, mut rate) = (IngestStats::get(&live.stats.accepted_transitions), 0.0);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = live.stop.wait_for(|stopped| *stopped) => break,
        }
        let step = live.steps_done.step();
        let arrived = IngestStats::get(&live.stats.accepted_transitions);
        // Per second, smoothed over about a second.
        rate = 0.75 * rate + 0.25 * (arrived - last_in) as f64 * 4.0;
        last_in = arrived;
        let target = if live.max_steps == 0 {
            String::new()
        } else {
            format!("/{}", live.max_steps)
        };
        let actors = live.stats.connected_actors.load(Ordering::Relaxed);
        let plural = if actors == 1 { "" } else { "s" };
        flgfn_common::telemetry::live_status(format!(
            "step {step}{target} · {actors} actor{plural} · {:.0}k transitions/s in",
            rate / 1e3
        ));
    }
    flgfn_common::telemetry::live_finish();
}

/// Health checks answer `status` from now on, for the learner service and
/// for the server as a whole (the empty service name that Docker and
/// Kubernetes probes ask about).
async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health
        .set_service_status(
            <LearnerServer<LearnerService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health.set_service_status("", status).await;
}

/// Health checks answer NOT_SERVING from now on (see [`set_health`]).
async fn not_serving(health: &tonic_health::server::HealthReporter) {
    set_health(health, tonic_health::ServingStatus::NotServing).await;
}

/// Starts thread `name` running `work`; `what` names it in the error
/// where the OS refuses (out of threads or memory).
fn spawn_thread<T: Send + 'static>(
    name: &str,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, LearnerError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(work)
        .map_err(|e| LearnerError::Trainer(format!("cannot start the {what} thread: {e}")))
}

/// Local actors whose chunks this learner would refuse are found out
/// before they start, naming actor.envs, rather than each refused at its
/// handshake once started.
fn check_local_actor_chunks(
    options: &RunOptions,
    config: &Config,
    env: &dyn Environment,
    state: &LearnerState,
) -> Result<(), LearnerError> {
    let Some(plan) = &options.local_actors else {
        return Ok(());
    };
    let envs = config.actor.envs_for(env) as u64;
    state
        .check_chunk_size(envs, "actor.envs")
        .map_err(|refusal| {
            LearnerError::LocalActors(std::io::Error::other(format!(
                "the {} local actors' chunks would be refused: {refusal}",
                plan.count
            )))
        })?;
    Ok(())
}
