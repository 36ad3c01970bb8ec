//! The `flgfn.v1.Learner` gRPC service: the handshake, and one
//! [`session`](crate::session) per connected actor. A Session call may
//! carry its handshake itself (one round trip instead of two); it is
//! checked and counted as a Handshake call's.
//!
//! Proto types are converted to domain types on arrival; everything refused
//! goes through [`RequestError`] and its single conversion to `Status`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flgfn_common::config::LearnerConfig;
use flgfn_common::env::{Environment, TaskSpec};
use flgfn_common::policy::ModelSpec;
use flgfn_common::trajectory::ReplayedTrajectory;
use flgfn_common::wire::proto::{self, learner_server::Learner};
use flgfn_common::wire::{
    self, ACTOR_ID_HEADER, HANDSHAKE_HEADER, HANDSHAKE_REPLY_HEADER, PROTOCOL_VERSION,
    SESSION_KEY_HEADER, TRAJECTORIES_PER_CHUNK_HEADER,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Binary, MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, error_span, info, warn};

use crate::connections::{ConnectionInfo, HandshakeHandled};
use crate::credits::Controller;
use crate::error::RequestError;
use crate::ingest::{IngestStats, QueuedChunk};
use crate::publisher::Publisher;

/// What every session shares.
pub struct LearnerState {
    /// The learner's own environment: replays and validates trajectories.
    pub env: Arc<dyn Environment>,
    /// Compared with the actor's at the handshake.
    pub task: TaskSpec,
    /// Compared with the actor's at the handshake.
    pub model: ModelSpec,
    /// Whether the objective uses truncated prefixes.
    pub keep_truncated: bool,
    /// Advertised at the handshake: the largest message decoded.
    pub max_message_bytes: usize,
    /// Advertised at the handshake: the largest message sent (weights;
    /// `learner.max_message_bytes`), so that an actor whose own setting
    /// is lower still takes them.
    pub max_grant_bytes: usize,
    /// Most trajectories an actor may declare per chunk.
    pub max_chunk_trajectories: usize,
    /// Most bytes of replayed chunks one session may hold
    /// (`learner.max_session_bytes`); its credits stop there.
    pub max_session_bytes: u64,
    /// An actor gets new weights only when its own are this many versions
    /// old.
    pub weights_refresh_steps: u64,
    /// `learner.max_policy_lag`: a session whose chunks arrive this old
    /// or older, two in a row, pauses its credits.
    pub max_policy_lag: u64,
    /// The step the batch being built will train at, written by the batch
    /// builder: a chunk's lag is measured against it, as the batch builder
    /// measures it (the latest published version is a step or two behind,
    /// more with `publish_every` > 1).
    pub next_training_step: Arc<AtomicU64>,
    /// `learner.stall_timeout_s`: a session whose actor holds a credit
    /// this long without sending its chunk, or takes no grant for this
    /// long, is ended and its credits go back to the room.
    pub stalled_after: std::time::Duration,
    /// Last actor id handed out; ids start at 1.
    pub last_actor_id: AtomicU64,
    /// Hands out credits.
    pub credits: Controller,
    /// Validated chunks for the trainer. Bounded by credits: a chunk is
    /// only accepted for a credit, and credits only cover the pool's room.
    pub queue: mpsc::Sender<QueuedChunk>,
    /// Weight versions.
    pub publisher: Arc<Publisher>,
    /// Counters for reports.
    pub stats: Arc<IngestStats>,
    /// Runs replay and validation off the async workers.
    pub ingest_pool: crate::session::IngestPool,
    /// Most sessions open at once (`learner.max_sessions`); each holds
    /// buffers and a place in the credit rotation.
    pub max_sessions: usize,
    /// Sessions open now.
    pub open_sessions: std::sync::atomic::AtomicUsize,
    /// Each actor name's last chunk number, for counting lost chunks.
    pub sequences: crate::ingest::SequenceBook,
    /// Set when the stop asked for is a restart's (SIGUSR1): sessions
    /// then end telling their actors to reconnect, not that training is
    /// over. Set before the stop reaches the trainer, so before any
    /// session can see training end.
    pub stopping_for_restart: std::sync::atomic::AtomicBool,
    /// Turns true once training is to end: a stop asked for (a signal,
    /// every local actor gone), or training's own end. A session whose
    /// credits stopped then waits for training's end for as long as the
    /// trainer takes to wind down.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Turns true once the trainer has ended, however it ended: a session
    /// waiting to learn that training is done stops waiting when it never
    /// will be (the trainer failed).
    pub trainer_ended: tokio::sync::watch::Receiver<bool>,
}

