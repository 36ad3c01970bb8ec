//! The `flgfn.v1.Learner` gRPC service: handshake, trajectory ingest and
//! weight subscription.
//!
//! Proto types are converted to domain types on arrival; everything refused
//! goes through [`RequestError`] and its single conversion to `Status`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flgfn_common::env::{Environment, TaskSpec};
use flgfn_common::policy::ModelSpec;
use flgfn_common::trajectory::TrajectoryChunk;
use flgfn_common::wire::PROTOCOL_VERSION;
use flgfn_common::wire::proto::{self, learner_server::Learner};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::error::RequestError;
use crate::ingest::{IngestContext, IngestStats, IngestedChunk, ingest_chunk};
use crate::publisher::WeightsSnapshot;

/// State the service handlers share.
pub struct LearnerService {
    /// The learner's own environment: replays and validates trajectories.
    pub env: Arc<dyn Environment>,
    /// Compared with the actor's at the handshake.
    pub task: TaskSpec,
    /// Compared with the actor's at the handshake.
    pub model: ModelSpec,
    /// Whether the objective uses truncated prefixes.
    pub keep_truncated: bool,
    /// Chunks sampled more than this many steps before the latest version
    /// are dropped.
    pub max_policy_lag: u64,
    /// Advertised at the handshake.
    pub max_message_bytes: usize,
    /// Larger chunks are refused.
    pub max_chunk_trajectories: usize,
    /// Last actor id handed out; ids start at 1.
    pub last_actor_id: AtomicU64,
    /// Bounded queue to the trainer: a full queue suspends the reading of
    /// trajectory streams, which is how backpressure reaches actors.
    pub queue: mpsc::Sender<IngestedChunk>,
    /// Latest weights.
    pub weights: watch::Receiver<Arc<WeightsSnapshot>>,
    /// Counters for reports.
    pub stats: Arc<IngestStats>,
    /// Turns true when the learner stops: open streams end.
    pub stop: watch::Receiver<bool>,
}

/// Decrements the connected-actor count when a stream ends, however it ends.
struct ConnectedGuard(Arc<IngestStats>);

impl ConnectedGuard {
    fn new(stats: Arc<IngestStats>) -> Self {
        stats.connected_actors.fetch_add(1, Ordering::Relaxed);
        ConnectedGuard(stats)
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.connected_actors.fetch_sub(1, Ordering::Relaxed);
    }
}

type WeightStream = Pin<Box<dyn Stream<Item = Result<proto::WeightUpdate, Status>> + Send>>;

impl LearnerService {
    fn context(&self) -> IngestContext {
        IngestContext {
            last_actor_id: self.last_actor_id.load(Ordering::Relaxed),
            latest_version: self.weights.borrow().version,
            keep_truncated: self.keep_truncated,
            max_trajectories: self.max_chunk_trajectories,
        }
    }

