//! The batch builder: a thread that assembles the next batch while the
//! trainer runs the current step.
//!
//! It takes validated chunks from the queue until it holds the batch the
//! credit room calls for ([`CreditPool::adapt`]: `batch_transitions`, more
//! when much is in flight behind a slow network), and with
//! `batch_growth = "supply"` any more that are already waiting, up to
//! `max_batch_transitions`: more supply means bigger steps, not older data.
//! Chunks are batched oldest policy first, and one that could not wait
//! another step joins the current batch beyond its target (even beyond
//! `max_batch_transitions`: it would be dropped otherwise). A chunk larger
//! than what the batch still needs is split: the batch takes its first
//! trajectories, enough to reach the target (passing it by less than a
//! trajectory), and the rest waits first in line for the next batch, so
//! an actor's chunk size (`actor.envs`) does not set the smallest batch.
//! Growth beyond the target with fresh supply stops at
//! `max_batch_transitions`, taking the part of a chunk that fits. The
//! credit's room comes back part by part; the actor's credit, with the
//! last part. Here, where the
//! batch is built, chunks whose policy would be more than `max_policy_lag`
//! steps old when trained are dropped and counted; credits and that order
//! keep it rare. A chunk's room is released once it (or a part) is in a
//! batch, so actors start the next rollouts while this batch trains. The
//! host tensors are collated here (into pinned memory when the trainer
//! runs on a GPU), so the trainer only copies them to the device and steps.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use flgfn_common::objectives::TransitionBatch;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use crate::credits::CreditPool;
use crate::ingest::{IngestStats, IngestedChunk, QueuedChunk};

/// A hand-over quicker than this means the trainer was already waiting.
const TRAINER_WAITING: Duration = Duration::from_micros(50);

/// Waiting this long for the next chunk (many steps' worth), the batch
/// builder adapts the credit room again instead of only at the next batch.
/// Credits held by an actor that stopped answering (a cut link, a frozen
/// process: the learner notices only after `learner.stall_timeout_s`) can fill a
/// room sized for a few chunks; nothing would then be granted, no batch
/// completed and the room never grown
/// ([`CreditPool::adapt_while_waiting`]).
const STARVED_AFTER: Duration = Duration::from_millis(100);

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
    /// Sum over chunks of the chunk's policy version x its transitions:
    /// with the step the trainer trains the batch at, its lags (the
    /// trainer's, not the step the batch was built for: a batch trained
    /// later than built for would show its true lag).
    pub version_weighted: u128,
    /// The oldest policy version in the batch (u64::MAX when empty).
    pub oldest_version: u64,
}

impl PreparedBatch {
    /// Sum over the batch's transitions of their lag behind `step` (the
    /// version the trainer's step makes), and the largest lag.
    pub fn lags_at(&self, step: u64) -> (f64, u64) {
        let at_step = u128::from(step) * self.transitions as u128;
        let weighted = at_step.saturating_sub(self.version_weighted) as f64;
        let max = match self.transitions {
            0 => 0,
            _ => step.saturating_sub(self.oldest_version),
        };
        (weighted, max)
    }
}

/// Everything the batch-builder thread owns.
pub struct Batcher {
    /// Validated chunks with their credits.
    pub queue: mpsc::Receiver<QueuedChunk>,
    /// To the trainer; a rendezvous, so the batch being built is always
    /// the one after the batch being trained.
    pub out: SyncSender<PreparedBatch>,
    /// The version the trainer's weights are at (steps done, plus a
    /// resumed run's version offset), written by the trainer.
    pub steps_done: Arc<AtomicU64>,
    /// The step the last batch handed over trains at (0: none yet).
    pub last_handed_step: u64,
    /// The step the next batch will train at, for the sessions (which
    /// pause actors whose chunks would arrive stale).
    pub next_training_step: Arc<AtomicU64>,
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
    /// Set, before the batch channel closes, if building failed (a panic,
    /// such as libtorch's on pinning a batch): the trainer then takes its
    /// error path instead of a stop's, and actors are not told training
    /// is done.
    pub failure: Arc<std::sync::OnceLock<String>>,
    /// Transitions of the batch being collated (0 between batches): a
    /// collation that fails drops them, and they are counted untrained.
    pub collating: usize,
    /// To wait on the async queue from this plain thread.
    pub runtime: Handle,
    /// Whether building the current batch found the queue empty.
    pub waited_for_data: bool,
    /// Chunks taken off the queue and not yet batched, oldest policy
    /// first.
    pub waiting: VecDeque<QueuedChunk>,
}

