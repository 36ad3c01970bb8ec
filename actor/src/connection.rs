//! One connection to the learner: handshake, weight subscription and the
//! trajectory stream, until training ends or the connection breaks.
//!
//! The caller ([`crate::run`]) reconnects with backoff when a session ends
//! with [`SessionError::Retry`]; a refusal ([`SessionError::Refused`]) is
//! final, since retrying cannot fix a mismatched task or a malformed chunk.

use std::sync::Arc;
use std::time::Duration;

use flgfn_common::env::TaskSpec;
use flgfn_common::policy::ModelSpec;
use flgfn_common::wire::PROTOCOL_VERSION;
use flgfn_common::wire::proto::{self, learner_client::LearnerClient};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing::info;

use crate::worker::{SampledChunk, Weights};

/// How long to wait for the final weights after the learner closed the
/// trajectory stream, to tell "training over" from "learner went away".
/// Generous: on Ctrl-C the learner finishes its current step, which may
/// include an evaluation, before it publishes the final weights.
const FINAL_UPDATE_GRACE: Duration = Duration::from_secs(10);

/// A learner that accepts the connection but never answers is as good as
/// gone.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The learner sent its final weights: training is over.
    TrainingDone,
    /// The rollout worker stopped (the actor is shutting down).
    WorkerStopped,
}

/// How a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The learner refused this actor or its data; retrying cannot help.
    #[error("the learner refused this actor: {}", .0.message())]
    Refused(Status),
    /// The connection failed or broke; worth another try. `handshake_done`
    /// says whether the learner accepted us first (which resets backoff).
    #[error("{message}")]
    Retry {
        /// What happened.
        message: String,
        /// Whether the handshake had succeeded in this session.
        handshake_done: bool,
    },
}

/// What a session needs from the actor.
pub struct Session<'a> {
    /// Learner URL.
    pub url: &'a str,
    /// Shown in the learner's logs.
    pub actor_name: &'a str,
    /// Sent at the handshake.
    pub task: &'a TaskSpec,
    /// Sent at the handshake.
    pub model: &'a ModelSpec,
    /// Largest gRPC message either way.
    pub max_message_bytes: usize,
    /// Chunks from the rollout worker.
    pub chunks: &'a mut mpsc::Receiver<SampledChunk>,
    /// Where received weights go.
    pub weights: &'a watch::Sender<Option<Arc<Weights>>>,
    /// Chunks and transitions handed to gRPC, across sessions. Client
    /// streaming has no per-message acknowledgement: up to a couple of
    /// chunks in flight when a connection breaks are lost, and show as gaps
    /// in `sequence`.
    pub sent: &'a mut (u64, u64),
    /// Actor id of the latest handshake.
    pub actor_id: &'a mut u64,
    /// Number of this session (1, 2, ...), stamped on received weights.
    pub session: u32,
    /// Chunks dropped because weights of an earlier session sampled them.
    pub dropped: &'a mut u64,
}

fn retry(message: impl Into<String>, handshake_done: bool) -> SessionError {
    SessionError::Retry {
        message: message.into(),
        handshake_done,
    }
}

/// Refusals are final; anything else (unavailable, reset, ...) is retried.
fn classify(status: Status, handshake_done: bool) -> SessionError {
    match status.code() {
        Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated => SessionError::Refused(status),
        _ => retry(
            format!("{}: {}", status.code(), status.message()),
            handshake_done,
        ),
    }
}

