//! The batch builder: a thread that assembles the next batch while the
//! trainer runs the current step.
//!
//! It takes validated chunks from the queue until it holds the batch the
//! credit room calls for ([`CreditPool::adapt`]: `batch_transitions`, more
//! when much is in flight behind a slow network), and with
//! `batch_growth = "supply"` any more that are already waiting, up to
//! `max_batch_transitions`: more supply means bigger steps, not older data.
//! Here, where the batch is built, chunks whose policy would be more than
//! `max_policy_lag` steps old when trained are dropped and counted; credits
//! keep that rare. Each chunk's credit is released once the chunk is in a
//! batch, so actors start the next rollouts while this batch trains. The
//! host tensors are collated here (into pinned memory when the trainer
//! runs on a GPU), so the trainer only copies them to the device and steps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use flgfn_common::objectives::TransitionBatch;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use crate::credits::CreditPool;
use crate::ingest::{IngestStats, QueuedChunk};

/// A hand-over quicker than this means the trainer was already waiting.
const TRAINER_WAITING: Duration = Duration::from_micros(50);

/// A batch ready for the trainer.
#[derive(Debug)]
pub struct PreparedBatch {
    /// Host tensors (pinned when the trainer is on a GPU).
    pub tensors: TransitionBatch,
    /// Transitions in the batch.
    pub transitions: usize,
    /// Trajectories in the batch.
    pub trajectories: usize,
    /// Of which truncated prefixes.
    pub truncated: usize,
    /// Sum over chunks of (the step the batch was built for - the chunk's
    /// policy version) x its transitions.
    pub lag_weighted: f64,
    /// Largest of those lags.
    pub max_lag: u64,
}

/// Everything the batch-builder thread owns.
pub struct Batcher {
    /// Validated chunks with their credits.
    pub queue: mpsc::Receiver<QueuedChunk>,
    /// To the trainer; a rendezvous, so the batch being built is always
    /// the one after the batch being trained.
    pub out: SyncSender<PreparedBatch>,
    /// Training steps done, written by the trainer.
    pub steps_done: Arc<AtomicU64>,
    /// The credit room, adapted at each batch.
    pub pool: Arc<CreditPool>,
    /// Stale drops are counted here.
    pub stats: Arc<IngestStats>,
    /// Largest batch, in transitions.
    pub max_transitions: usize,
    /// Take fresh chunks already waiting beyond the target
    /// (`batch_growth = "supply"`).
    pub take_waiting: bool,
    /// Older data is never trained on.
    pub max_policy_lag: u64,
    /// State dimension, forward and backward action counts.
    pub dims: (usize, usize, usize),
    /// Collate into page-locked memory (the trainer is on a GPU).
    pub pinned: bool,
    /// Turns true when the learner stops.
    pub stop: watch::Receiver<bool>,
    /// To wait on the async queue from this plain thread.
    pub runtime: Handle,
    /// Whether building the current batch found the queue empty.
    pub waited_for_data: bool,
}

impl Batcher {
    /// Builds batches until the learner stops or the trainer is gone.
    pub fn run(mut self) {
        let mut carried: Option<QueuedChunk> = None;
        // Whether the last batch had to wait for data and the trainer for
        // it: the credit room's signal to grow. (A trainer kept waiting by
        // a busy CPU rather than by missing data is no reason to let more
        // data age in flight.)
        let mut starved = true;
        loop {
            let target = self.pool.adapt(starved) as usize;
            self.waited_for_data = false;
            let Some(chunks) = self.gather(target, &mut carried) else {
                return;
            };
            let batch = self.collate(chunks);
            // A rendezvous: the send returns at once if the trainer waits
            // in recv, and only after it finishes its step otherwise.
            let handed = Instant::now();
            if self.out.send(batch).is_err() {
                return;
            }
            starved = self.waited_for_data && handed.elapsed() < TRAINER_WAITING;
        }
    }

