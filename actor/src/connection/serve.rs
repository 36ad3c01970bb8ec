//! Serving an open session: grants become orders for the rollout
//! worker, chunks go out, and a stop drains both before the session ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flgfn_common::trajectory::TrajectoryChunk;
use flgfn_common::wire::proto::{self};
use prost::Message;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::worker::{FLUSH_SESSION, Order, SampledChunk, Weights};

use super::open::{Opened, UPLOAD_BUFFER};
use super::status::{classify, retry};
use super::{Counts, Session, SessionEnd, SessionError};

/// How long a stopping actor waits for its rollout in progress, and then
/// for the learner to take the last chunks, before it leaves without them
/// (a rollout still running is then abandoned at its next lockstep step).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a stopping session that failed with `error` ends: a refusal stays
/// one (as outside a stop); anything else, which would be retried, leaves
/// without the learner's word on the last chunks.
pub(super) fn unconfirmed_unless_refused(error: SessionError) -> Result<SessionEnd, SessionError> {
    match error {
        SessionError::Retry { message, .. } => Ok(SessionEnd::StoppedUnconfirmed(message)),
        refused => Err(refused),
    }
}

/// Closes the upload and waits, at most [`DRAIN_TIMEOUT`], for the learner
/// to end the session: it reads every chunk sent before the close first.
/// A refusal of those chunks is one still (as outside a stop), and a
/// learner that finished training meanwhile says so. Its news that
/// training is done does not end the wait: it then counts the chunks
/// still on their way (as arrived after the end), and the stream dropped
/// at once could cut them off.
async fn finish(
    upload: mpsc::Sender<proto::TrajectoryChunk>,
    grants: &mut tonic::Streaming<proto::Grant>,
) -> Result<SessionEnd, SessionError> {
    drop(upload);
    let mut training_done = false;
    let ended = async {
        loop {
            match grants.message().await {
                Ok(Some(grant)) => training_done |= grant.training_done,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
    };
    let ended = tokio::time::timeout(DRAIN_TIMEOUT, ended).await;
    if training_done {
        // Training is over whatever became of the last chunks.
        return Ok(SessionEnd::TrainingDone);
    }
    match ended {
        Ok(Ok(())) => Ok(SessionEnd::Stopped),
        Ok(Err(status)) => unconfirmed_unless_refused(classify(status, true)),
        Err(_) => Ok(SessionEnd::StoppedUnconfirmed(format!(
            "the learner did not end the session within {DRAIN_TIMEOUT:?}"
        ))),
    }
}

/// Ends a session whose rollout worker stopped mid-session (it failed:
/// a stopping actor drains through a flush instead). The chunks it handed
/// to the upload still go out, and the learner counts them before it ends
/// the session: dropping the stream at once could cut them off on their
/// way, and the two sides' counts would then disagree. What the learner
/// said meanwhile stands: training done, or a refusal of those chunks.
async fn worker_stopped(
    upload: mpsc::Sender<proto::TrajectoryChunk>,
    grants: &mut tonic::Streaming<proto::Grant>,
) -> Result<SessionEnd, SessionError> {
    match finish(upload, grants).await? {
        SessionEnd::TrainingDone => Ok(SessionEnd::TrainingDone),
        _ => Ok(SessionEnd::WorkerStopped),
    }
}

/// The weights a grant brought: counted, and recorded as the policy the
/// actor's next rollouts sample with.
fn received_weights(new: proto::Weights, session: u32, counts: &mut Counts) -> Arc<Weights> {
    counts.versions_received += 1;
    flgfn_common::telemetry::record_latest(
        &tracing::Span::current(),
        "policy_version",
        new.version,
    );
    Arc::new(Weights {
        session,
        version: new.version,
        bytes: new.safetensors,
        received_at: std::time::Instant::now(),
    })
}

/// Queues one `order` per credit granted for the rollout worker, never
/// waiting: the session's loop must keep reading grants and forwarding
/// chunks. False where the worker has stopped.
fn queue_orders(
    credits: u32,
    order: &Order,
    orders: &mpsc::Sender<Order>,
    counts: &mut Counts,
) -> Result<bool, SessionError> {
    for _ in 0..credits {
        counts.credits += 1;
        match orders.try_send(order.clone()) {
            Ok(()) => {}
            // The learner holds back credits it would not train on soon
            // (flgfn's: 64 a session at most); one that floods them breaks
            // the protocol, and would again after a reconnect.
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(SessionError::Fatal(format!(
                    "protocol error: the learner granted more than {} credits not yet used",
                    crate::MAX_QUEUED_ORDERS
                )));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
        }
    }
    Ok(true)
}

/// Hands one chunk of this session to the upload, refusing one over the
/// smaller of both sides' message limits (`limit`: its bytes, and whose it
/// is): every chunk would fail alike. Whether it went out (not where the
/// stream broke: the grant side says why). `served`: whether the session
/// has served (see `serve`), for a retry's backoff.
fn send_chunk(
    chunk: TrajectoryChunk,
    (max_bytes, max_bytes_of): (usize, &'static str),
    upload: &mpsc::Sender<proto::TrajectoryChunk>,
    counts: &mut Counts,
    served: bool,
) -> Result<bool, SessionError> {
    let transitions = chunk.transitions() as u64;
    let message = proto::TrajectoryChunk::from(chunk);
    if message.encoded_len() > max_bytes {
        counts.stale_chunks_dropped += 1;
        return Err(SessionError::Fatal(format!(
            "a chunk encodes to {} bytes, more than the {max_bytes} of {max_bytes_of}; lower actor.envs",
            message.encoded_len()
        )));
    }
    match upload.try_send(message) {
        Ok(()) => {
            counts.chunks_sent += 1;
            counts.transitions_sent += transitions;
            Ok(true)
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            counts.stale_chunks_dropped += 1;
            Err(retry(
                format!(
                    "the learner read none of the last {UPLOAD_BUFFER} chunks sent (a stalled link or learner); reconnecting"
                ),
                served,
            ))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            counts.stale_chunks_dropped += 1;
            Ok(false)
        }
    }
}

impl Session<'_> {
    /// Turns grants into orders and forwards chunks until the session ends.
    pub(super) async fn serve<S: Future<Output = ()>>(
        self,
        opened: Opened,
        mut shutdown: Pin<&mut S>,
        stopping: &mut bool,
    ) -> Result<SessionEnd, SessionError> {
        let Opened {
            mut grants,
            upload,
            actor_id,
            max_bytes,
            max_bytes_of,
        } = opened;
        let session = self.session;
        // Set once a grant comes after a chunk went out: only a session
        // that served resets the reconnect backoff and ends an outage. (A
        // chunk handed to the upload proves nothing by itself: a learner,
        // or a proxy before it, that fails every session at its first
        // chunk would be retried at the shortest pause for ever, and
        // `actor.reconnect_attempts` would never run out.)
        let mut served = false;
        let mut chunk_sent = false;
        let drain = tokio::time::sleep(DRAIN_TIMEOUT);
        tokio::pin!(drain);

        let (chunks, counts, orders) = (self.chunks, self.counts, self.orders);
        let progress = self.progress;
        let mut weights: Option<Arc<Weights>> = None;
        loop {
            tokio::select! {
                () = progress.due() => {
                    progress.log(counts, weights.as_ref().map(|w| w.version));
                }
                () = shutdown.as_mut(), if !*stopping => {
                    *stopping = true;
                    // Said now: the drain below may take up to twice
                    // DRAIN_TIMEOUT, silent otherwise until `actor
                    // stopped`.
                    info!(
                        within_s = DRAIN_TIMEOUT.as_secs(),
                        "stop requested: finishing the rollout in progress, then sending what is rolled out (each within the limit)"
                    );
                    drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    // Orders still queued are skipped (the learner takes
                    // their credits back when the session ends); the
                    // worker answers the flush once the rollout in
                    // progress is out, so every chunk is then in `chunks`.
                    self.current_session
                        .store(session | crate::worker::DRAINING, Ordering::Release);
                    let flush = weights.as_ref().map(|weights| Order {
                        session: FLUSH_SESSION,
                        actor_id,
                        weights: weights.clone(),
                    });
                    // No grant yet: nothing was rolled out.
                    let Some(flush) = flush else {
                        return finish(upload, &mut grants).await;
                    };
                    // Behind at most a queue of orders the worker now skips.
                    let queued = tokio::time::timeout(DRAIN_TIMEOUT, orders.send(flush)).await;
                    if !matches!(queued, Ok(Ok(()))) {
                        return finish(upload, &mut grants).await;
                    }
                }
                () = &mut drain, if *stopping => {
                    warn!(after_s = DRAIN_TIMEOUT.as_secs(), "the rollout in progress did not finish; leaving without it");
                    return finish(upload, &mut grants).await;
                }
                grant = grants.message() => {
                    let grant = match grant {
                        Ok(Some(grant)) => grant,
                        // A refusal stays one; anything else ends the drain.
                        Err(status) if *stopping => {
                            return unconfirmed_unless_refused(classify(status, served));
                        }
                        // Before the drain closed the upload: the learner
                        // may not have read the last chunks.
                        Ok(None) if *stopping => {
                            return Ok(SessionEnd::StoppedUnconfirmed(
                                "the learner ended the session before the actor's last chunks were out".to_owned(),
                            ));
                        }
                        Ok(None) => return Err(retry("the learner ended the session", served)),
                        Err(status) => return Err(classify(status, served)),
                    };
                    served |= chunk_sent;
                    if grant.training_done {
                        // The chunks already handed to the upload go out
                        // and the learner counts them (as arrived after
                        // the end) before it ends the session: the two
                        // sides' counts then agree.
                        let _ = finish(upload, &mut grants).await;
                        return Ok(SessionEnd::TrainingDone);
                    }
                    if grant.learner_restarting {
                        // As above: the learner counts what is on its way.
                        // (An actor stopping leaves once that is done, and
                        // says so where it was not.)
                        let drained = finish(upload, &mut grants).await;
                        return Ok(match drained {
                            Ok(unconfirmed @ SessionEnd::StoppedUnconfirmed(_)) if *stopping => {
                                unconfirmed
                            }
                            _ if *stopping => SessionEnd::Stopped,
                            _ => SessionEnd::LearnerRestarting,
                        });
                    }
                    if *stopping {
                        // No new rollouts.
                        continue;
                    }
                    if let Some(new) = grant.weights {
                        weights = Some(received_weights(new, session, counts));
                    }
                    // A grant of no credits needs no weights (a later
                    // learner may send one carrying only fields added since).
                    if grant.credits == 0 {
                        continue;
                    }
                    let Some(weights) = &weights else {
                        return Err(SessionError::Fatal(
                            "protocol error: the learner granted a credit before sending any weights".to_owned(),
                        ));
                    };
                    let order = Order { session, actor_id, weights: weights.clone() };
                    if !queue_orders(grant.credits, &order, orders, counts)? {
                        return worker_stopped(upload, &mut grants).await;
                    }
                }
                sampled = chunks.recv() => {
                    let Some(SampledChunk { session: sampled_in, mut chunk }) = sampled else {
                        return worker_stopped(upload, &mut grants).await;
                    };
                    if sampled_in == FLUSH_SESSION {
                        // Every chunk rolled out is sent.
                        return finish(upload, &mut grants).await;
                    }
                    if sampled_in != session {
                        // Its credit died with an earlier session.
                        counts.stale_chunks_dropped += 1;
                        continue;
                    }
                    chunk.actor_id = actor_id;
                    if send_chunk(chunk, (max_bytes, max_bytes_of), &upload, counts, served)? {
                        chunk_sent = true;
                    }
                }
            }
        }
    }
}
