//! A run, from its configuration to its end: [`serve`] loads it, runs it
//! (the gRPC server, the credit controller, the batcher and trainer
//! threads, local actors, the live progress line), and closes it (drains
//! the sessions, writes the summary).
//!
//! # Layout
//!
//! - `load.rs`: the server bound, the checkpoint or fresh weights loaded;
//! - `start.rs`: the threads and local actors started, health SERVING;
//! - `end.rs`: training's end awaited, the sessions drained, the run
//!   closed;
//! - `watch.rs`: health NOT_SERVING while the trainer is stuck on one
//!   piece of work.

mod end;
mod load;
mod start;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flgfn_common::config::Config;
use flgfn_common::signals::StopRequest;
use flgfn_common::wire::proto::learner_server::LearnerServer;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::error::LearnerError;
use crate::preflight::check_startup;
use crate::report::MetricsFile;
use crate::service::LearnerService;
use crate::trainer::TrainingOutcome;
use crate::{RunOptions, report};

use end::log_training_finished;
use load::{GrpcServer, Loaded};
use start::Running;

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
    let env = check_startup(
        &config,
        options.local_actors.as_ref().map(|plan| plan.count),
    )?;
    let server = GrpcServer::start(&config, env.as_ref(), listener).await?;
    let loaded = Loaded::load(&config, env.as_ref(), &server.model, &options).await?;
    let summary_path = loaded.metrics.as_ref().and_then(MetricsFile::summary_path);
    let steps_done = loaded.steps_done.clone();
    // A stop asked for while loading (a checkpoint, CUDA) is kept, and
    // ends the run at once: local actors started now could never connect
    // (the server stops taking connections), and would be killed after
    // their grace period.
    tokio::pin!(shutdown);
    let early = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match shutdown.as_mut().poll(cx) {
            std::task::Poll::Ready(request) => Some(request.into()),
            std::task::Poll::Pending => None,
        })
    })
    .await;
    let mut options = options;
    if early.is_some() && options.local_actors.take().is_some() {
        info!("a stop was asked for while the learner loaded: its local actors are not started");
    }
    let shutdown = async move {
        match early {
            Some(request) => request,
            None => shutdown.await.into(),
        }
    };
    let closed = async {
        let mut running =
            Running::start(config, env, server, loaded, &options, early.is_some()).await?;
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