/// The gRPC service: a thin shell over [`LearnerState`].
#[derive(Clone)]
pub struct LearnerService {
    /// Shared with every session task; set once the learner is ready
    /// (a checkpoint loaded, the trainer running).
    pub ready: tokio::sync::watch::Receiver<Option<Arc<LearnerState>>>,
}

impl LearnerService {
    /// The learner's state, once it is ready: a call that comes while it
    /// loads its checkpoint waits (the caller's deadline permitting).
    async fn state(&self) -> Result<Arc<LearnerState>, Status> {
        let mut ready = self.ready.clone();
        let state = ready
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::unavailable("the learner stopped before it was ready"))?;
        state
            .as_ref()
            .cloned()
            .ok_or_else(|| Status::unavailable("the learner is not ready"))
    }
}

type GrantStream = Pin<Box<dyn Stream<Item = Result<proto::Grant, Status>> + Send>>;

/// Grants buffered towards one actor: a grant is small unless it carries
/// weights, and a session waits rather than buffer more.
const GRANT_BUFFER: usize = 4;

/// Reads a numeric header of the Session call.
fn header(metadata: &MetadataMap, name: &'static str) -> Result<u64, RequestError> {
    let value = metadata.get(name).ok_or(RequestError::Missing(name))?;
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| RequestError::Malformed(format!("header `{name}` is not a number")))
}

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn handshake(
        &self,
        request: Request<proto::HandshakeRequest>,
    ) -> Result<Response<proto::HandshakeReply>, Status> {
        HandshakeHandled::mark(&request);
        let peer = peer_name(ConnectionInfo::of(&request));
        let state = &self.state().await?;
        let request = request.into_inner();
        state.check_handshake(&request).map_err(|error| {
            state.refused(Call::Handshake, error, &peer, Some(&request.actor_name))
        })?;
        Ok(Response::new(state.join(request.actor_name, &peer, false)))
    }

    type SessionStream = GrantStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::TrajectoryChunk>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = peer_name(ConnectionInfo::of(&request));
        let state = self.state().await?;
        let refused = |error: RequestError| state.refused(Call::Session, error, &peer, None);
        let opening = match request.metadata().get_bin(HANDSHAKE_HEADER) {
            Some(handshake) => state
                .read_handshake(request.metadata(), handshake)
                .map_err(|(error, actor)| {
                    state.refused(Call::Handshake, error, &peer, actor.as_deref())
                })?,
            None => state.check_session(request.metadata()).map_err(refused)?,
        };
        let Some(slot) = crate::session::SessionSlot::claim(&state) else {
            // A flood logs a few lines (see `IngestStats::refuse`).
            if let Some(refused_so_far) = state.stats.refuse("too_many_sessions") {
                warn!(
                    %peer,
                    max_sessions = state.max_sessions,
                    refused_so_far,
                    "refused a session beyond learner.max_sessions"
                );
            }
            return Err(Status::resource_exhausted(format!(
                "the learner already serves {} sessions (learner.max_sessions)",
                state.max_sessions
            )));
        };
        let (issued, reply) = match opening {
            Opening::Issued(issued) => (issued, None),
            // Issued an id only once it has a place: a session that shakes
            // hands itself and is refused leaves no handshake waiting.
            Opening::Joining {
                handshake,
                chunk_bytes,
            } => {
                let reply = state.join(handshake.actor_name, &peer, true);
                let issued = Issued {
                    actor_id: reply.actor_id,
                    session_key: reply.session_key.clone(),
                    per_chunk: u64::from(handshake.trajectories_per_chunk),
                    chunk_bytes,
                };
                (issued, Some(reply))
            }
        };
        let Issued {
            actor_id,
            session_key,
            per_chunk,
            chunk_bytes,
        } = issued;
        // The handshake's id is used up here (not by a refusal above: an
        // actor may retry a full learner with it).
        let Some(actor_name) = state.sequences.opened(actor_id, &session_key) else {
            // A concurrent session took it first.
            return Err(refused(RequestError::UnknownActor(actor_id)));
        };
        // Every event of the session carries who it is (JSON logs). At the
        // error level, so that a log filtered to warnings keeps these
        // fields on the warnings it shows.
        let span = error_span!("session", actor_id, actor = %actor_name.0, %peer);
        let (grants, outbound) = mpsc::channel(GRANT_BUFFER);
        let session = crate::session::Session {
            slot,
            state,
            actor_id,
            trajectories_per_chunk: per_chunk as usize,
            chunk_bytes,
            inbound: request.into_inner(),
            grants,
            opened_at: std::time::Instant::now(),
            actor_name,
        };
        tokio::spawn(session.run().instrument(span));
        let mut response: Response<Self::SessionStream> =
            Response::new(Box::pin(ReceiverStream::new(outbound)));
        if let Some(reply) = reply {
            response.metadata_mut().insert_bin(
                HANDSHAKE_REPLY_HEADER,
                MetadataValue::from_bytes(&reply.encode_to_vec()),
            );
        }
        Ok(response)
    }
}