    /// Validates one chunk and counts it. `Ok(None)` when there is
    /// nothing to train on: dropped as stale (valid, but sampled by a policy
    /// too old), or emptied because its truncated prefixes are unusable.
    fn validate(
        &self,
        message: proto::TrajectoryChunk,
    ) -> Result<Option<IngestedChunk>, RequestError> {
        let wire_bytes = message.encoded_len() as u64;
        let chunk = TrajectoryChunk::try_from(message)
            .map_err(|status| RequestError::Malformed(status.message().to_owned()))?;
        let context = self.context();
        let ingested = ingest_chunk(self.env.as_ref(), chunk, context)?;
        let stats = &self.stats;
        IngestStats::add(&stats.accepted_chunks, 1);
        IngestStats::add(&stats.wire_bytes, wire_bytes);
        IngestStats::add(&stats.accepted_transitions, ingested.transitions as u64);
        IngestStats::add(
            &stats.unusable_truncated_transitions,
            ingested.unusable_transitions as u64,
        );
        if context.latest_version - ingested.policy_version > self.max_policy_lag {
            IngestStats::add(&stats.stale_transitions, ingested.transitions as u64);
            return Ok(None);
        }
        Ok((ingested.transitions > 0).then_some(ingested))
    }
}

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn handshake(
        &self,
        request: Request<proto::HandshakeRequest>,
    ) -> Result<Response<proto::HandshakeReply>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(RequestError::ProtocolVersion {
                actor: request.protocol_version,
                learner: PROTOCOL_VERSION,
            }
            .into());
        }
        let task: TaskSpec = request.task.ok_or(RequestError::Missing("task"))?.into();
        if task != self.task {
            let error = RequestError::task_mismatch(&task, &self.task);
            warn!(?peer, %error, "refused an actor");
            return Err(error.into());
        }
        let model: ModelSpec = request.model.ok_or(RequestError::Missing("model"))?.into();
        if model != self.model {
            let error = RequestError::model_mismatch(&model, &self.model);
            warn!(?peer, %error, "refused an actor");
            return Err(error.into());
        }
        let actor_id = self.last_actor_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = crate::error::clip(request.actor_name);
        info!(?peer, actor = %name, actor_id, "actor joined");
        Ok(Response::new(proto::HandshakeReply {
            actor_id,
            task: Some((&self.task).into()),
            model: Some((&self.model).into()),
            version: self.weights.borrow().version,
            max_message_bytes: self.max_message_bytes as u64,
        }))
    }

    async fn stream_trajectories(
        &self,
        request: Request<Streaming<proto::TrajectoryChunk>>,
    ) -> Result<Response<proto::StreamSummary>, Status> {
        let _connected = ConnectedGuard::new(self.stats.clone());
        let mut stream = request.into_inner();
        let mut stop = self.stop.clone();
        let mut summary = proto::StreamSummary::default();
        loop {
            let message = tokio::select! {
                message = stream.message() => message.inspect_err(|status| {
                    // Undecodable or oversized: refused by tonic before
                    // validation, but still a refused chunk. A vanished
                    // actor is not.
                    if matches!(status.code(), Code::OutOfRange | Code::Internal | Code::InvalidArgument | Code::ResourceExhausted) {
                        IngestStats::add(&self.stats.rejected_chunks, 1);
                        warn!(status = %status.message(), "unreadable trajectory chunk");
                    }
                })?,
                _ = stop.wait_for(|stopped| *stopped) => None,
            };
            let Some(message) = message else {
                return Ok(Response::new(summary));
            };
            let actor_id = message.actor_id;
            let ingested = self.validate(message).inspect_err(|error| {
                IngestStats::add(&self.stats.rejected_chunks, 1);
                warn!(actor_id, %error, "refused a trajectory chunk");
            })?;
            summary.accepted_chunks += 1;
            let Some(ingested) = ingested else {
                continue;
            };
            summary.accepted_transitions += ingested.transitions as u64;
            // Waiting here for room in the queue stops this stream from
            // being read; HTTP/2 flow control then holds the actor back.
            tokio::select! {
                sent = self.queue.send(ingested) => sent.map_err(|_| RequestError::ShuttingDown)?,
                _ = stop.wait_for(|stopped| *stopped) => return Ok(Response::new(summary)),
            }
        }
    }

    type SubscribeWeightsStream = WeightStream;

    async fn subscribe_weights(
        &self,
        request: Request<proto::WeightsRequest>,
    ) -> Result<Response<Self::SubscribeWeightsStream>, Status> {
        let actor_id = request.into_inner().actor_id;
        let mut weights = self.weights.clone();
        // The current version goes out at once, then each newer one.
        weights.mark_changed();
        // One update in flight per subscriber; the watch keeps only the
        // latest, so a slow actor skips versions.
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                // No new version may come for a while: notice a departed
                // subscriber without waiting for one.
                let changed = tokio::select! {
                    () = sender.closed() => break,
                    changed = weights.changed() => changed,
                };
                if changed.is_err() {
                    break;
                }
                let snapshot = weights.borrow_and_update().clone();
                let update = proto::WeightUpdate {
                    version: snapshot.version,
                    weights: snapshot.bytes.clone(),
                    training_done: snapshot.training_done,
                };
                if sender.send(Ok(update)).await.is_err() || snapshot.training_done {
                    break;
                }
            }
            tracing::debug!(actor_id, "weight subscription ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
