//! Loading a run: the gRPC server bound (health NOT_SERVING), then the
//! checkpoint to resume from or fresh weights, the publisher and the
//! metrics file.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use flgfn_common::auth;
use flgfn_common::config::Config;
use flgfn_common::env::Environment;
use flgfn_common::objectives;
use flgfn_common::policy::{ModelSpec, Policy, select_device, set_threads};
use flgfn_common::wire;
use flgfn_common::wire::proto::learner_server::LearnerServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::error::LearnerError;
use crate::ingest::IngestStats;
use crate::preflight::check_exposure;
use crate::publisher::Publisher;
use crate::report::MetricsFile;
use crate::service::{LearnerService, LearnerState};
use crate::transport::{
    HEALTH_REQUEST_BYTES, accepted_handshake_bytes, accepted_message_bytes, secured_transport,
    token_check,
};
use crate::{BUILD, BUILD_METADATA_KEY, RunOptions, checkpoint, connections, resume};

use super::{StepsDone, not_serving};

/// The gRPC server, answering from the start: health NOT_SERVING until
/// the checkpoint, if any, is loaded and the trainer takes data; Learner
/// calls meanwhile wait. Dropped on an early return, it shuts the server
/// down (`stop_sender`) and answers the waiting calls UNAVAILABLE
/// (`ready_sender`).
pub(super) struct GrpcServer {
    /// Sent true at the stop: the server, the credits, the batch builder
    /// and the live line stop taking work.
    pub(super) stop_sender: watch::Sender<bool>,
    /// Cloned for each part that stops at the stop.
    pub(super) stop: watch::Receiver<bool>,
    /// Hands the sessions their shared state once the learner is ready.
    pub(super) ready_sender: watch::Sender<Option<Arc<LearnerState>>>,
    /// Sets the health service's status (SERVING once the trainer runs).
    pub(super) health: tonic_health::server::HealthReporter,
    /// The server's task, drained at the end.
    pub(super) task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Counters the sessions, the batch builder and the trainer share.
    pub(super) stats: Arc<IngestStats>,
    /// The network's shape, compared with each actor's at the handshake.
    pub(super) model: ModelSpec,
    /// The largest message decoded (advertised at the handshake).
    pub(super) accepted_bytes: usize,
    /// Where local actors connect, and what the listening line names.
    pub(super) local_address: Option<std::net::SocketAddr>,
    /// For the listening line, with `authentication`: what an operator
    /// checks first.
    pub(super) transport: connections::Transport,
    pub(super) authentication: &'static str,
}

impl GrpcServer {
    /// Checks the transport and token settings, sets health NOT_SERVING
    /// and the process's message limits (chunks, handshakes), then starts
    /// serving on `listener`.
    pub(super) async fn start(
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
            connections::CountsCalls {
                service: grpc,
                stats: stats.clone(),
            },
            token_check(token, stats.clone()),
        );
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
                    // Never: the accept loop ends when the incoming stream
                    // does, at the stop, closing the listener. (With the
                    // stop here too, tonic's unbiased select could leave
                    // the stream unpolled, and the listener open through
                    // the graceful shutdown. A shutdown future, even one
                    // that never comes, is what makes that shutdown
                    // graceful.)
                    std::future::pending::<()>(),
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
pub(super) struct Loaded {
    pub(super) device: tch::Device,
    pub(super) objective: Box<dyn objectives::Objective>,
    pub(super) policy: Policy,
    pub(super) checkpoint_dir: Option<PathBuf>,
    /// Held by the trainer, until its thread ends.
    pub(super) checkpoint_lock: Option<checkpoint::FolderLock>,
    pub(super) resume: Option<checkpoint::Checkpoint>,
    /// The checkpoint is at `max_steps` already: nothing is left to train.
    pub(super) finished_already: bool,
    /// The version floor recorded in the checkpoint folder (0 without
    /// one): versions published from now on stay above it.
    pub(super) version_floor: u64,
    /// How far the trainer got, from the first version this process
    /// publishes on (the resumed one, or the floor where that is higher).
    pub(super) steps_done: StepsDone,
    pub(super) publisher: Arc<Publisher>,
    pub(super) metrics: Option<MetricsFile>,
}

impl Loaded {
    /// Makes the model and objective off the async workers, so that the
    /// server answers probes meanwhile (a CUDA context takes seconds to
    /// make); then opens the checkpoint folder, restores the checkpoint to
    /// resume, and opens the metrics file.
    pub(super) async fn load(
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
        let publisher = Publisher::starting_at(
            start_version,
            policy.snapshot(),
            learner.weight_encoding,
            metadata,
        );
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