impl Session<'_> {
    /// Runs one connection to its end.
    pub async fn run(self) -> Result<SessionEnd, SessionError> {
        let endpoint = Endpoint::from_shared(self.url.to_owned())
            .map_err(|e| {
                SessionError::Refused(Status::invalid_argument(format!("actor.learner: {e}")))
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // Notice a learner host that vanished without closing the
            // connection (power loss, partition) and reconnect.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| retry(format!("cannot connect to {}: {e}", self.url), false))?;
        let mut client = LearnerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        let handshake = client.handshake(proto::HandshakeRequest {
            protocol_version: PROTOCOL_VERSION,
            actor_name: self.actor_name.to_owned(),
            task: Some(self.task.into()),
            model: Some(self.model.into()),
        });
        let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| retry("the handshake timed out", false))?
            .map_err(|s| classify(s, false))?
            .into_inner();
        // Never send more than the learner accepts.
        let max_bytes = self.max_message_bytes.min(reply.max_message_bytes as usize);
        client = client.max_encoding_message_size(max_bytes);

        let actor_id = reply.actor_id;
        *self.actor_id = actor_id;
        info!(
            actor_id,
            version = reply.version,
            url = self.url,
            "connected to the learner"
        );

        let subscribe = client.subscribe_weights(proto::WeightsRequest { actor_id });
        let mut updates = tokio::time::timeout(HANDSHAKE_TIMEOUT, subscribe)
            .await
            .map_err(|_| retry("the weight subscription timed out", true))?
            .map_err(|s| classify(s, true))?
            .into_inner();
        let weight_slot = self.weights;
        let session = self.session;
        let receive_weights = async {
            loop {
                match updates.message().await {
                    Ok(Some(update)) => {
                        weight_slot.send_replace(Some(Arc::new(Weights {
                            session,
                            version: update.version,
                            bytes: update.weights,
                        })));
                        if update.training_done {
                            return Ok(SessionEnd::TrainingDone);
                        }
                    }
                    Ok(None) => return Err(retry("the learner ended the weight stream", true)),
                    Err(status) => return Err(classify(status, true)),
                }
            }
        };
        tokio::pin!(receive_weights);

        let (upload_sender, upload_receiver) = mpsc::channel(1);
        let mut upload_client = client.clone();
        let upload = upload_client.stream_trajectories(ReceiverStream::new(upload_receiver));
        tokio::pin!(upload);
        let (chunks, sent, dropped) = (self.chunks, self.sent, self.dropped);
        let forward = async {
            loop {
                // Take a chunk from the worker only when the stream can
                // take it, so the worker samples the next one as late as
                // possible.
                let Ok(permit) = upload_sender.reserve().await else {
                    // The stream broke; `upload` reports why.
                    return std::future::pending().await;
                };
                let Some(SampledChunk {
                    session: sampled_in,
                    mut chunk,
                }) = chunks.recv().await
                else {
                    return Ok(SessionEnd::WorkerStopped);
                };
                if sampled_in != session {
                    // Sampled with weights of an earlier session, whose
                    // versions mean nothing to this learner if it restarted.
                    *dropped += 1;
                    continue;
                }
                chunk.actor_id = actor_id;
                let transitions = chunk.transitions() as u64;
                let message = proto::TrajectoryChunk::from(&chunk);
                if message.encoded_len() > max_bytes {
                    // Every chunk would fail alike: retrying cannot help.
                    return Err(SessionError::Refused(Status::invalid_argument(format!(
                        "a chunk encodes to {} bytes, more than the learner accepts ({max_bytes}); lower actor.envs",
                        message.encoded_len()
                    ))));
                }
                permit.send(message);
                sent.0 += 1;
                sent.1 += transitions;
            }
        };
        tokio::pin!(forward);

        tokio::select! {
            biased;
            end = &mut receive_weights => end,
            result = &mut upload => {
                // The learner ended the trajectory stream: either training is
                // over (the final weights are on their way, possibly behind
                // this status) or it is going away. The weight stream tells
                // which; a refusal needs no waiting.
                let ended = match result {
                    Ok(_) => retry("the learner closed the trajectory stream", true),
                    Err(status) => classify(status, true),
                };
                if matches!(ended, SessionError::Refused(_)) {
                    return Err(ended);
                }
                match tokio::time::timeout(FINAL_UPDATE_GRACE, &mut receive_weights).await {
                    Ok(Ok(end)) => Ok(end),
                    Ok(Err(_)) | Err(_) => Err(ended),
                }
            }
            end = &mut forward => end,
        }
    }
}