/// What a refusal was of, for its counter and its log line.
#[derive(Clone, Copy)]
enum Call {
    /// A handshake: a Handshake call's, or a Session's own.
    Handshake,
    /// The opening of a session, or a chunk on it.
    Session,
}

/// What the headers of a Session call open it with.
enum Opening {
    /// The id and session key an earlier Handshake call issued.
    Issued(Issued),
    /// A handshake of its own, checked; the id is issued once the session
    /// has a place.
    Joining {
        handshake: proto::HandshakeRequest,
        chunk_bytes: u64,
    },
}

/// A handshake's id and session key, with the trajectories per chunk it
/// declared and the bytes one such chunk may hold replayed.
struct Issued {
    actor_id: u64,
    session_key: String,
    per_chunk: u64,
    chunk_bytes: u64,
}

impl LearnerState {
    /// Counts and logs a refusal of `call` and turns it into its status
    /// (counted as `handshake_<reason>` or `session_<reason>`). A client
    /// looping refused calls logs a few lines per reason (see
    /// [`IngestStats::refuse`]), not one per call. The actor's name, where its
    /// handshake gave one, says which of a node's actors it is.
    fn refused(&self, call: Call, error: RequestError, peer: &str, actor: Option<&str>) -> Status {
        let (prefix, what) = match call {
            Call::Handshake => ("handshake", "refused an actor"),
            Call::Session => ("session", "refused a session"),
        };
        let reason = format!("{prefix}_{}", error.reason());
        if let Some(refused_so_far) = self.stats.refuse(&reason) {
            let actor = actor.map(|name| crate::error::clip(name.to_owned()));
            let actor = actor.as_deref().map(tracing::field::display);
            warn!(%peer, actor, %error, refused_so_far, "{what}");
        }
        Status::from(error)
    }

