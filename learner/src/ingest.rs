//! Ingest: turns a wire chunk into replayed, validated trajectories and
//! keeps the counters the reports read.
//!
//! Validation happens here, at the edge and off the trainer thread: the
//! actor must be known, its policy version must exist, and every action must
//! be legal in the learner's own environment. A chunk is accepted or refused
//! whole, so a refused chunk never leaves half its trajectories behind.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use flgfn_common::env::Environment;
use flgfn_common::trajectory::{ReplayedTrajectory, TrajectoryChunk, replay};

use crate::credits::CreditToken;
use crate::error::RequestError;

/// A validated chunk, ready for the trainer.
#[derive(Debug)]
pub struct IngestedChunk {
    /// The actor that sent it.
    pub actor_id: u64,
    /// The weight version that sampled it; the trainer measures lag from it.
    pub policy_version: u64,
    /// Replayed trajectories (truncated ones dropped if the objective cannot
    /// use them).
    pub trajectories: Vec<ReplayedTrajectory>,
    /// Transitions in `trajectories`.
    pub transitions: usize,
    /// Transitions of truncated trajectories dropped because the objective
    /// cannot learn from them.
    pub unusable_transitions: usize,
}

/// A validated chunk waiting for the trainer, with the credit it was sent
/// for: dropping the credit (once the chunk is in a batch, or dropped as
/// stale) returns its room to the pool.
#[derive(Debug)]
pub struct QueuedChunk {
    /// The data.
    pub chunk: IngestedChunk,
    /// Room reserved for it.
    pub credit: CreditToken,
}

/// What the learner counted for one actor session, recorded when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionRecord {
    /// From the handshake.
    pub actor_id: u64,
    /// Credits granted: rollouts the actor was allowed to start.
    pub credits_granted: u64,
    /// Chunks received and accepted.
    pub chunks_received: u64,
    /// Weight versions sent.
    pub versions_sent: u64,
    /// Bytes of those weights.
    pub weight_bytes: u64,
}

/// Session records kept for the final outcome; beyond this many only the
/// totals in [`IngestStats`] grow.
pub const MAX_SESSION_RECORDS: usize = 4096;

/// Counters shared by the service and the trainer. Relaxed atomics: they
/// feed reports, not control flow.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Chunks that passed validation.
    pub accepted_chunks: AtomicU64,
    /// Usable transitions in accepted chunks (counted before stale chunks
    /// are dropped).
    pub accepted_transitions: AtomicU64,
    /// Credits granted to actors.
    pub credits_granted: AtomicU64,
    /// Weight versions sent to actors (one per grant that carried weights).
    pub weight_versions_sent: AtomicU64,
    /// Bytes of those weights.
    pub weight_bytes: AtomicU64,
    /// Sum over weights sent of the microseconds from their publication to
    /// their sending.
    pub publish_to_send_us: AtomicU64,
    /// Encoded protobuf bytes of accepted chunks.
    pub wire_bytes: AtomicU64,
    /// Chunks refused as invalid.
    pub rejected_chunks: AtomicU64,
    /// Refused chunks by reason ([`RequestError::reason`](crate::error::RequestError::reason),
    /// `undecodable`, `too_large`).
    pub rejections: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Transitions dropped where the batch is built because the policy
    /// that sampled them was more than `max_policy_lag` steps old.
    pub stale_transitions: AtomicU64,
    /// Transitions of truncated trajectories the objective cannot use.
    pub unusable_truncated_transitions: AtomicU64,
    /// Open sessions.
    pub connected_actors: AtomicI64,
    /// Ended sessions, up to [`MAX_SESSION_RECORDS`].
    pub sessions: Mutex<Vec<SessionRecord>>,
}

impl IngestStats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    /// Counts one refused chunk under `reason`.
    pub fn reject(&self, reason: &'static str) {
        Self::add(&self.rejected_chunks, 1);
        self.refuse(reason);
    }

    /// Counts one refused request under `reason` (a chunk, or a call
    /// refused before any chunk, such as `unauthenticated`).
    pub fn refuse(&self, reason: &'static str) {
        *self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// The per-reason counts so far.
    pub fn rejections(&self) -> std::collections::BTreeMap<String, u64> {
        self.rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(&reason, &count)| (reason.to_owned(), count))
            .collect()
    }

    /// Keeps the record of an ended session (up to a bound).
    pub fn record_session(&self, record: SessionRecord) {
        let mut sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sessions.len() < MAX_SESSION_RECORDS {
            sessions.push(record);
        }
    }
}

/// What ingest needs to know about the learner's state.
#[derive(Debug, Clone, Copy)]
pub struct IngestContext {
    /// The actor this session belongs to.
    pub actor_id: u64,
    /// Newest version sent to this actor: no chunk can have a newer one.
    pub latest_version: u64,
    /// Whether truncated trajectories are kept.
    pub keep_truncated: bool,
    /// Most trajectories per chunk (declared by the actor).
    pub max_trajectories: usize,
}

/// Validates and replays a chunk.
pub fn ingest_chunk(
    env: &dyn Environment,
    chunk: TrajectoryChunk,
    context: IngestContext,
) -> Result<IngestedChunk, RequestError> {
    if chunk.actor_id != context.actor_id {
        return Err(RequestError::Malformed(format!(
            "`actor_id` {} is not this session's actor ({})",
            chunk.actor_id, context.actor_id
        )));
    }
    if chunk.policy_version > context.latest_version {
        return Err(RequestError::FutureVersion {
            claimed: chunk.policy_version,
            latest: context.latest_version,
        });
    }
    if chunk.trajectories.len() > context.max_trajectories {
        return Err(RequestError::Malformed(format!(
            "`trajectories` has {} entries, more than this actor declared per chunk at the handshake ({})",
            chunk.trajectories.len(),
            context.max_trajectories
        )));
    }
    let mut trajectories = Vec::with_capacity(chunk.trajectories.len());
    for (index, trajectory) in chunk.trajectories.iter().enumerate() {
        let replayed =
            replay(env, trajectory).map_err(|source| RequestError::Trajectory { index, source })?;
        trajectories.push(replayed);
    }
    let sent: usize = trajectories.iter().map(ReplayedTrajectory::len).sum();
    if !context.keep_truncated {
        trajectories.retain(|t| t.complete);
    }
    let transitions = trajectories.iter().map(ReplayedTrajectory::len).sum();
    Ok(IngestedChunk {
        actor_id: chunk.actor_id,
        policy_version: chunk.policy_version,
        trajectories,
        transitions,
        unusable_transitions: sent - transitions,
    })
}
