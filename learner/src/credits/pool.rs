//! The learner-wide room: what is granted and not yet trained, the
//! batch the builder builds from it, and how both adapt ([`CreditPool`]);
//! one credit's share of it, travelling with its chunk ([`CreditToken`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

/// The room starts at this many smallest batches (within the ceiling):
/// the room opens by at most a doubling per turn of the credits, and each
/// turn behind a slow link is a round trip. What keeps the trainer fed
/// 25 ms each way is its rate times a credit's round trip (~55-65 ms,
/// rollout included): 5,500 transitions at 100k/s, 8,000 at 130k/s, so a
/// start below that spends the first turns of such a link starving.
/// Sixteen default batches (5,120 transitions) were enough at 100k/s
/// (against four: time to quality median 0.89 s against 1.03 s behind
/// 25 ms, 0.56 s against 0.63 s on loopback). At 125k/s, 2 real actors,
/// 5 alternating runs each (scale bench), 32 against 16: behind 25 ms
/// 112k against 100k trained/s (0.90 against 0.80 of loopback), data wait
/// 10-13 % against 15-20 %, time to quality median 0.73 s against 0.79 s;
/// on loopback the same rate and time to quality 0.45 s (0.45-0.60)
/// against 0.55 s (0.45-0.81), with mean lag 7.5 against 4.7 (largest 34
/// against 18, once: what is granted before the first steps costs up to
/// this many steps of lag).
pub const INITIAL_ROOM_BATCHES: u64 = 32;

/// The learner-wide room for data granted and not yet trained on, in
/// transitions.
#[derive(Debug)]
pub struct CreditPool {
    /// Reserved by granted credits whose chunks the trainer has not taken.
    in_use: AtomicU64,
    /// Of `in_use`, transitions that arrived and wait for the trainer.
    queued: AtomicU64,
    /// Current room; adapted between `floor` and `ceiling`.
    pub(super) capacity: AtomicU64,
    floor: u64,
    ceiling: u64,
    /// Smallest and largest batch, and how many batches the room holds at
    /// most.
    batch: (u64, u64),
    batches: u64,
    /// The batch being built: the target the last [`CreditPool::adapt`]
    /// returned (a long wait may move the room, not the batch under way).
    pub(super) building: AtomicU64,
    /// Accepted chunks whose actor had no credit left when it finished
    /// them (see [`super::SessionCredits::ran_out`]): it sat idle until
    /// the next grant reached it. Without such events the actors, not the
    /// room, limit supply, and more room would only queue credits whose
    /// weights age.
    pub(super) idle_actors: AtomicU64,
    /// Whether, since the last batch, a session holding no credit could
    /// not be given one for want of room: read only when the batch builder
    /// has waited long for data ([`CreditPool::adapt_while_waiting`]), so
    /// the room's usual dynamics do not depend on it.
    pub(super) unserved: AtomicBool,
    /// Room of the credits whose chunk was taken into a batch (or that
    /// were returned), ever, counted as each part of the chunk is taken
    /// (the last part also counts what a short chunk freed on arrival, so
    /// that the newest chunks of truncated trajectories, arriving, do not
    /// end a hold on what was in flight before them).
    released: AtomicU64,
    /// Room reserved by every credit granted, ever: what was in flight at
    /// a change, counted as it will be released, is this then, less
    /// `released`.
    reserved_ever: AtomicU64,
    /// The room changes again only once `released` reaches this: after a
    /// change, what was already in flight must be trained before the
    /// signals (starving, a long queue) say anything about the new room.
    /// Reacting sooner, at every batch, overshoots behind a slow link:
    /// the room swung between a quarter and all of its ceiling every
    /// tenth of a second, and the actors idled at each low.
    settled_at: AtomicU64,
    /// `released` at the last [`CreditPool::adapt_while_waiting`].
    released_at_wait: AtomicU64,
    /// Largest room one credit reserves (a full chunk) among the sessions
    /// in the rotation: set by the controller, which owns that list, as
    /// sessions come and go (a session of huge chunks that left no longer
    /// counts).
    pub(super) largest_chunk: AtomicU64,
    /// The step (as a version) of the run's last batch; u64::MAX without
    /// `learner.max_steps`.
    last_step: AtomicU64,
    /// Batches the builder has still to collate (up to `last_step`;
    /// u64::MAX without a limit): nothing is granted beyond what they
    /// need, since a chunk granted then would only be rolled out, sent and
    /// counted untrained at the end.
    batches_left: AtomicU64,
    /// Room held by quiet sessions' credits (set by the controller): not
    /// counted as covering the batches left, since it may never come.
    pub(super) quiet_held: AtomicU64,
    /// Wakes the controller: room freed, capacity or batch changed, a
    /// credit used, a session paused, fresh again or gone.
    pub(super) wake: Notify,
}