    /// Checks a handshake: the protocol version, task, model and chunk
    /// size. Returns the bytes one chunk may hold replayed.
    fn check_handshake(&self, request: &proto::HandshakeRequest) -> Result<u64, RequestError> {
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(RequestError::ProtocolVersion {
                actor: request.protocol_version,
                learner: PROTOCOL_VERSION,
            });
        }
        let task: TaskSpec = request
            .task
            .clone()
            .ok_or(RequestError::Missing("task"))?
            .into();
        if task != self.task {
            return Err(RequestError::task_mismatch(&task, &self.task));
        }
        let model: ModelSpec = request
            .model
            .clone()
            .ok_or(RequestError::Missing("model"))?
            .into();
        if model != self.model {
            return Err(RequestError::model_mismatch(&model, &self.model));
        }
        self.check_chunk_size(
            u64::from(request.trajectories_per_chunk),
            "trajectories_per_chunk",
        )
    }

    /// Hands out an actor id and session key to a checked handshake, a
    /// Session's own where `in_session`.
    fn join(&self, actor_name: String, peer: &str, in_session: bool) -> proto::HandshakeReply {
        let actor_id = self.last_actor_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = crate::error::clip(actor_name);
        let session_key = self.sequences.joined(actor_id, &name);
        info!(
            %peer,
            actor = %name,
            actor_id,
            handshake_in_session = in_session,
            "actor joined"
        );
        proto::HandshakeReply {
            actor_id,
            task: Some((&self.task).into()),
            model: Some((&self.model).into()),
            version: self.publisher.latest_version(),
            max_message_bytes: self.max_message_bytes as u64,
            max_grant_bytes: self.max_grant_bytes as u64,
            session_key,
            drops_truncated: !self.keep_truncated,
        }
    }

    /// Reads the handshake a Session call carries in place of an earlier
    /// Handshake's id and key, and checks it as that call would. A refusal
    /// comes with the actor's name where the handshake could be read.
    fn read_handshake(
        &self,
        metadata: &MetadataMap,
        handshake: &MetadataValue<Binary>,
    ) -> Result<Opening, (RequestError, Option<String>)> {
        if let Some(name) = [
            ACTOR_ID_HEADER,
            SESSION_KEY_HEADER,
            TRAJECTORIES_PER_CHUNK_HEADER,
        ]
        .into_iter()
        .find(|name| metadata.contains_key(*name))
        {
            return Err((
                RequestError::Malformed(format!(
                    "header `{name}` beside `{HANDSHAKE_HEADER}`: a session that shakes hands itself carries its handshake alone (the other headers open the session of an earlier Handshake call)"
                )),
                None,
            ));
        }
        // (Prost's error names the field at fault, as the Handshake
        // call's does.)
        let handshake = handshake
            .to_bytes()
            .map_err(|error| format!("is not base64 ({error})"))
            .and_then(|bytes| {
                proto::HandshakeRequest::decode(bytes)
                    .map_err(|error| format!("does not decode as a HandshakeRequest: {error}"))
            })
            .map_err(|why| {
                let error = RequestError::Malformed(format!("header `{HANDSHAKE_HEADER}` {why}"));
                (error, None)
            })?;
        let chunk_bytes = self
            .check_handshake(&handshake)
            .map_err(|error| (error, Some(handshake.actor_name.clone())))?;
        Ok(Opening::Joining {
            handshake,
            chunk_bytes,
        })
    }

    /// Checks the headers that open a session: the actor id and session
    /// key its handshake issued, and its trajectories per chunk. Returns
    /// them with the bytes one chunk may hold replayed.
    fn check_session(&self, metadata: &MetadataMap) -> Result<Opening, RequestError> {
        let actor_id = header(metadata, ACTOR_ID_HEADER)?;
        let session_key = metadata
            .get(SESSION_KEY_HEADER)
            .ok_or(RequestError::Missing(SESSION_KEY_HEADER))?
            .to_str()
            .map_err(|_| {
                RequestError::Malformed(format!("header `{SESSION_KEY_HEADER}` is not text"))
            })?
            .to_owned();
        // Only through a handshake of this process, which checked the
        // actor's task and model: not an id from before a restart, nor
        // one whose session already opened, nor one shaken hands for by
        // another client (ids are issued in order; the key is random).
        if !self.sequences.pending(actor_id, &session_key) {
            return Err(RequestError::UnknownActor(actor_id));
        }
        let per_chunk = header(metadata, TRAJECTORIES_PER_CHUNK_HEADER)?;
        let chunk_bytes = self.check_chunk_size(per_chunk, TRAJECTORIES_PER_CHUNK_HEADER)?;
        Ok(Opening::Issued(Issued {
            actor_id,
            session_key,
            per_chunk,
            chunk_bytes,
        }))
    }

    /// An actor's declared trajectories per chunk, checked against this
    /// learner's [`ChunkLimits`]. Returns what one such chunk holds,
    /// replayed, at most.
    pub(crate) fn check_chunk_size(
        &self,
        per_chunk: u64,
        field: &str,
    ) -> Result<u64, RequestError> {
        ChunkLimits {
            max_chunk_trajectories: self.max_chunk_trajectories,
            credit_ceiling: self.credits.pool().ceiling(),
            max_message_bytes: self.max_message_bytes,
            max_session_bytes: self.max_session_bytes,
        }
        .check(self.env.as_ref(), per_chunk, field)
    }
}

