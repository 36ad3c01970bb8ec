//! An flgfn actor: samples trajectories with the latest policy, computes
//! their local energy terms, and streams them to the learner.
//!
//! # Layout
//!
//! - [`worker`]: the rollout thread that owns the policy and produces
//!   chunks, loading new weights between rollouts.
//! - [`connection`]: one session with the learner (handshake, weight
//!   subscription, trajectory stream).
//! - [`run`] (this file): starts the worker and keeps a session open,
//!   reconnecting with exponential backoff when the learner goes away.

pub mod connection;
pub mod worker;

use std::future::Future;
use std::time::Duration;

use flgfn_common::config::Config;
use flgfn_common::policy::{ModelSpec, set_threads};
use flgfn_common::rollout::Behaviour;
use flgfn_common::tasks;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::connection::{Session, SessionEnd, SessionError};
use crate::worker::{Worker, WorkerReport};

/// Settings that are not part of the shared configuration file.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// Shown in the learner's logs.
    pub name: String,
    /// Added to `config.seed` so local actors draw different trajectories.
    pub seed_offset: u64,
}

/// What an actor did, returned when it stops.
#[derive(Debug, Clone, Default)]
pub struct ActorReport {
    /// Weight versions loaded, in order.
    pub versions_applied: Vec<u64>,
    /// Chunks handed to the gRPC stream (the learner acknowledges none
    /// individually; see [`connection::Session::sent`]).
    pub chunks_sent: u64,
    /// Transitions sent to the learner.
    pub transitions_sent: u64,
    /// Connection attempts made, successful or not.
    pub sessions: u32,
    /// Whether the learner said training was over.
    pub training_done: bool,
    /// Chunks not sent because they were sampled with weights of an earlier
    /// session (the learner may have restarted since).
    pub stale_chunks_dropped: u64,
}

/// Why an actor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] flgfn_common::config::ConfigError),
    /// The learner refused this actor (task or model mismatch, bad data).
    #[error(transparent)]
    Refused(SessionError),
    /// The learner stayed unreachable for `actor.reconnect_attempts` tries.
    #[error("gave up after {attempts} failed connection attempts; last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The rollout worker failed (e.g. weights that do not load).
    #[error("rollout worker: {0}")]
    Worker(String),
}

/// Runs an actor until the learner finishes training, `shutdown` resolves,
/// or the learner refuses it.
pub async fn run(
    config: Config,
    options: ActorOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ActorReport, ActorError> {
    config.validate()?;
    let env = tasks::build(&config.task)?;
    let model = ModelSpec::new(env.as_ref(), &config.model);
    let task = env.spec();
    set_threads(config.actor.threads);
    let actor = &config.actor;

    let (weight_sender, weight_slot) = watch::channel(None);
    let (chunk_sender, mut chunks) = mpsc::channel(actor.send_buffer_chunks);
    let worker = Worker {
        env,
        model: model.clone(),
        weights: weight_slot,
        out: chunk_sender,
        behaviour: Behaviour {
            epsilon: actor.epsilon,
            truncate_fraction: actor.truncate_fraction,
        },
        envs: actor.envs,
        seed: config.seed.wrapping_add(1 + options.seed_offset),
        runtime: tokio::runtime::Handle::current(),
    };
    let worker = std::thread::Builder::new()
        .name("flgfn-rollout".to_owned())
        .spawn(move || worker.run())
        .map_err(|e| ActorError::Worker(e.to_string()))?;

    let mut report = ActorReport::default();
    let mut sent = (0u64, 0u64);
    let mut actor_id = 0u64;
    let mut failures = 0u32;
    let mut backoff = Duration::from_secs_f64(actor.reconnect_initial_s);
    let max_backoff = Duration::from_secs_f64(actor.reconnect_max_s);
    tokio::pin!(shutdown);
    let result = loop {
        report.sessions += 1;
        let session = Session {
            url: &actor.learner,
            actor_name: &options.name,
            task: &task,
            model: &model,
            max_message_bytes: config.learner.max_message_bytes,
            chunks: &mut chunks,
            weights: &weight_sender,
            sent: &mut sent,
            actor_id: &mut actor_id,
            session: report.sessions,
            dropped: &mut report.stale_chunks_dropped,
        };
        let outcome = tokio::select! {
            outcome = session.run() => outcome,
            () = &mut shutdown => break Ok(()),
        };
        match outcome {
            Ok(SessionEnd::TrainingDone) => {
                report.training_done = true;
                info!(actor_id, "the learner finished training");
                break Ok(());
            }
            Ok(SessionEnd::WorkerStopped) => break Ok(()),
            Err(refused @ SessionError::Refused(_)) => break Err(ActorError::Refused(refused)),
            Err(SessionError::Retry {
                message,
                handshake_done,
            }) => {
                if handshake_done {
                    // The connection worked: this is a new outage.
                    failures = 0;
                    backoff = Duration::from_secs_f64(actor.reconnect_initial_s);
                } else {
                    failures += 1;
                }
                if actor.reconnect_attempts > 0 && failures >= actor.reconnect_attempts {
                    break Err(ActorError::GaveUp {
                        attempts: failures,
                        last: message,
                    });
                }
                warn!(%message, retry_in = ?backoff, "learner unavailable; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => break Ok(()),
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    };

    // Closing both channels stops the worker at its next rollout.
    drop(chunks);
    drop(weight_sender);
    let worker_report: WorkerReport = tokio::task::spawn_blocking(move || worker.join())
        .await
        .map_err(|e| ActorError::Worker(e.to_string()))?
        .map_err(|_| ActorError::Worker("the rollout thread panicked".to_owned()))?
        .map_err(|e| ActorError::Worker(e.to_string()))?;
    report.versions_applied = worker_report.versions_applied;
    report.chunks_sent = sent.0;
    report.transitions_sent = sent.1;
    info!(
        chunks = report.chunks_sent,
        transitions = report.transitions_sent,
        versions = report.versions_applied.len(),
        sessions = report.sessions,
        "actor stopped"
    );
    result.map(|()| report)
}