impl CreditPool {
    /// A pool for batches of `min_batch` to `max_batch` transitions whose
    /// room starts at [`INITIAL_ROOM_BATCHES`] smallest batches and adapts
    /// between one smallest batch and `batches` largest ones.
    pub fn new(min_batch: u64, max_batch: u64, batches: u64) -> Arc<Self> {
        let floor = min_batch.max(1);
        let max_batch = max_batch.max(floor);
        let ceiling = flgfn_common::config::credit_ceiling(min_batch, max_batch, batches);
        Arc::new(CreditPool {
            in_use: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            capacity: AtomicU64::new((INITIAL_ROOM_BATCHES * floor).min(ceiling)),
            floor,
            ceiling,
            batch: (floor, max_batch),
            batches: batches.max(1),
            building: AtomicU64::new(floor),
            idle_actors: AtomicU64::new(0),
            unserved: AtomicBool::new(false),
            released: AtomicU64::new(0),
            reserved_ever: AtomicU64::new(0),
            settled_at: AtomicU64::new(0),
            released_at_wait: AtomicU64::new(0),
            largest_chunk: AtomicU64::new(0),
            last_step: AtomicU64::new(u64::MAX),
            batches_left: AtomicU64::new(u64::MAX),
            quiet_held: AtomicU64::new(0),
            wake: Notify::new(),
        })
    }

    /// The batch the trainer should take now: what is granted and not yet
    /// trained over `max_in_flight_batches`, between the smallest and
    /// largest batch, so that what is granted now is trained within about
    /// that many steps. (Not the room: after the room shrinks, the data
    /// granted under the larger room is still on its way.)
    pub fn batch_target(&self) -> u64 {
        (self.in_use() / self.batches).clamp(self.batch.0, self.batch.1)
    }

