//! Starting a loaded run: the sessions' state, the local actors, the
//! batch builder and trainer threads, the live progress line; then health
//! SERVING.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use flgfn_common::config::{BatchGrowth, Config, LearnerConfig};
use flgfn_common::env::Environment;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use crate::batcher::Batcher;
use crate::credits::{Controller, CreditPool};
use crate::error::LearnerError;
use crate::ingest::IngestStats;
use crate::launcher::LocalActors;
use crate::service::LearnerState;
use crate::session::IngestPool;
use crate::trainer::{Trainer, TrainingOutcome};
use crate::{BUILD, RunOptions, checkpoint, launcher};

use super::load::{GrpcServer, Loaded};
use super::{StepsDone, set_health, spawn_thread};

/// A learner that trains: what its end needs.
pub(super) struct Running {
    pub(super) config: Config,
    pub(super) stop_sender: watch::Sender<bool>,
    /// Kept until the run ends, as the state it sent (the sessions read
    /// it through their receivers).
    pub(super) _ready_sender: watch::Sender<Option<Arc<LearnerState>>>,
    pub(super) health: tonic_health::server::HealthReporter,
    pub(super) server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// The sessions' shared state (a stop for a restart is marked there).
    pub(super) state: Arc<LearnerState>,
    /// Told to the sessions once the trainer's outcome is in.
    pub(super) trainer_ended: watch::Sender<bool>,
    pub(super) stats: Arc<IngestStats>,
    pub(super) local_actors: Option<LocalActors>,
    pub(super) batcher: std::thread::JoinHandle<()>,
    /// The trainer's outcome, when its thread ends.
    pub(super) trainer_outcome: oneshot::Receiver<Result<TrainingOutcome, LearnerError>>,
    /// True once the trainer published its final weights.
    pub(super) training_done: watch::Receiver<bool>,
    pub(super) checkpoints_off: bool,
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
    let period = Duration::from_millis(250);
    // (Not `interval`, whose first tick comes at once: the first rate
    // would rest on no time at all.)
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // A tick late on a loaded machine is not made up by a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_in, mut rate) = (IngestStats::get(&live.stats.accepted_transitions), 0.0);
    let mut last_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = live.stop.wait_for(|stopped| *stopped) => break,
        }
        let step = live.steps_done.step();
        let arrived = IngestStats::get(&live.stats.accepted_transitions);
        // Per second of the clock since the last tick (later than 250 ms
        // on a loaded machine), smoothed over about a second.
        let now = std::time::Instant::now();
        let seconds = now.duration_since(last_at).as_secs_f64().max(1e-3);
        rate = 0.75 * rate + 0.25 * arrived.saturating_sub(last_in) as f64 / seconds;
        (last_in, last_at) = (arrived, now);
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

impl Running {
    /// Opens the learner to actors: the sessions' state, the listening
    /// line, the local actors, the batch builder and the trainer; then
    /// health SERVING, unless a stop came while it loaded (`stopping`).
    pub(super) async fn start(
        config: Config,
        env: Arc<dyn Environment>,
        server: GrpcServer,
        loaded: Loaded,
        options: &RunOptions,
        stopping: bool,
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
        let (trainer_ended_sender, trainer_ended) = watch::channel(false);
        let state = Arc::new(LearnerState {
            env: env.clone(),
            task: env.spec(),
            model: model.clone(),
            keep_truncated: config.objective.trains_on_truncated(),
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
            stopping: stop.clone(),
            trainer_ended,
        });
        // The first version goes out once the server is ready, before the
        // trainer's first step moves the floor (and before it checks the
        // rest of the checkpoint: the optimizer state): moved here first,
        // or a start killed or refused before its first step would leave
        // that version to be issued again with other weights (a changed
        // seed; an older checkpoint in place of one refused). Not before
        // this point: a start refused above writes no floor (nor leaves a
        // folder it made) for a version never published.
        let version_floor = match &checkpoint_dir {
            Some(dir) => checkpoint::floor_above(dir, start_version, version_floor)?,
            None => version_floor,
        };
        ready_sender.send_replace(Some(state.clone()));
        // A path in full, or `off` where there is none.
        let in_full = |path: Option<&std::path::Path>| {
            path.map_or_else(
                || "off".to_owned(),
                |path| {
                    std::path::absolute(path)
                        .unwrap_or_else(|_| path.to_owned())
                        .display()
                        .to_string()
                },
            )
        };
        info!(
            address = %local_address.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            task = %env.spec(),
            %model,
            objective = objective.name(),
            device = flgfn_common::policy::device_label(device),
            threads = learner.threads,
            transport = transport.name(),
            auth = authentication,
            // Said, since an empty `learner.checkpoint_dir` (a variable
            // set to nothing, say) turns checkpoints and resume off.
            // In full: the working folder is logged nowhere else.
            checkpoints = %in_full(checkpoint_dir.as_deref()),
            // Where the figures go, in full, and how long the run is (0:
            // until stopped).
            metrics = %in_full(metrics.as_ref().map(crate::report::MetricsFile::path)),
            summary = %metrics.as_ref().and_then(crate::report::MetricsFile::summary_path).map_or_else(
                || "none".to_owned(),
                |path| path.display().to_string()
            ),
            max_steps = learner.max_steps,
            seed = config.seed,
            build = BUILD,
            // The first version it publishes: above every one published
            // before in this checkpoint folder, or the checkpoint's own.
            version = start_version,
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
        let pulse = Arc::new(crate::trainer::TrainerPulse::default());
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
            pulse: pulse.clone(),
        };
        let (done_sender, trainer_done) = oneshot::channel();
        // (Its handle is not kept: the outcome comes through the channel.)
        spawn_thread("flgfn-trainer", "trainer", move || {
            let _ = done_sender.send(trainer.run());
        })?;

        // The checkpoint is loaded and the trainer runs: actors are welcome
        // (not for the moment before a stop asked for meanwhile is taken).
        if !stopping {
            set_health(&health, tonic_health::ServingStatus::Serving).await;
        }
        tokio::spawn(super::watch::watch_trainer(
            pulse,
            Duration::from_secs_f64(learner.stuck_after_s),
            health.clone(),
            stop.clone(),
        ));
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
            trainer_ended: trainer_ended_sender,
            training_done,
            checkpoints_off,
        })
    }
}
