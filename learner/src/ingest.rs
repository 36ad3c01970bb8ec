//! Ingest: turns a wire chunk into replayed, validated trajectories and
//! keeps the counters the reports read.
//!
//! Validation happens here, at the edge and off the trainer thread: the
//! actor must be known, its policy version must exist, and every action must
//! be legal in the learner's own environment. A chunk is accepted or refused
//! whole, so a refused chunk never leaves half its trajectories behind.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use flgfn_common::env::Environment;
use flgfn_common::trajectory::{ReplayedTrajectory, TrajectoryChunk, replay};

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

/// Counters shared by the service and the trainer. Relaxed atomics: they
/// feed reports, not control flow.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Chunks that passed validation.
    pub accepted_chunks: AtomicU64,
    /// Usable transitions in accepted chunks (counted before stale chunks
    /// are dropped).
    pub accepted_transitions: AtomicU64,
    /// Encoded protobuf bytes of accepted chunks.
    pub wire_bytes: AtomicU64,
    /// Chunks refused as invalid.
    pub rejected_chunks: AtomicU64,
    /// Transitions dropped because their policy was too old.
    pub stale_transitions: AtomicU64,
    /// Transitions of truncated trajectories the objective cannot use.
    pub unusable_truncated_transitions: AtomicU64,
    /// Open trajectory streams.
    pub connected_actors: AtomicI64,
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
}

/// What ingest needs to know about the learner's state.
#[derive(Debug, Clone, Copy)]
pub struct IngestContext {
    /// Highest actor id handed out so far (ids start at 1).
    pub last_actor_id: u64,
    /// The learner's latest published version.
    pub latest_version: u64,
    /// Whether truncated trajectories are kept.
    pub keep_truncated: bool,
    /// Most trajectories per chunk.
    pub max_trajectories: usize,
}

/// Validates and replays a chunk.
pub fn ingest_chunk(
    env: &dyn Environment,
    chunk: TrajectoryChunk,
    context: IngestContext,
) -> Result<IngestedChunk, RequestError> {
    if chunk.actor_id == 0 || chunk.actor_id > context.last_actor_id {
        return Err(RequestError::UnknownActor(chunk.actor_id));
    }
    if chunk.policy_version > context.latest_version {
        return Err(RequestError::FutureVersion {
            claimed: chunk.policy_version,
            latest: context.latest_version,
        });
    }
    if chunk.trajectories.len() > context.max_trajectories {
        return Err(RequestError::Malformed(format!(
            "`trajectories` has {} entries, more than this learner accepts per chunk ({}, learner.max_chunk_trajectories)",
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