    /// Transitions granted and not yet taken by the trainer.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Transitions that arrived and wait for the trainer.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// The current room.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// The largest room the pool may grow to.
    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// The run ends with the batch for `last` (a version:
    /// `learner.max_steps` after the version it started at, `done`): the
    /// taper holds from the first batch (a run shorter than the initial
    /// room is not granted the whole room).
    pub fn last_step(&self, last: u64, done: u64) {
        self.last_step.store(last, Ordering::Release);
        self.batches_left
            .store(last.saturating_sub(done), Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether the batch for `step` is the run's last (never without
    /// `learner.max_steps`).
    pub fn is_last_batch(&self, step: u64) -> bool {
        step >= self.last_step.load(Ordering::Acquire)
    }

    /// The batch builder collated the batch for `step`: the batches after
    /// it, up to the last step, are what credits are still granted for,
    /// only while what is in use falls short of them at the current
    /// target, so the last steps' supply does not outlast them; none at
    /// all once the last batch is collated. Credits already granted stay
    /// valid; sessions learn that training is done once the final weights
    /// are saved.
    pub fn collated(&self, step: u64) {
        let last = self.last_step.load(Ordering::Acquire);
        if last != u64::MAX {
            self.batches_left
                .store(last.saturating_sub(step), Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// Whether what is in use (by sessions not quiet) covers every batch
    /// the builder will still collate: a further credit would only be
    /// counted untrained at the end.
    pub(super) fn covers_what_is_left(&self) -> bool {
        let needed = self
            .batches_left
            .load(Ordering::Acquire)
            .saturating_mul(self.building.load(Ordering::Relaxed));
        let coming = self
            .in_use()
            .saturating_sub(self.quiet_held.load(Ordering::Acquire));
        coming >= needed
    }

    /// Called by the batch builder each time it starts a batch, saying
    /// whether the previous one was starved (it waited for data, and the
    /// trainer waited for it). Starving while some actor ran out of credits
    /// since the last call means too little is in flight: the room doubles when nothing
    /// is queued at all and grows by a quarter (at least a batch)
    /// otherwise. A busy trainer with more than two batches queued (a
    /// batch and the largest chunk, where chunks are larger) means data
    /// ages in the queue: the room shrinks by what is queued beyond that
    /// (at least a sixteenth, at most a quarter). After a
    /// change the room holds until what was in flight at the change has
    /// been trained. Returns the batch to build
    /// ([`CreditPool::batch_target`]).
    pub fn adapt(&self, starved: bool) -> u64 {
        self.unserved.store(false, Ordering::Relaxed);
        // Cleared at every call: idleness while the trainer was busy is no
        // reason to grow at a later starved batch.
        let idle = self.idle_actors.swap(0, Ordering::Relaxed) > 0;
        let starved = starved && idle;
        let target = self.resize(starved, false);
        // Stored before the controller wakes: it grants up to this.
        self.building.store(target, Ordering::Relaxed);
        self.wake.notify_one();
        target
    }

    /// Called by the batch builder when it has waited many steps' worth of
    /// time for the next chunk: grows the room as [`CreditPool::adapt`]
    /// does for a starved batch if some actor sat idle since, including
    /// one that holds no credit because the room had none to give, and
    /// without waiting for the last change to settle if nothing was trained
    /// since the last call. That is
    /// what happens when an actor that stopped answering holds the room's
    /// credits (the learner ends it only after `learner.stall_timeout_s`): no chunk
    /// comes, no batch completes, and without this the room would not
    /// grow for the others.
    pub fn adapt_while_waiting(&self) {
        // Near the end, the credits that cover the last batches may sit
        // with an actor that stopped answering (and it takes its share of
        // what is let out, too), or batches may take more than the batch
        // being built: where the taper is what holds grants back (not
        // before any grant, while actors start), each long wait lets one
        // more batch's worth out (not the whole room at once, which would
        // be rolled out and never trained), until the next batch is
        // collated. Once the last batch is collated, the builder waits for
        // data no step will train (while that step, the final checkpoint
        // and evaluation run): no lift.
        if self.covers_what_is_left() {
            let _ = self
                .batches_left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    (left != 0).then(|| left.saturating_add(1))
                });
        }
        let idle = self.idle_actors.swap(0, Ordering::Relaxed) > 0;
        let unserved = self.unserved.swap(false, Ordering::Relaxed);
        // Held back by the last change only while something is trained:
        // if nothing was since the last call, the room would never settle.
        // (Behind a slow link, data from the last change is still on its
        // way, and the hold applies.)
        let released = self.released.load(Ordering::Relaxed);
        let stuck = self.released_at_wait.swap(released, Ordering::Relaxed) == released;
        self.resize(idle || unserved, stuck);
        self.wake.notify_one();
    }

    /// Grows, shrinks or keeps the room (not before the last change has
    /// settled, unless `now`); returns the batch to build (at the next
    /// [`CreditPool::adapt`]: the one under way keeps its target). The
    /// caller wakes the controller.
    fn resize(&self, starved: bool, now: bool) -> u64 {
        let batch = self.batch_target();
        let queued = self.queued();
        let enough_queued = self.enough_queued(batch);
        let capacity = self.capacity();
        let settled =
            now || self.released.load(Ordering::Relaxed) >= self.settled_at.load(Ordering::Relaxed);
        let next = if !settled {
            capacity
        } else if starved && queued == 0 {
            capacity.saturating_mul(2)
        } else if starved {
            capacity.saturating_add((capacity / 4).max(batch))
        } else if queued > enough_queued {
            // What waits beyond that is room the trainer does not need:
            // give most of it back in one turn. A sixteenth per turn took a
            // second to undo a doubling behind 25 ms, a second of large
            // batches and slow steps.
            capacity - (queued - enough_queued).clamp(capacity / 16, capacity / 4)
        } else {
            capacity
        };
        let next = next.clamp(self.floor, self.ceiling);
        if next != capacity {
            self.capacity.store(next, Ordering::Relaxed);
            // Settled once everything reserved so far is released: short
            // chunks' room freed on arrival included.
            self.settled_at.store(
                self.reserved_ever.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        self.batch_target()
    }

    /// What may wait for a busy trainer without the room shrinking: two
    /// batches, or a batch and the largest chunk granted where chunks are
    /// larger than batches. Such a chunk arrives whole and trains over
    /// several steps; counting it as excess shrank the room below two
    /// chunks per actor, and the actors, holding one credit each, idled
    /// while their last chunk trained (2 actors of 256 environments: the
    /// trainer waited for data 11 % of its time).
    fn enough_queued(&self, batch: u64) -> u64 {
        (2 * batch).max(batch + self.largest_chunk.load(Ordering::Relaxed))
    }

    /// [`try_reserve_leaving`](Self::try_reserve_leaving) with nothing kept.
    #[cfg(test)]
    pub(crate) fn try_reserve(self: &Arc<Self>, amount: u64) -> Option<CreditToken> {
        self.try_reserve_leaving(amount, None)
    }

    /// Reserves `amount` if it fits the room. Also when it does not, while
    /// less than the batch being built is reserved in all: that batch must
    /// always be able to fill, even when chunks came in smaller than their
    /// reservations (truncated trajectories) or a chunk is larger than the
    /// room. With `kept`, leaves that much free for a session waiting for
    /// room for a larger chunk: then only within the room, never past it
    /// for the batch (that session's chunk fills it).
    pub(super) fn try_reserve_leaving(
        self: &Arc<Self>,
        amount: u64,
        kept: Option<u64>,
    ) -> Option<CreditToken> {
        let capacity = self.capacity();
        let building = self.building.load(Ordering::Relaxed);
        let reserved = self
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let fits = match kept {
                    None => used + amount <= capacity || used < building,
                    Some(kept) => used.saturating_add(amount).saturating_add(kept) <= capacity,
                };
                fits.then_some(used + amount)
            });
        reserved.ok()?;
        self.reserved_ever.fetch_add(amount, Ordering::Relaxed);
        Some(CreditToken {
            pool: self.clone(),
            reserved: amount,
            queued: 0,
            freed_on_arrival: 0,
            held: None,
            reserved_at: Instant::now(),
        })
    }
}

/// Room reserved for one chunk. Dropping it gives the room back (and wakes
/// the controller); the trainer's batch builder drops it once the chunk is
/// in a batch, or once its last part is ([`CreditToken::split_off`]).
#[derive(Debug)]
pub struct CreditToken {
    pool: Arc<CreditPool>,
    reserved: u64,
    /// Transitions counted as waiting for the trainer.
    queued: u64,
    /// Room given back when the chunk arrived smaller than reserved;
    /// counted as released when the chunk is trained.
    freed_on_arrival: u64,
    /// The granting session's count of credits alive (granted, and their
    /// chunk not yet taken by the trainer), lowered on drop.
    pub(super) held: Option<Arc<AtomicU64>>,
    /// When the controller granted it (not when the session sent it on:
    /// a credit granted before a pause may reach the actor after it).
    reserved_at: Instant,
}

impl CreditToken {
    /// When the controller granted this credit.
    pub fn reserved_at(&self) -> std::time::Instant {
        self.reserved_at.into_std()
    }

    /// The chunk arrived with `transitions`: keep only that much room (a
    /// chunk of truncated trajectories needs less than was reserved) and
    /// count it as waiting for the trainer.
    pub fn arrived(&mut self, transitions: u64) {
        let keep = transitions.min(self.reserved);
        let freed = self.reserved - keep;
        self.reserved = keep;
        self.queued = keep;
        self.pool.queued.fetch_add(keep, Ordering::Relaxed);
        self.freed_on_arrival += freed;
        self.pool.in_use.fetch_sub(freed, Ordering::AcqRel);
        // Less on the way now: the controller may grant again.
        self.pool.wake.notify_one();
    }

    /// Room for `transitions` of the arrived chunk, as a token of its own:
    /// part of the chunk goes into a batch ahead of the rest, and its
    /// room comes back when that part is trained, not when the whole chunk
    /// is. This token keeps the rest, and the session's count of credits
    /// alive drops only with it: the actor's credit was for the whole
    /// chunk.
    pub fn split_off(&mut self, transitions: u64) -> CreditToken {
        let reserved = transitions.min(self.reserved);
        let queued = transitions.min(self.queued);
        self.reserved -= reserved;
        self.queued -= queued;
        CreditToken {
            pool: self.pool.clone(),
            reserved,
            queued,
            freed_on_arrival: 0,
            held: None,
            reserved_at: self.reserved_at,
        }
    }
}

impl Drop for CreditToken {
    fn drop(&mut self) {
        self.pool.queued.fetch_sub(self.queued, Ordering::Relaxed);
        self.pool.in_use.fetch_sub(self.reserved, Ordering::AcqRel);
        self.pool
            .released
            .fetch_add(self.reserved + self.freed_on_arrival, Ordering::Relaxed);
        if let Some(held) = &self.held {
            held.fetch_sub(1, Ordering::AcqRel);
        }
        self.pool.wake.notify_one();
    }
}