    /// The step the batch being built will train at, at the latest: the
    /// trainer is at most one step ahead of what it has reported.
    fn step_to_train(&self) -> u64 {
        self.steps_done.load(Ordering::Acquire) + 1
    }

    fn is_stale(&self, chunk: &QueuedChunk, step: u64) -> bool {
        step.saturating_sub(chunk.chunk.policy_version) > self.max_policy_lag
    }

    fn drop_stale(&self, chunk: QueuedChunk) {
        IngestStats::add(
            &self.stats.stale_transitions,
            chunk.chunk.transitions as u64,
        );
    }

    /// At least `target` transitions of fresh data, then whatever else is
    /// waiting up to `max_transitions`. None when the learner stops.
    fn gather(
        &mut self,
        target: usize,
        carried: &mut Option<QueuedChunk>,
    ) -> Option<Vec<QueuedChunk>> {
        let mut chunks: Vec<QueuedChunk> = Vec::new();
        let mut transitions = 0;
        loop {
            while transitions < target {
                let chunk = match carried.take() {
                    Some(chunk) => chunk,
                    None => self.next_chunk()?,
                };
                if self.is_stale(&chunk, self.step_to_train()) {
                    self.drop_stale(chunk);
                    continue;
                }
                transitions += chunk.chunk.transitions;
                chunks.push(chunk);
            }
            // Waiting may have let the trainer move on: check again.
            let step = self.step_to_train();
            let (fresh, stale): (Vec<_>, Vec<_>) =
                chunks.into_iter().partition(|c| !self.is_stale(c, step));
            stale.into_iter().for_each(|c| self.drop_stale(c));
            chunks = fresh;
            transitions = chunks.iter().map(|c| c.chunk.transitions).sum();
            if transitions >= target {
                break;
            }
        }
        // Fresh supply beyond the target joins this batch rather than age.
        while self.take_waiting && transitions < self.max_transitions {
            let Ok(chunk) = self.queue.try_recv() else {
                break;
            };
            if self.is_stale(&chunk, self.step_to_train()) {
                self.drop_stale(chunk);
                continue;
            }
            if transitions + chunk.chunk.transitions > self.max_transitions {
                *carried = Some(chunk);
                break;
            }
            transitions += chunk.chunk.transitions;
            chunks.push(chunk);
        }
        Some(chunks)
    }

    fn collate(&self, chunks: Vec<QueuedChunk>) -> PreparedBatch {
        let step = self.step_to_train();
        let mut lag_weighted = 0.0;
        let mut max_lag = 0;
        let mut transitions = 0;
        for QueuedChunk { chunk, .. } in &chunks {
            let lag = step.saturating_sub(chunk.policy_version);
            lag_weighted += lag as f64 * chunk.transitions as f64;
            max_lag = max_lag.max(lag);
            transitions += chunk.transitions;
        }
        let trajectories = chunks.iter().flat_map(|c| &c.chunk.trajectories);
        let tensors = TransitionBatch::collate(trajectories.clone(), self.dims, self.pinned);
        let truncated = trajectories.clone().filter(|t| !t.complete).count();
        let count = trajectories.count();
        // The chunks (and their credits) go here: the room is free for the
        // next rollouts while this batch trains.
        drop(chunks);
        PreparedBatch {
            tensors,
            transitions,
            trajectories: count,
            truncated,
            lag_weighted,
            max_lag,
        }
    }

    /// The next chunk; None when the learner stops.
    fn next_chunk(&mut self) -> Option<QueuedChunk> {
        if *self.stop.borrow() {
            return None;
        }
        if let Ok(chunk) = self.queue.try_recv() {
            return Some(chunk);
        }
        self.waited_for_data = true;
        let (queue, stop) = (&mut self.queue, &mut self.stop);
        self.runtime.block_on(async {
            tokio::select! {
                chunk = queue.recv() => chunk,
                _ = stop.wait_for(|stopped| *stopped) => None,
            }
        })
    }
}
