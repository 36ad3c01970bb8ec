//! A run's end: waiting for training to end (by itself, at a stop, or
//! with every local actor gone), then closing it: the batcher joined, the
//! sessions drained, the accounts closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flgfn_common::signals::StopRequest;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::error::LearnerError;
use crate::ingest::IngestStats;
use crate::launcher::LocalActors;
use crate::report::to_the_millisecond;
use crate::service::LearnerState;
use crate::trainer::{EndedBy, TrainingOutcome};

use super::not_serving;
use super::start::Running;

/// How training came to its end.
pub(super) struct Ending {
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
pub(super) struct Closed {
    pub(super) outcome: TrainingOutcome,
    /// Every local actor exited while training went on: why (the run ends
    /// in that error, its accounts closed all the same).
    pub(super) actors_failure: Option<String>,
}

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
                .filter(|(_, _, status)| !status.success())
                .count();
            return format!(
                "every local actor exited before training finished ({failed} with an error: their exit statuses and any lines of theirs are in the learner's log above)"
            );
        }
    }
}

/// How long open connections get to finish once training is over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the drain goes on before the learner says what it waits for.
const DRAIN_NOTICE_AFTER: Duration = Duration::from_millis(500);

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
/// `signalled`: a stop ended training (a signal, or the parent's death),
/// and stop signals no longer end the wait: `stop_now` never resolves
/// then, and the next signal (the second, after the parent's death) is
/// the forced exit.
async fn drain_connections(
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    stop_now: impl Future<Output = ()>,
    signalled: bool,
) -> Result<bool, LearnerError> {
    let abort = server.abort_handle();
    // Connections close within milliseconds as actors leave; one that
    // does not (a frozen actor's) would make the learner wait seconds
    // with nothing said. (It only speaks: it never ends the wait.)
    let waiting_said = async {
        tokio::time::sleep(DRAIN_NOTICE_AFTER).await;
        let signal = if signalled {
            "another stop signal exits at once (status 130, without the run's summary; after the parent's death, the second one)"
        } else {
            "a stop signal ends the wait"
        };
        info!(
            "training is over: waiting (up to {DRAIN_TIMEOUT:?}) for the open connections to close; {signal}"
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
            // (Each connection is served by a task of its own, which this
            // does not end: they go with the process.)
            warn!("connections still open after {DRAIN_TIMEOUT:?}; no longer waiting for them");
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
/// counts are taken once they have ended. Counted by their places
/// (`learner.max_sessions`), taken before the task is spawned: one spawned
/// a moment before the drain ended, and not yet run, counts too.
async fn wait_for_sessions(state: &LearnerState) {
    let open = || state.open_sessions.load(Ordering::Acquire);
    if !within_drain_timeout(|| open() == 0).await {
        warn!(
            open = open(),
            "sessions still open {DRAIN_TIMEOUT:?} after training ended: the final counts leave out what they do from now on"
        );
    }
}

/// The run's last line: what it trained, how fast, and how good.
pub(super) fn log_training_finished(outcome: &TrainingOutcome) {
    let r = &outcome.final_report;
    info!(
        steps = outcome.steps,
        version = outcome.version,
        wall_s = to_the_millisecond(r.wall_s),
        // Numbers when known, left out when not (JSON logs too); to the
        // millisecond, as `quality first reached` gives it.
        time_to_quality_s = outcome.time_to_quality_s.map(to_the_millisecond),
        // Said where the task has a quality target: a time to quality
        // left out may otherwise read as one not logged.
        quality_reached = outcome.quality_reached(),
        // Reached once is not held to the end: the last evaluation's word.
        at_quality = r.at_quality,
        logz_error = r.logz_error(),
        marginal_tv = r.marginal_tv,
        energy_w1 = r.energy_w1,
        // On the lattice, the measure that decides quality (marginals say
        // little without a field).
        exact_tv = r.exact_tv,
        exact_kl = r.exact_kl,
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
        // Handshakes and other calls turned away: an actor of another task
        // sends no chunk to be rejected.
        refused_calls = r.refused_calls(),
        // Sent before their actors heard that training was over.
        late_chunks = r.late_chunks(),
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

impl Running {
    /// Waits for training to end: by itself, at a stop (`shutdown`), or
    /// when every local actor has exited; then stops taking work.
    pub(super) async fn until_training_ends<S: Future<Output: Into<StopRequest>>>(
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
                    info!("stop for a restart requested: finishing the current step (and the next, if its batch is ready, and an evaluation or checkpoint under way); the actors will be told to reconnect");
                    if self.checkpoints_off {
                        warn!("checkpoints are off (learner.checkpoint_dir = \"\"): the learner started again starts over from version 0");
                    }
                } else {
                    info!("shutdown requested: finishing the current step (and the next, if its batch is ready, and an evaluation or checkpoint under way)");
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
        // Sessions waiting to learn that training is done stop waiting
        // now, whether it finished or failed (`done` never comes then).
        self.trainer_ended.send_replace(true);
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
    pub(super) async fn close<S: Future<Output: Into<StopRequest>>>(
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
        if drain_connections(self.server, stop_now, ending.stop_requested).await? {
            wait_for_sessions(&self.state).await;
        }
        // A restart asked for once the last step was done (during its
        // evaluation or final checkpoint) finds the run over: the actors
        // were told so (see `session::restarting`).
        let restarting = crate::session::restarting(&self.state);
        if ending.restart && !restarting {
            info!(
                "training reached max_steps before the restart asked for: the actors were told that training is over"
            );
        }
        if let Some(actors) = self.local_actors {
            if restarting {
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
        outcome.sessions_ended = IngestStats::get(&stats.sessions_ended);
        // Sessions go on counting after the last step (chunks in flight,
        // refusals, lost chunks, what was never trained): the last report
        // takes their final values, so that the run's accounts close.
        outcome.final_report.count_from(stats);
        // As does the publisher's (the final version, encoded for a
        // session that took it at the end). The credit room and what is
        // in flight stay the last step's: after the drain they are empty.
        outcome.final_report.weight_versions_encoded = self.state.publisher.encodings();
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