impl Batcher {
    /// Builds batches until the learner stops or the trainer is gone (or,
    /// the run's last batch handed over, waits for the stop), or
    /// building fails ([`Batcher::failure`] says why, and the panic goes
    /// on once the chunks held are counted untrained).
    pub fn run(mut self) {
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build()));
        if let Err(panic) = &built {
            let _ = self.failure.set(format!(
                "the batch builder failed: {}",
                flgfn_common::telemetry::panic_message(panic.as_ref())
            ));
            let collating = std::mem::take(&mut self.collating);
            self.count_untrained(collating);
        }
        self.close_queue();
        if let Err(panic) = built {
            std::panic::resume_unwind(panic);
        }
    }

    fn build(&mut self) {
        // Whether the last batch had to wait for data and the trainer for
        // it: the credit room's signal to grow. (A trainer kept waiting by
        // a busy CPU rather than by missing data is no reason to let more
        // data age in flight.)
        let mut starved = true;
        loop {
            let target = self.pool.adapt(starved) as usize;
            self.waited_for_data = false;
            let Some(chunks) = self.gather(target) else {
                break;
            };
            let step = self.step_to_train();
            // Before the chunks' credits are dropped (in `collate`): each
            // drop wakes the controller, which must not read the taper of
            // the batch before.
            self.pool.collated(step);
            self.collating = chunks.iter().map(|c| c.chunk.transitions).sum();
            let batch = self.collate(chunks);
            self.collating = 0;
            // A rendezvous: the send returns at once if the trainer waits
            // in recv, and only after it finishes its step otherwise.
            let handed = Instant::now();
            if let Err(std::sync::mpsc::SendError(batch)) = self.out.send(batch) {
                self.count_untrained(batch.transitions);
                break;
            }
            self.last_handed_step = step;
            self.next_training_step
                .store(self.step_to_train(), Ordering::Release);
            if self.pool.is_last_batch(step) {
                // Nothing after it is trained: no batch is gathered, and
                // collated (into pinned memory on CUDA), for nobody while
                // the trainer evaluates and saves, where a failure would
                // turn a finished run into a failed one. What arrives
                // meanwhile waits in the queue (credits bound it), counted
                // untrained at the close.
                let stop = &mut self.stop;
                self.runtime.block_on(async {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                });
                break;
            }
            starved = self.waited_for_data && handed.elapsed() < TRAINER_WAITING;
        }
    }

    /// Refuses further chunks (a session then answers its actor that the
    /// learner is shutting down) and counts what was accepted and will not
    /// be trained, so the run's accounts close.
    fn close_queue(&mut self) {
        self.queue.close();
        // Received until the channel says it is done, not until it looks
        // empty: a session whose `try_send` took its slot just before the
        // close writes the chunk a moment later, and `blocking_recv` waits
        // for it (tokio returns None only once no sender holds a slot).
        // `try_recv` would see an empty queue and leave that chunk, counted
        // accepted, in a queue nobody reads.
        while let Some(chunk) = self.queue.blocking_recv() {
            self.waiting.push_back(chunk);
        }
        let held = self.waiting.drain(..).map(|c| c.chunk.transitions).sum();
        self.count_untrained(held);
    }

    fn count_untrained(&self, transitions: usize) {
        IngestStats::add(
            &self.stats.untrained_at_stop_transitions,
            transitions as u64,
        );
    }

    /// The step (as a version number) the batch being built will train
    /// at: the one after the last step done, and after the batch the
    /// trainer holds, which it has not counted while it trains it (every
    /// batch handed over is one step).
    fn step_to_train(&self) -> u64 {
        let after_done = self.steps_done.load(Ordering::Acquire) + 1;
        after_done.max(self.last_handed_step + 1)
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

    /// At least `target` transitions of fresh data, oldest policy first;
    /// then whatever would be stale by the next step, and with
    /// `take_waiting` whatever else is waiting, up to `max_transitions`.
    /// None when the learner stops.
    ///
    /// Oldest first is earliest deadline first (a chunk's deadline is its
    /// policy version + `max_policy_lag`): a chunk that arrived late, or
    /// behind a batch target that shrank, is trained before fresher data
    /// rather than dropped.
    fn gather(&mut self, target: usize) -> Option<Vec<QueuedChunk>> {
        // Told to stop: no new batch, even from data already waiting (a
        // batch and a large chunk may be, ~17 steps with 256-trajectory
        // chunks); it is counted as untrained at stop.
        if *self.stop.borrow() {
            return None;
        }
        let mut chunks: Vec<QueuedChunk> = Vec::new();
        let mut transitions = 0;
        loop {
            self.absorb_arrived();
            while transitions < target {
                let chunk = match self.waiting.pop_front() {
                    Some(chunk) => chunk,
                    None => {
                        let Some(chunk) = self.next_chunk() else {
                            // Stopping: what this batch gathered stays
                            // with the rest, to be counted.
                            self.waiting.extend(chunks);
                            return None;
                        };
                        self.waiting.push_back(chunk);
                        self.absorb_arrived();
                        continue;
                    }
                };
                if self.is_stale(&chunk, self.step_to_train()) {
                    self.drop_stale(chunk);
                    continue;
                }
                let chunk = match trajectories_reaching(&chunk.chunk, target - transitions) {
                    Some(needed) => {
                        let mut rest = chunk;
                        let front = rest.split_front(needed);
                        self.waiting.push_front(rest);
                        front
                    }
                    None => chunk,
                };
                transitions += chunk.chunk.transitions;
                chunks.push(chunk);
            }
            // With a rendezvous hand-over the step cannot move while this
            // gathers (the trainer can only finish the batch it holds);
            // checked again so that another hand-over could not let stale
            // data through.
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
        // Beyond the target: what could not wait one more step (it would be
        // dropped), and fresh supply rather than let it age (`take_waiting`)
        // up to the largest batch: of a chunk that does not fit, the
        // trajectories that do join and the rest waits for the next batch,
        // and smaller chunks behind it may still fit.
        self.absorb_arrived();
        let step = self.step_to_train();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(chunk) = self.waiting.pop_front() {
            if self.is_stale(&chunk, step) {
                self.drop_stale(chunk);
                continue;
            }
            let due = step.saturating_sub(chunk.chunk.policy_version) >= self.max_policy_lag;
            if !(self.take_waiting || due) {
                // Oldest first: nothing behind it is due either.
                kept.push_back(chunk);
                kept.extend(self.waiting.drain(..));
                break;
            }
            if !due && transitions + chunk.chunk.transitions > self.max_transitions {
                let mut rest = chunk;
                let room = self.max_transitions.saturating_sub(transitions);
                if let Some(fitting) = trajectories_fitting(&rest.chunk, room) {
                    let front = rest.split_front(fitting);
                    transitions += front.chunk.transitions;
                    chunks.push(front);
                }
                kept.push_back(rest);
                continue;
            }
            transitions += chunk.chunk.transitions;
            chunks.push(chunk);
        }
        self.waiting = kept;
        Some(chunks)
    }

    /// Moves every chunk that has arrived into `waiting`, oldest policy
    /// first (stable: arrival order within a version). Credits bound how
    /// many there are.
    fn absorb_arrived(&mut self) {
        let before = self.waiting.len();
        while let Ok(chunk) = self.queue.try_recv() {
            self.waiting.push_back(chunk);
        }
        if self.waiting.len() > before {
            self.waiting
                .make_contiguous()
                .sort_by_key(|c| c.chunk.policy_version);
        }
    }

    fn collate(&self, chunks: Vec<QueuedChunk>) -> PreparedBatch {
        let mut version_weighted = 0u128;
        let mut oldest_version = u64::MAX;
        let mut transitions = 0;
        for QueuedChunk { chunk, .. } in &chunks {
            version_weighted += u128::from(chunk.policy_version) * chunk.transitions as u128;
            oldest_version = oldest_version.min(chunk.policy_version);
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
            version_weighted,
            oldest_version,
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
        let (queue, stop, pool) = (&mut self.queue, &mut self.stop, &self.pool);
        self.runtime.block_on(async {
            loop {
                tokio::select! {
                    chunk = queue.recv() => return chunk,
                    _ = stop.wait_for(|stopped| *stopped) => return None,
                    () = tokio::time::sleep(STARVED_AFTER) => pool.adapt_while_waiting(),
                }
            }
        })
    }
}

/// How many of `chunk`'s first trajectories reach `needed` transitions
/// (passing it by less than one trajectory); None when it takes them all.
fn trajectories_reaching(chunk: &IngestedChunk, needed: usize) -> Option<usize> {
    let mut transitions = 0;
    let count = chunk.trajectories.iter().position(|trajectory| {
        transitions += trajectory.len();
        transitions >= needed
    })? + 1;
    (count < chunk.trajectories.len()).then_some(count)
}

/// How many of `chunk`'s first trajectories fit in `room` transitions;
/// None when none do or all do.
fn trajectories_fitting(chunk: &IngestedChunk, room: usize) -> Option<usize> {
    let mut transitions = 0;
    let count = chunk
        .trajectories
        .iter()
        .take_while(|trajectory| {
            transitions += trajectory.len();
            transitions <= room
        })
        .count();
    (0 < count && count < chunk.trajectories.len()).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flgfn_common::trajectory::ReplayedTrajectory;

    /// A batcher at step 17 (16 done) with `max_policy_lag` 16, fed chunks
    /// of 10 transitions sampled by `versions`, in that arrival order.
    fn batcher_with(
        runtime: &tokio::runtime::Runtime,
        versions: &[u64],
    ) -> (Batcher, std::sync::mpsc::Receiver<PreparedBatch>) {
        let chunks: Vec<_> = versions.iter().map(|&version| (version, 10)).collect();
        batcher_with_sizes(runtime, &chunks, 1000)
    }

    /// The same, fed chunks of (policy version, transitions), making
    /// batches of at most `max_transitions`.
    fn batcher_with_sizes(
        runtime: &tokio::runtime::Runtime,
        chunks: &[(u64, usize)],
        max_transitions: usize,
    ) -> (Batcher, std::sync::mpsc::Receiver<PreparedBatch>) {
        let pool = CreditPool::new(100, 1000, 4);
        let (sender, queue) = mpsc::channel(16);
        for &(policy_version, transitions) in chunks {
            sender
                .try_send(chunk_of(&pool, policy_version, transitions))
                .unwrap();
        }
        let (out, batches) = std::sync::mpsc::sync_channel(0);
        let batcher = Batcher {
            queue,
            out,
            steps_done: Arc::new(AtomicU64::new(16)),
            last_handed_step: 0,
            next_training_step: Arc::new(AtomicU64::new(17)),
            pool,
            stats: Default::default(),
            max_transitions,
            take_waiting: false,
            max_policy_lag: 16,
            dims: (1, 1, 1),
            pinned: false,
            stop: watch::channel(false).1,
            failure: Default::default(),
            collating: 0,
            runtime: runtime.handle().clone(),
            waited_for_data: false,
            waiting: VecDeque::new(),
        };
        (batcher, batches)
    }

    fn versions(chunks: &[QueuedChunk]) -> Vec<u64> {
        chunks.iter().map(|c| c.chunk.policy_version).collect()
    }

    #[test]
    fn oldest_policy_is_batched_first_and_what_cannot_wait_joins_the_batch() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // At step 17: version 0 is stale (lag 17), version 1 is due (lag
        // 16: stale next step), version 2 arrived late behind fresher data.
        let (mut batcher, _batches) = batcher_with(&runtime, &[8, 9, 2, 0, 1, 1, 10]);
        let first = batcher.gather(10).unwrap();
        assert_eq!(
            versions(&first),
            [1, 1],
            "the stale chunk is dropped, both due ones are taken beyond the target"
        );
        assert_eq!(batcher.stats.stale_transitions.load(Ordering::Relaxed), 10);
        let second = batcher.gather(10).unwrap();
        assert_eq!(
            versions(&second),
            [2],
            "then the late arrival, oldest first"
        );
        let rest = batcher.gather(30).unwrap();
        assert_eq!(versions(&rest), [8, 9, 10]);
    }

    fn sizes(chunks: &[QueuedChunk]) -> Vec<usize> {
        chunks.iter().map(|c| c.chunk.transitions).collect()
    }

    #[test]
    fn growth_with_fresh_supply_stops_at_the_largest_batch_taking_what_fits() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Nothing is due at step 17 (lag 16) for versions 10 to 12.
        let (mut batcher, _batches) = batcher_with_sizes(
            &runtime,
            &[(10, 10), (10, 10), (10, 10), (11, 30), (12, 5)],
            25,
        );
        batcher.take_waiting = true;
        // These chunks carry no trajectories to split at, so they go whole:
        // the target takes two (10 + 10 >= 15); growth then skips what
        // does not fit (10 more would be 30, 30 more 50) and takes the 5.
        assert_eq!(sizes(&batcher.gather(15).unwrap()), [10, 10, 5]);
        // The smallest batch is reached with a whole (unsplittable) chunk,
        // even past the largest.
        assert_eq!(sizes(&batcher.gather(25).unwrap()), [10, 30]);
    }

    #[test]
    fn a_batch_built_while_the_trainer_steps_trains_one_step_later() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // 16 steps done and the trainer holds the batch of step 17: this
        // one trains at step 18, where version 1 is stale (lag 17) and
        // version 2 due.
        let (mut batcher, _batches) = batcher_with(&runtime, &[1, 2, 5]);
        batcher.last_handed_step = 17;
        assert_eq!(versions(&batcher.gather(1).unwrap()), [2]);
        assert_eq!(batcher.stats.stale_transitions.load(Ordering::Relaxed), 10);
        // Once the trainer has counted it, the same holds.
        batcher.steps_done.store(17, Ordering::Release);
        assert_eq!(batcher.step_to_train(), 18);
    }

    /// A runtime for a batcher that waits (its gather times out).
    fn runtime_with_time() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn the_sessions_see_the_step_the_next_batch_trains_at() {
        let runtime = runtime_with_time();
        // 16 steps done: the first batch (two chunks reach 100) trains at
        // step 17, the one built next at 18 (the third chunk alone is
        // short of a batch, and the stopped batcher ends there).
        let (batcher, batches) =
            batcher_with_sizes(&runtime, &[(10, 60), (11, 60), (12, 60)], 1000);
        let next = batcher.next_training_step.clone();
        assert_eq!(next.load(Ordering::Acquire), 17);
        let builder = std::thread::spawn(move || batcher.run());
        let batch = batches.recv().unwrap();
        assert_eq!(batch.transitions, 120);
        builder.join().unwrap();
        assert_eq!(next.load(Ordering::Acquire), 18);
    }

    #[test]
    fn what_a_stopping_batcher_holds_is_counted_untrained() {
        let runtime = runtime_with_time();
        // Stopped (its stop sender is gone) while gathering a batch of 100
        // from 30 transitions: the chunks it took are not lost from the
        // accounts.
        let (batcher, _batches) =
            batcher_with_sizes(&runtime, &[(10, 10), (11, 10), (12, 10)], 1000);
        let stats = batcher.stats.clone();
        batcher.run();
        assert_eq!(
            stats.untrained_at_stop_transitions.load(Ordering::Relaxed),
            30
        );
        assert_eq!(stats.stale_transitions.load(Ordering::Relaxed), 0);

        // The trainer gone: the batch it would have taken (two chunks reach
        // 100) and the chunk left waiting.
        let (batcher, batches) =
            batcher_with_sizes(&runtime, &[(10, 60), (11, 60), (12, 60)], 1000);
        drop(batches);
        let stats = batcher.stats.clone();
        batcher.run();
        assert_eq!(
            stats.untrained_at_stop_transitions.load(Ordering::Relaxed),
            180
        );
    }

    #[test]
    fn lags_are_measured_from_the_step_the_batch_trains_at() {
        let runtime = runtime_with_time();
        let (mut batcher, _batches) = batcher_with_sizes(&runtime, &[(10, 60), (12, 40)], 1000);
        let chunks = batcher.gather(100).unwrap();
        let batch = batcher.collate(chunks);
        // At step 20: 60 transitions 10 behind, 40 8 behind.
        assert_eq!(batch.lags_at(20), (60.0 * 10.0 + 40.0 * 8.0, 10));
        // Trained a step later than that, each is a step older.
        assert_eq!(batch.lags_at(21), (60.0 * 11.0 + 40.0 * 9.0, 11));
    }

    #[test]
    fn no_batch_is_built_after_the_last_step() {
        let runtime = runtime_with_time();
        // 16 steps done and the run ends at step 17: its batch (two chunks
        // reach 100) is handed over, and the next two chunks, a batch's
        // worth, wait for the stop instead of being collated.
        let (mut batcher, batches) =
            batcher_with_sizes(&runtime, &[(10, 60), (11, 60), (12, 60), (13, 60)], 1000);
        batcher.pool.last_step(17, 16);
        let (stop_sender, stop) = watch::channel(false);
        batcher.stop = stop;
        let stats = batcher.stats.clone();
        let running = std::thread::spawn(move || batcher.run());
        assert_eq!(batches.recv().unwrap().transitions, 120);
        let next = batches.recv_timeout(Duration::from_millis(300));
        assert!(
            matches!(next, Err(std::sync::mpsc::RecvTimeoutError::Timeout)),
            "a batch past the last step was built"
        );
        stop_sender.send_replace(true);
        running.join().unwrap();
        assert_eq!(
            stats.untrained_at_stop_transitions.load(Ordering::Relaxed),
            120
        );
    }

    #[test]
    fn a_stop_builds_no_batch_from_data_already_waiting() {
        let runtime = runtime_with_time();
        // Enough waiting for several batches, and told to stop: none is
        // built, and everything counts as untrained at stop.
        let (mut batcher, batches) =
            batcher_with_sizes(&runtime, &[(10, 100), (11, 100), (12, 100)], 1000);
        batcher.stop = watch::channel(true).1;
        let stats = batcher.stats.clone();
        let running = std::thread::spawn(move || batcher.run());
        let handed = batches.iter().count();
        running.join().unwrap();
        assert_eq!(handed, 0, "no batch after the stop");
        assert_eq!(
            stats.untrained_at_stop_transitions.load(Ordering::Relaxed),
            300
        );
    }

    #[test]
    fn a_chunk_written_as_the_queue_closes_is_counted_untrained() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (mut batcher, _batches) = batcher_with_sizes(&runtime, &[], 1000);
        let (sender, queue) = mpsc::channel(16);
        batcher.queue = queue;
        let _ = sender.try_send(chunk_of(&batcher.pool, 10, 100));
        // A session that took its slot before the close and writes its
        // chunk after the batcher started draining.
        let slot = sender.clone().try_reserve_owned().unwrap();
        let late = chunk_of(&batcher.pool, 11, 7);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            slot.send(late);
        });
        batcher.close_queue();
        writer.join().unwrap();
        assert_eq!(
            batcher
                .stats
                .untrained_at_stop_transitions
                .load(Ordering::Relaxed),
            107,
            "both the queued chunk and the one written during the close"
        );
        assert_eq!(batcher.pool.in_use(), 0, "and both credits' room is back");
    }

    /// A chunk of `transitions` sampled by `policy_version`, its credit
    /// taken from `pool` and arrived.
    fn chunk_of(pool: &Arc<CreditPool>, policy_version: u64, transitions: usize) -> QueuedChunk {
        let mut credit = pool.try_reserve(transitions as u64).unwrap();
        credit.arrived(transitions as u64);
        let chunk = IngestedChunk {
            actor_id: 1,
            policy_version,
            trajectories: Vec::new(),
            transitions,
            unusable_transitions: 0,
        };
        QueuedChunk { chunk, credit }
    }

    #[test]
    fn due_chunks_join_even_past_the_largest_batch() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Version 1 is due at step 17 (lag 16: stale after this step).
        let (mut batcher, _batches) = batcher_with_sizes(&runtime, &[(1, 10), (1, 30), (1, 5)], 25);
        assert_eq!(sizes(&batcher.gather(10).unwrap()), [10, 30, 5]);
        assert_eq!(batcher.stats.stale_transitions.load(Ordering::Relaxed), 0);
    }

    /// A batcher as [`batcher_with_sizes`] fed chunks of (policy version,
    /// trajectories of 4 transitions each), their credits reserved as
    /// arrived, and the pool they share.
    fn batcher_with_trajectories(
        runtime: &tokio::runtime::Runtime,
        chunks: &[(u64, usize)],
        max_transitions: usize,
    ) -> (Batcher, Arc<CreditPool>) {
        let (mut batcher, _) = batcher_with_sizes(runtime, &[], max_transitions);
        let (sender, queue) = mpsc::channel(16);
        for &(policy_version, count) in chunks {
            let trajectory = ReplayedTrajectory {
                encoded: Vec::new(),
                forward_masks: Vec::new(),
                backward_masks: Vec::new(),
                actions: vec![0; 4],
                backward_actions: vec![0; 4],
                energies: vec![0.0; 4],
                complete: true,
                final_state: Vec::new(),
            };
            let transitions = 4 * count;
            let mut credit = batcher.pool.try_reserve(transitions as u64).unwrap();
            credit.arrived(transitions as u64);
            let chunk = IngestedChunk {
                actor_id: 1,
                policy_version,
                trajectories: vec![trajectory; count],
                transitions,
                unusable_transitions: 0,
            };
            sender.try_send(QueuedChunk { chunk, credit }).unwrap();
        }
        batcher.queue = queue;
        let pool = batcher.pool.clone();
        (batcher, pool)
    }

    /// A batch builder that fails (a panic in collation, as libtorch's
    /// on pinning memory) says why before its channel closes, so that the
    /// trainer takes the error path rather than a stop's, and counts the
    /// chunks it still held as untrained; every credit comes back.
    #[test]
    fn a_failing_batch_builder_says_why_and_counts_what_it_held() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // 30 trajectories of 4 transitions: the first batch takes 25 (100
        // transitions), and collating them fails, as these trajectories
        // have no encoded states.
        let (batcher, pool) = batcher_with_trajectories(&runtime, &[(16, 30)], 1000);
        let (failure, stats) = (batcher.failure.clone(), batcher.stats.clone());
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batcher.run()));
        assert!(ran.is_err(), "the panic goes on");
        let failure = failure.get().expect("the failure is recorded");
        assert!(
            failure.starts_with("the batch builder failed: "),
            "{failure}"
        );
        // The 100 of the failed batch and the 20 left waiting.
        assert_eq!(
            stats.untrained_at_stop_transitions.load(Ordering::Relaxed),
            120
        );
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn a_chunk_larger_than_the_batch_trains_over_several_batches() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // 40 transitions sampled by version 10, then 8 by version 11.
        let (mut batcher, pool) = batcher_with_trajectories(&runtime, &[(10, 10), (11, 2)], 1000);
        assert_eq!(pool.in_use(), 48);
        // Three trajectories reach 10; the other seven wait first in line.
        let first = batcher.gather(10).unwrap();
        assert_eq!((sizes(&first), versions(&first)), (vec![12], vec![10]));
        drop(first);
        assert_eq!(pool.in_use(), 36, "the batched part's room comes back");
        // The rest of version 10, then one trajectory of version 11.
        let second = batcher.gather(30).unwrap();
        assert_eq!(
            (sizes(&second), versions(&second)),
            (vec![28, 4], vec![10, 11])
        );
        drop(second);
        assert_eq!(pool.in_use(), 4);
        let last = batcher.gather(1).unwrap();
        assert_eq!(sizes(&last), [4], "a trajectory is never split");
        drop(last);
        assert_eq!(pool.in_use(), 0, "every part's room came back");
        assert_eq!(pool.queued(), 0);
    }

    #[test]
    fn growth_takes_the_part_of_a_chunk_that_fits_and_a_due_chunk_whole() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (mut batcher, _pool) = batcher_with_trajectories(&runtime, &[(10, 5), (11, 5)], 30);
        batcher.take_waiting = true;
        // 12 reach the target; growth takes the other 8 of version 10 and
        // two trajectories (8) of version 11, up to 30.
        assert_eq!(sizes(&batcher.gather(10).unwrap()), [12, 8, 8]);
        assert_eq!(sizes(&batcher.gather(1).unwrap()), [4, 8]);

        // Version 1 is due at step 17: what the target leaves of it joins
        // this batch too, as it would be stale at the next.
        let (mut batcher, _pool) = batcher_with_trajectories(&runtime, &[(1, 10)], 30);
        assert_eq!(sizes(&batcher.gather(10).unwrap()), [12, 28]);
        assert_eq!(batcher.stats.stale_transitions.load(Ordering::Relaxed), 0);
    }
}
