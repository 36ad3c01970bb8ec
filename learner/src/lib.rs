//! The flgfn learner: receives trajectories from actors over gRPC, trains
//! the policy with a forward-looking objective, and broadcasts new weights.
//!
//! # Layout
//!
//! - [`service`]: the `flgfn.v1.Learner` gRPC service (handshake,
//!   trajectory stream, weight subscription).
//! - [`ingest`]: validation and replay of incoming chunks, and the counters.
//! - [`trainer`]: the thread that owns the model and optimizer.
//! - [`publisher`]: weights serialised once per version, shared by all.
//! - [`evaluator`]: fresh on-policy samples scored against the exact target.
//! - [`report`]: tracing lines and JSON-lines metrics.
//! - [`error`]: errors, and their one conversion to gRPC statuses.
//! - [`launcher`]: `--local-actors`, actor processes next to the learner.
//!
//! Data path: service -> ingest (validate, replay) -> bounded queue ->
//! trainer -> publisher -> every subscribed actor. [`serve`] wires it up.

pub mod error;
pub mod evaluator;
pub mod ingest;
pub mod launcher;
pub mod publisher;
pub mod report;
pub mod service;
pub mod trainer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use flgfn_common::config::{Config, LearnerConfig};
use flgfn_common::objectives;
use flgfn_common::policy::{ModelSpec, Policy, select_device, set_threads};
use flgfn_common::tasks;
use flgfn_common::wire::proto::learner_server::LearnerServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

pub use crate::error::LearnerError;
use crate::ingest::IngestStats;
use crate::publisher::Publisher;
use crate::report::MetricsFile;
use crate::service::LearnerService;
use crate::trainer::Trainer;
pub use crate::trainer::TrainingOutcome;

/// Settings that are not part of the shared configuration file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// JSON-lines metrics file, one object per report.
    pub metrics_path: Option<PathBuf>,
}

/// The gRPC transport with the learner's flow-control and keepalive
/// settings; `serve` and tests that assemble a service by hand share it.
pub fn transport(learner: &LearnerConfig) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        // Small windows: data in flight was sampled by aging weights, and
        // a full ingest queue must reach the actors quickly.
        .initial_stream_window_size(learner.receive_window_bytes)
        .initial_connection_window_size(learner.receive_window_bytes)
        // Free the handlers of actors whose host vanished silently.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
}

/// How long open connections get to finish once training is over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a learner on `listener` until training ends (`learner.max_steps`)
/// or `shutdown` resolves, and returns what training produced.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<TrainingOutcome, LearnerError> {
    config.validate()?;
    let env = tasks::build(&config.task)?;
    let model = ModelSpec::new(env.as_ref(), &config.model);
    let device = select_device(config.learner.device)
        .map_err(|reason| flgfn_common::config::ConfigError::invalid("learner.device", reason))?;
    set_threads(config.learner.threads);
    // Reproducible initial weights.
    tch::manual_seed(config.seed as i64);
    let objective = objectives::build(&config.objective);
    let policy = Policy::new(&model, device);
    let (publisher, weights) = Publisher::new(Bytes::from(policy.to_bytes()?));
    let metrics = options
        .metrics_path
        .as_deref()
        .map(MetricsFile::create)
        .transpose()?;

    let (queue_sender, queue) = mpsc::channel(config.learner.ingest_queue_chunks);
    let (stop_sender, stop) = watch::channel(false);
    let stats = Arc::new(IngestStats::default());
    let service = LearnerService {
        env: env.clone(),
        task: env.spec(),
        model: model.clone(),
        keep_truncated: objective.trains_on_truncated(),
        max_policy_lag: config.learner.max_policy_lag,
        max_message_bytes: config.learner.max_message_bytes,
        max_chunk_trajectories: config.learner.max_chunk_trajectories,
        last_actor_id: AtomicU64::new(0),
        queue: queue_sender,
        weights,
        stats: stats.clone(),
        stop: stop.clone(),
    };
    let address = listener.local_addr().ok();
    info!(
        ?address,
        task = %env.spec(),
        %model,
        objective = objective.name(),
        ?device,
        threads = config.learner.threads,
        "learner listening"
    );

    let trainer = Trainer {
        policy,
        objective,
        env,
        config: config.clone(),
        queue,
        publisher,
        stats,
        metrics,
        stop: stop.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let (done_sender, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("flgfn-trainer".to_owned())
        .spawn(move || {
            let _ = done_sender.send(trainer.run());
        })
        .map_err(|e| LearnerError::Trainer(e.to_string()))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LearnerServer<LearnerService>>().await;
    let max_bytes = config.learner.max_message_bytes;
    let grpc = LearnerServer::new(service)
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    let mut server_stop = stop.clone();
    let server = tokio::spawn(
        transport(&config.learner)
            .add_service(health_service)
            .add_service(grpc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = server_stop.wait_for(|stopped| *stopped).await;
            }),
    );

    tokio::pin!(done);
    let outcome = tokio::select! {
        outcome = &mut done => outcome,
        () = shutdown => {
            info!("shutdown requested: finishing the current step");
            stop_sender.send_replace(true);
            (&mut done).await
        }
    };
    stop_sender.send_replace(true);
    let outcome =
        outcome.map_err(|_| LearnerError::Trainer("the trainer thread panicked".to_owned()))??;
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => warn!(%join, "gRPC server task failed"),
        Err(_) => warn!("connections still open after {DRAIN_TIMEOUT:?}; closing anyway"),
    }
    let r = &outcome.final_report;
    info!(
        steps = outcome.steps,
        version = outcome.version,
        wall_s = r.wall_s,
        time_to_quality_s = ?outcome.time_to_quality_s,
        logz_error = ?r.logz_exact.map(|exact| (r.logz_est - exact).abs()),
        marginal_tv = ?r.marginal_tv,
        energy_w1 = ?r.energy_w1,
        top100_mean_reward = r.top100_mean_reward,
        trained_transitions = r.trained_transitions,
        ingested_transitions = r.ingested_transitions,
        wire_bytes_per_transition = r.wire_bytes_per_transition,
        "training finished"
    );
    Ok(outcome)
}