/// What an actor's chunks must fit: checked at its handshake, and for a
/// learner's local actors before it starts (they would each be refused).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkLimits {
    /// `learner.max_chunk_trajectories`.
    pub max_chunk_trajectories: usize,
    /// The credit pool's largest room, in transitions.
    pub credit_ceiling: u64,
    /// The largest message decoded.
    pub max_message_bytes: usize,
    /// `learner.max_session_bytes`.
    pub max_session_bytes: u64,
}

impl ChunkLimits {
    /// A learner's limits as configured. (Its decode limit may be lower
    /// than `max_message_bytes`, never for a chunk within
    /// `max_chunk_trajectories`: [`crate::transport::accepted_message_bytes`].)
    pub(crate) fn of(learner: &LearnerConfig) -> Self {
        ChunkLimits {
            max_chunk_trajectories: learner.max_chunk_trajectories,
            credit_ceiling: learner.credit_ceiling(),
            max_message_bytes: learner.max_message_bytes,
            max_session_bytes: learner.max_session_bytes,
        }
    }

    /// Trajectories per chunk (`per_chunk`, declared as `field`) must be
    /// at least 1, at most `max_chunk_trajectories`, and fit the credit
    /// room, the decode limit and a session's memory. Returns what one
    /// such chunk of `env` holds, replayed, at most.
    pub(crate) fn check(
        &self,
        env: &dyn Environment,
        per_chunk: u64,
        field: &str,
    ) -> Result<u64, RequestError> {
        let max = self.max_chunk_trajectories as u64;
        if per_chunk == 0 || per_chunk > max {
            return Err(RequestError::Malformed(format!(
                "`{field}` is {per_chunk}; this learner accepts 1 to {max} (learner.max_chunk_trajectories): lower actor.envs, or raise that"
            )));
        }
        let max_len = env.max_trajectory_len();
        // Saturating: a learner configured with an absurd
        // max_chunk_trajectories must refuse such a chunk, not wrap.
        let reserve = per_chunk.saturating_mul(max_len as u64);
        let ceiling = self.credit_ceiling;
        if reserve > ceiling {
            return Err(RequestError::Malformed(format!(
                "`{field}` is {per_chunk}: a chunk of up to {reserve} transitions does not fit the learner's largest credit room of {ceiling} transitions (learner.max_batch_transitions x learner.max_in_flight_batches); lower actor.envs"
            )));
        }
        // A chunk is decoded whole: one that may not fit the decode limit
        // would be refused as too large mid-run, after its rollout.
        let message = wire::largest_chunk_bytes(per_chunk as usize, max_len);
        if message > self.max_message_bytes {
            return Err(RequestError::Malformed(format!(
                "`{field}` is {per_chunk}: a chunk of up to {message} bytes does not fit the {} bytes this learner decodes (learner.max_message_bytes); lower actor.envs or raise learner.max_message_bytes",
                self.max_message_bytes
            )));
        }
        let chunk_bytes =
            per_chunk.saturating_mul(ReplayedTrajectory::max_held_bytes(env, max_len) as u64);
        if chunk_bytes > self.max_session_bytes {
            return Err(RequestError::SessionMemory {
                field: field.to_owned(),
                per_chunk,
                chunk_bytes,
                limit: self.max_session_bytes,
            });
        }
        Ok(chunk_bytes)
    }
}

/// The peer's address for logs ("unknown" where the transport has none).
pub(crate) fn peer_name(connection: Option<&ConnectionInfo>) -> String {
    connection
        .and_then(ConnectionInfo::remote_addr)
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}
