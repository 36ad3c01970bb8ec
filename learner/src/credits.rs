//! Credits: production follows consumption.
//!
//! An actor may send a chunk only for a credit the learner granted. Each
//! credit reserves room for a full chunk (the actor's declared trajectories
//! per chunk x the task's longest trajectory) in one learner-wide
//! [`CreditPool`]; the room comes back when the trainer takes the chunk into
//! a batch (the [`CreditToken`] travels with the chunk and is dropped
//! there; a chunk larger than a batch trains over several steps and gives
//! its room back part by part, [`CreditToken::split_off`]). So everything
//! granted and not yet trained fits in the pool's capacity (or passes it
//! by less than the batch being built and one chunk, where that batch
//! needs more than the room holds, and by what was in use when the room
//! shrank), and policy lag is
//! bounded by it, whatever the network's latency and however many actors
//! connect: more actors share the same room instead of piling up stale
//! data.
//!
//! The capacity starts at [`INITIAL_ROOM_BATCHES`] smallest batches and
//! adapts between a floor (one smallest batch) and a ceiling
//! (`learner.max_in_flight_batches` largest batches): the batch builder
//! grows it while the trainer waits for batches, and shrinks it by what
//! waits beyond two batches (a batch and a chunk, where chunks are larger)
//! while the trainer is busy; after each change it waits until what was in
//! flight then has been trained (one turn of the credits, however long the
//! link) before it reads those signals again.
//! The batch itself grows with the data in flight
//! ([`CreditPool::batch_target`]: granted-not-trained /
//! max_in_flight_batches, between the smallest and largest batch), so data
//! granted is trained within about `max_in_flight_batches` steps whatever
//! the room. On loopback the room stays near the floor and lag at a few
//! steps; behind a slow link it opens up to the bandwidth-delay product:
//! the lag grows first, up to about `max_in_flight_batches`, and then the
//! batches.
//!
//! One task, the [`Controller`], owns the list of sessions and hands out
//! credits round-robin, each session holding at most one credit more than
//! its fair share (among the sessions not paused), and at least two (one
//! chunk rolling out, one on the way) however many share the room; the
//! first session left with no credit because its chunk does not fit what
//! is free is kept room for until it is served (sessions of small chunks
//! would otherwise take the room as it comes back and starve one of large
//! chunks); a session whose actor sits on a credit for
//! `learner.stall_timeout_s` is ended, which returns its credits. Before
//! that, a session that holds credits and has sent no chunk for a while
//! ([`QUIET_AFTER`], or four times its own pace) is quiet: it is granted
//! nothing more, and its credits no longer count as covering the last
//! batches, until a chunk of it arrives (an actor paused or hung would
//! otherwise soak up its share of every credit let out, and near the end
//! hold back the last steps until its session is ended). Its fair share
//! stays its own: a session slow to send its first chunk (weights to
//! load, a GPU to warm up) finds it there. Near
//! `learner.max_steps`, credits are granted only while what is in use
//! falls short of the batches the builder will still collate
//! ([`CreditPool::collated`]), and none after the last; each long wait
//! for data, where the taper holds grants back, lets out one more batch's
//! worth (an actor holding the last credits may have stopped answering),
//! never the whole room at once.
//!
//! A session whose chunks arrive already older than `max_policy_lag` (an
//! actor far behind a slow link while near ones set the pace) would only
//! roll out for the stale counter: the session [`pauses`](SessionCredits::pause)
//! its credits, then probes with one credit at a time until a chunk arrives
//! fresh again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

/// Most credits one session holds at a time. Each is one chunk on its way,
/// often one small HTTP/2 DATA frame, and h2 (>= 0.4.20) closes a
/// connection on which frames below 256 bytes wait unread for more than
/// about 25,600 bytes of framing overhead (about 100 of them): 64 stays
/// clear of that even when every chunk is tiny, and is far more than one
/// actor rolling out one chunk at a time needs in flight.
pub const MAX_CREDITS_PER_SESSION: u32 = 64;

/// A session holding credits that has sent no chunk for this long, and for
/// four times its usual interval between chunks, counted from its last
/// chunk (or from the credit that ended a time with none), is quiet (see
/// the module docs). Far longer than a chunk of the default job takes to
/// come back on any link measured (a rollout and 25 ms each way: about
/// 60 ms), far shorter than `learner.stall_timeout_s`; actors slower than
/// that set their own pace.
pub const QUIET_AFTER: Duration = Duration::from_secs(2);

/// How many of its usual intervals between chunks a session may go
/// without one before it is quiet.
const QUIET_INTERVALS: u32 = 4;

/// A session's chunks in time, to tell when it has gone quiet.
#[derive(Debug)]
struct Pace {
    /// The last chunk's arrival, or the credit that ended a time with none.
    last: Instant,
    /// The usual interval between its chunks (a moving average; None
    /// before the first chunk, whose interval counts from the session's
    /// start, weights loading included: an over-estimate, which only
    /// makes the session slower to count as quiet, and which the next
    /// chunks average away).
    interval: Option<Duration>,
}

impl Pace {
    fn new(now: Instant) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Pace {
            last: now,
            interval: None,
        }))
    }

    /// A chunk arrived.
    fn arrived(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last);
        self.interval = Some(self.interval.map_or(gap, |usual| (usual * 7 + gap) / 8));
        self.last = now;
    }

    /// When the session turns quiet if no chunk comes.
    fn quiet_from(&self) -> Instant {
        let usual = self.interval.unwrap_or_default() * QUIET_INTERVALS;
        self.last + QUIET_AFTER.max(usual)
    }
}

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
    capacity: AtomicU64,
    floor: u64,
    ceiling: u64,
    /// Smallest and largest batch, and how many batches the room holds at
    /// most.
    batch: (u64, u64),
    batches: u64,
    /// The batch being built: the target the last [`CreditPool::adapt`]
    /// returned (a long wait may move the room, not the batch under way).
    building: AtomicU64,
    /// Chunks whose actor had no credit left when it finished them: it sat
    /// idle until the next grant reached it. Without such events
    /// the actors, not the room, limit supply, and more room would only
    /// queue credits whose weights age.
    idle_actors: AtomicU64,
    /// Whether, since the last batch, a session holding no credit could
    /// not be given one for want of room: read only when the batch builder
    /// has waited long for data ([`CreditPool::adapt_while_waiting`]), so
    /// the room's usual dynamics do not depend on it.
    unserved: AtomicBool,
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
    largest_chunk: AtomicU64,
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
    quiet_held: AtomicU64,
    /// Wakes the controller: room freed, capacity changed, a credit used.
    wake: Notify,
}

impl CreditPool {
    /// A pool for batches of `min_batch` to `max_batch` transitions whose
    /// room starts at [`INITIAL_ROOM_BATCHES`] smallest batches and adapts
    /// between one smallest batch and `batches` largest ones.
    pub fn new(min_batch: u64, max_batch: u64, batches: u64) -> Arc<Self> {
        let floor = min_batch.max(1);
        let max_batch = max_batch.max(floor);
        let ceiling = max_batch * batches.max(1);
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

    /// The batch builder collated the batch for `step`: the batches after
    /// it, up to the last step, are what credits are still granted for,
    /// only while what is in use falls short of them at the current
    /// target, so the last steps' supply does not outlast them; none at
    /// all once the last batch is collated. Credits already granted stay
    /// valid; sessions learn that training is done when the final weights
    /// are published.
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
    fn covers_what_is_left(&self) -> bool {
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
        self.building.store(target, Ordering::Relaxed);
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
    }

    /// Grows, shrinks or keeps the room (not before the last change has
    /// settled, unless `now`); returns the batch to build (at the next
    /// [`CreditPool::adapt`]: the one under way keeps its target).
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
        self.wake.notify_one();
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
    fn try_reserve_leaving(
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
    held: Option<Arc<AtomicU64>>,
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

/// Whether the controller may grant to a session now.
#[derive(Debug, Default)]
struct Throttle {
    /// No credit before this.
    paused_until: Mutex<Option<Instant>>,
    /// After a pause: one credit at a time until a chunk arrives fresh.
    probing: AtomicBool,
}

impl Throttle {
    /// The most credits the session may hold now (None: no limit here), and
    /// when a pause ends, if one is on.
    fn cap(&self, now: Instant) -> (Option<u32>, Option<Instant>) {
        let until = *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match until {
            Some(until) if until > now => (Some(0), Some(until)),
            _ if self.probing.load(Ordering::Acquire) => (Some(1), None),
            _ => (None, None),
        }
    }
}

/// A session's end of the controller: credits arrive on `tokens`.
#[derive(Debug)]
pub struct SessionCredits {
    /// One token per credit, in grant order.
    pub tokens: mpsc::UnboundedReceiver<CreditToken>,
    /// Credits granted whose chunk has not arrived; the session lowers it
    /// with [`SessionCredits::used`].
    outstanding: Arc<AtomicU32>,
    /// Its chunks in time (see [`Member::pace`]).
    pace: Arc<Mutex<Pace>>,
    throttle: Arc<Throttle>,
    /// The session's chunks in memory, as the controller counts them: an
    /// actor idle because its session holds all it may is no sign that
    /// the room is short.
    memory: SessionMemory,
    pool: Arc<CreditPool>,
}

/// A session's chunks in memory and their bound, shared by the controller
/// (which grants within it) and the session.
#[derive(Clone, Debug)]
struct SessionMemory {
    /// Credits alive: granted, and their chunk (its last part) not yet in
    /// a batch. Each stands for at most one chunk held in memory for this
    /// session.
    held: Arc<AtomicU64>,
    /// Most credits alive at once (`learner.max_session_bytes` over the
    /// bytes of one chunk), exceeded only while the batch being built
    /// could not fill otherwise (so by at most that batch and one chunk,
    /// learner-wide).
    max_held: u64,
}

impl SessionMemory {
    /// Whether the session may take another credit: within its memory, or
    /// beyond it while the batch being built could not fill otherwise (as
    /// the room itself allows): held chunks wait for that batch, which
    /// waits for more data.
    fn allows_another(&self, pool: &CreditPool) -> bool {
        self.held.load(Ordering::Acquire) < self.max_held
            || pool.in_use() < pool.building.load(Ordering::Relaxed)
    }
}

impl Drop for SessionCredits {
    /// The controller looks again at once: a session that leaves holding
    /// no credit wakes it through no token, and until it looks, the
    /// session counts in the fair share and may keep room from the
    /// others (as the starved one). Closed first, so that the controller
    /// woken sees it gone.
    fn drop(&mut self) {
        self.tokens.close();
        self.pool.wake.notify_one();
    }
}

impl SessionCredits {
    /// No credit for `duration`; then one at a time until
    /// [`fresh`](Self::fresh): this actor's chunks arrive too old to train.
    pub fn pause(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut paused = self
            .throttle
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *paused = Some(paused.map_or(until, |current| current.max(until)));
        self.throttle.probing.store(true, Ordering::Release);
        drop(paused);
        self.pool.wake.notify_one();
    }

    /// A chunk arrived fresh: any pause ends, and credits flow as usual
    /// again. True when the session was paused or probing.
    pub fn fresh(&self) -> bool {
        let was_paused = self
            .throttle
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .is_some();
        let was_probing = self.throttle.probing.swap(false, Ordering::AcqRel) || was_paused;
        if was_probing {
            self.pool.wake.notify_one();
        }
        was_probing
    }

    /// One credit was used (its chunk arrived); `idle`: the actor had no
    /// other credit left to start. Only an actor idle for want of room
    /// counts: one paused or probing (its chunks arrive too old), or held
    /// back by its memory bound, would stay idle however large the room,
    /// and growing it would only age the others' credits.
    /// (Nor one held back near the end, where what is granted covers
    /// every batch left.)
    pub fn used(&self, idle: bool) {
        self.pace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .arrived(Instant::now());
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        let throttled = self.throttle.cap(Instant::now()).0.is_some();
        if idle
            && !throttled
            && self.memory.allows_another(&self.pool)
            && !self.pool.covers_what_is_left()
        {
            self.pool.idle_actors.fetch_add(1, Ordering::Relaxed);
        }
        self.pool.wake.notify_one();
    }
}

struct Member {
    reserve: u64,
    outstanding: Arc<AtomicU32>,
    /// Its chunks in time: holding credits past [`Pace::quiet_from`], it
    /// is quiet.
    pace: Arc<Mutex<Pace>>,
    /// Whether it was quiet when this grant round began: one verdict per
    /// round, the same for the room it holds and for what it is granted.
    quiet: bool,
    memory: SessionMemory,
    throttle: Arc<Throttle>,
    tokens: mpsc::UnboundedSender<CreditToken>,
}

impl Member {
    /// When the session turns quiet, if it holds credits (it may be past).
    fn quiet_from(&self) -> Option<Instant> {
        (self.outstanding.load(Ordering::Acquire) > 0).then(|| {
            self.pace
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .quiet_from()
        })
    }
}

/// A request to join the rotation.
struct Join {
    reserve: u64,
    max_held: u64,
    reply: tokio::sync::oneshot::Sender<SessionCredits>,
}

/// Handle to the controller task.
#[derive(Clone, Debug)]
pub struct Controller {
    joins: mpsc::Sender<Join>,
    pool: Arc<CreditPool>,
}

impl Controller {
    /// Starts the controller task; it ends when `stop` turns true.
    pub fn spawn(pool: Arc<CreditPool>, stop: watch::Receiver<bool>) -> Self {
        let (joins, receiver) = mpsc::channel(64);
        tokio::spawn(control(pool.clone(), receiver, stop));
        Controller { joins, pool }
    }

    /// The pool this controller grants from.
    pub fn pool(&self) -> &Arc<CreditPool> {
        &self.pool
    }

    /// Adds a session whose chunks need `reserve` transitions of room each
    /// and which may hold at most `max_held` chunks at once (granted, on
    /// their way or waiting for the trainer; at least 1). None when the
    /// learner is stopping.
    pub async fn join(&self, reserve: u64, max_held: u64) -> Option<SessionCredits> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let max_held = max_held.max(1);
        self.joins
            .send(Join {
                reserve,
                max_held,
                reply,
            })
            .await
            .ok()?;
        answer.await.ok()
    }
}

/// A session with no credit left that the room could not serve: until
/// it is served, the room it needs is kept from the others. Without
/// this, a session of large chunks could wait for ever behind sessions of
/// small ones, which take every bit of room as it comes back (the
/// trainer frees a batch at a time, less than one large chunk).
struct Starved {
    /// The session (its credit count identifies it).
    outstanding: Arc<AtomicU32>,
    /// The room it waits for.
    reserve: u64,
}

/// The controller loop: admit sessions, grant while there is room, sleep
/// until something changes.
async fn control(
    pool: Arc<CreditPool>,
    mut joins: mpsc::Receiver<Join>,
    mut stop: watch::Receiver<bool>,
) {
    let mut members: VecDeque<Member> = VecDeque::new();
    let mut starved: Option<Starved> = None;
    loop {
        members.retain(|m| !m.tokens.is_closed());
        // A starved session that left waits for nothing.
        if let Some(waiting) = &starved
            && !members
                .iter()
                .any(|m| Arc::ptr_eq(&m.outstanding, &waiting.outstanding))
        {
            starved = None;
        }
        let largest_chunk = members.iter().map(|m| m.reserve).max().unwrap_or(0);
        pool.largest_chunk.store(largest_chunk, Ordering::Relaxed);
        let next_resume = grant_round_robin(&pool, &mut members, &mut starved);
        let resume = async {
            match next_resume {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            join = joins.recv() => {
                let Some(Join { reserve, max_held, reply }) = join else { return };
                let (sender, tokens) = mpsc::unbounded_channel();
                let outstanding = Arc::new(AtomicU32::new(0));
                let pace = Pace::new(Instant::now());
                let throttle = Arc::new(Throttle::default());
                let memory = SessionMemory {
                    held: Arc::new(AtomicU64::new(0)),
                    max_held,
                };
                let credits = SessionCredits {
                    tokens,
                    outstanding: outstanding.clone(),
                    pace: pace.clone(),
                    throttle: throttle.clone(),
                    memory: memory.clone(),
                    pool: pool.clone(),
                };
                if reply.send(credits).is_ok() {
                    members.push_back(Member {
                        reserve,
                        outstanding,
                        pace,
                        quiet: false,
                        memory,
                        throttle,
                        tokens: sender,
                    });
                }
            }
            () = pool.wake.notified() => {}
            () = resume => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// Grants one credit at a time to the session at the front, moving it to
/// the back, until no session can take one. Returns the earliest time a
/// pause ends or a session holding credits turns quiet, when the
/// controller looks again; stops early where what is granted covers the
/// batches left (see [`CreditPool::collated`]).
fn grant_round_robin(
    pool: &Arc<CreditPool>,
    members: &mut VecDeque<Member>,
    starved: &mut Option<Starved>,
) -> Option<Instant> {
    let now = Instant::now();
    let mut next_resume = mark_quiet(pool, members, now);
    let sessions = sharing_sessions(members, now);
    let mut idle_in_a_row = 0;
    while idle_in_a_row < members.len() {
        // Near the end of training: enough is granted for every batch
        // left, so nobody is short of room.
        if pool.covers_what_is_left() {
            break;
        }
        let Some(member) = members.pop_front() else {
            break;
        };
        let granted = !member.quiet && {
            let (throttled, resume) = member.throttle.cap(now);
            next_resume = earliest(next_resume, resume);
            grant_turn(pool, &member, starved, sessions, throttled, now)
        };
        idle_in_a_row = if granted { 0 } else { idle_in_a_row + 1 };
        members.push_back(member);
    }
    next_resume
}

/// The earlier of two times, either may be missing.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Marks each session quiet or not for this round, and tells the pool
/// the room the quiet ones hold: quiet sessions take nothing, and their
/// room does not cover the last batches. Returns when the next session
/// holding credits would turn quiet, for the controller to look again.
fn mark_quiet(pool: &CreditPool, members: &mut VecDeque<Member>, now: Instant) -> Option<Instant> {
    let mut quiet_held = 0;
    let mut next_quiet = None;
    for member in members.iter_mut() {
        let quiet_from = member.quiet_from();
        member.quiet = quiet_from.is_some_and(|from| from <= now);
        match quiet_from {
            Some(_) if member.quiet => {
                let credits = u64::from(member.outstanding.load(Ordering::Acquire));
                quiet_held += credits * member.reserve;
            }
            from => next_quiet = earliest(next_quiet, from),
        }
    }
    pool.quiet_held.store(quiet_held, Ordering::Release);
    next_quiet
}

/// How many sessions the fair share divides the room among: those that
/// may take credits. A paused one takes none (and its chunks arrive too
/// old to train), so counting it would only shrink the others' shares.
/// (A quiet one counts: its share waits for it to send again.)
fn sharing_sessions(members: &VecDeque<Member>, now: Instant) -> u64 {
    members
        .iter()
        .filter(|m| m.throttle.cap(now).0 != Some(0))
        .count()
        .max(1) as u64
}

/// One session's turn: grants it a credit if it is under its cap, within
/// its memory and the room has space (leaving the starved session's room
/// free unless it is that session), and keeps the starved record up to
/// date. Whether a credit was granted.
fn grant_turn(
    pool: &Arc<CreditPool>,
    member: &Member,
    starved: &mut Option<Starved>,
    sessions: u64,
    throttled: Option<u32>,
    now: Instant,
) -> bool {
    let within_memory = member.memory.allows_another(pool);
    let mut is_starved = starved
        .as_ref()
        .is_some_and(|s| Arc::ptr_eq(&s.outstanding, &member.outstanding));
    // A paused session takes no credit: room kept for it would only idle
    // the others until the pause ends.
    if is_starved && throttled == Some(0) {
        *starved = None;
        is_starved = false;
    }
    let kept = starved.as_ref().filter(|_| !is_starved).map(|s| s.reserve);
    let granted = member.outstanding.load(Ordering::Acquire)
        < member.cap(pool, sessions, throttled)
        && within_memory
        && grant_one(pool, member, kept, now);
    if granted && is_starved {
        *starved = None;
    }
    if !granted {
        note_unserved(pool, member, starved, within_memory, throttled);
    }
    granted
}

impl Member {
    /// The most credits it may hold now: one more than its fair share of
    /// the current room, at least 2 (one chunk rolling out, one on the
    /// way), at most [`MAX_CREDITS_PER_SESSION`]; fewer while throttled.
    fn cap(&self, pool: &CreditPool, sessions: u64, throttled: Option<u32>) -> u32 {
        let fair = pool.capacity() / (self.reserve.max(1) * sessions);
        u32::try_from(fair + 1)
            .unwrap_or(u32::MAX)
            .clamp(2, MAX_CREDITS_PER_SESSION)
            .min(throttled.unwrap_or(u32::MAX))
    }
}

/// Reserves one chunk's room (leaving `kept` free) and sends the credit
/// to the session. Whether it was sent.
fn grant_one(pool: &Arc<CreditPool>, member: &Member, kept: Option<u64>, now: Instant) -> bool {
    let Some(mut token) = pool.try_reserve_leaving(member.reserve, kept) else {
        return false;
    };
    if member.outstanding.fetch_add(1, Ordering::AcqRel) == 0 {
        // Back for more: its quiet clock starts now.
        member
            .pace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last = now;
    }
    member.memory.held.fetch_add(1, Ordering::AcqRel);
    token.held = Some(member.memory.held.clone());
    member.tokens.send(token).is_ok()
}

/// A session granted nothing this turn: one holding no credit at all
/// that the room cannot serve sits idle for want of room (see
/// [`CreditPool::unserved`]), and the first such is kept room for.
fn note_unserved(
    pool: &CreditPool,
    member: &Member,
    starved: &mut Option<Starved>,
    within_memory: bool,
    throttled: Option<u32>,
) {
    let wants_one = member.outstanding.load(Ordering::Acquire) == 0 && within_memory;
    if wants_one && throttled.is_none() {
        pool.unserved.store(true, Ordering::Relaxed);
    }
    // Probing after a pause counts too: a probe needs a credit, and only
    // a fresh chunk ends the probing.
    if wants_one && throttled != Some(0) && starved.is_none() {
        *starved = Some(Starved {
            outstanding: member.outstanding.clone(),
            reserve: member.reserve,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running controller over a room for 1,000 one-transition chunks
    /// whose batches start at `min_batch`, and one session of
    /// one-transition chunks holding at most `max_held`.
    struct OneSession {
        session: SessionCredits,
        pool: Arc<CreditPool>,
        /// Kept: the controller stops when its handle and stop signal go.
        _controller: Controller,
        _stop: watch::Sender<bool>,
    }

    async fn one_session(min_batch: u64, max_held: u64) -> OneSession {
        let pool = CreditPool::new(min_batch, 1000, 1);
        pool.capacity.store(1000, Ordering::Relaxed);
        let (stop_sender, stop) = watch::channel(false);
        let controller = Controller::spawn(pool.clone(), stop);
        let session = controller.join(1, max_held).await.unwrap();
        OneSession {
            session,
            pool,
            _controller: controller,
            _stop: stop_sender,
        }
    }

    /// Long enough for the controller to grant whatever it will.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// The credits granted so far.
    fn take(session: &mut SessionCredits) -> Vec<CreditToken> {
        std::iter::from_fn(|| session.tokens.try_recv().ok()).collect()
    }

    #[test]
    fn room_is_reserved_shrunk_on_arrival_and_returned_on_drop() {
        // A room of one batch of 100 that cannot grow.
        let pool = CreditPool::new(100, 100, 1);
        let mut a = pool.try_reserve(60).unwrap();
        let mut b = pool.try_reserve(60).unwrap();
        assert_eq!(
            pool.in_use(),
            120,
            "over the room, but 60 is less than the batch of 100"
        );
        assert!(
            pool.try_reserve(60).is_none(),
            "a batch is reserved and the room is full"
        );
        a.arrived(20);
        b.arrived(60);
        assert_eq!((pool.in_use(), pool.queued()), (80, 80));
        let c = pool.try_reserve(20).unwrap();
        assert_eq!(pool.in_use(), 100);
        drop((a, b, c));
        assert_eq!((pool.in_use(), pool.queued()), (0, 0));
    }

    #[test]
    fn idleness_while_the_trainer_was_busy_does_not_grow_the_room_later() {
        let pool = CreditPool::new(100, 100, 8);
        pool.capacity.store(400, Ordering::Relaxed);
        let idle = || pool.idle_actors.fetch_add(1, Ordering::Relaxed);
        idle();
        pool.adapt(false);
        assert_eq!(pool.capacity(), 400, "the trainer was busy: no growth");
        pool.adapt(true);
        assert_eq!(
            pool.capacity(),
            400,
            "starved, but no actor idle since the last batch"
        );
        idle();
        pool.adapt(true);
        assert!(pool.capacity() > 400, "starved with an idle actor: grow");
    }

    #[test]
    fn a_hold_lasts_until_what_was_in_flight_is_trained_however_short_the_newer_chunks() {
        let pool = CreditPool::new(100, 100, 8);
        pool.capacity.store(400, Ordering::Relaxed);
        let mut in_flight = pool.try_reserve(400).unwrap();
        in_flight.arrived(400);
        let idle = || pool.idle_actors.fetch_add(1, Ordering::Relaxed);
        idle();
        pool.adapt(true);
        assert_eq!(pool.capacity(), 500, "starved with data queued: grow");
        // Newer chunks of truncated trajectories arrive far smaller than
        // reserved: together they give back more room than was in flight
        // at the change, before any of that is trained.
        let newer: Vec<_> = (0..5)
            .map(|_| {
                let mut chunk = pool.try_reserve(90).unwrap();
                chunk.arrived(1);
                chunk
            })
            .collect();
        idle();
        pool.adapt(true);
        assert_eq!(pool.capacity(), 500, "held: nothing in flight was trained");
        drop(in_flight);
        idle();
        pool.adapt(true);
        assert_eq!(pool.capacity(), 625, "trained: the room grows again");
        drop(newer);
    }

    #[test]
    fn a_short_chunk_queued_at_a_change_counts_whole_in_the_hold() {
        let pool = CreditPool::new(100, 100, 8);
        pool.capacity.store(400, Ordering::Relaxed);
        // At the change: one short chunk queued (90 reserved, 1 arrived)
        // and 400 on the way.
        let mut short = pool.try_reserve(90).unwrap();
        short.arrived(1);
        let on_the_way = pool.try_reserve(400).unwrap();
        let idle = || pool.idle_actors.fetch_add(1, Ordering::Relaxed);
        idle();
        pool.adapt(true);
        assert_eq!(pool.capacity(), 500, "starved with data queued: grow");
        // The short chunk and newer short ones are trained; together they
        // release more than the 401 in use at the change, but not the 400
        // still on the way.
        drop(short);
        for _ in 0..4 {
            let mut newer = pool.try_reserve(90).unwrap();
            newer.arrived(1);
            drop(newer);
        }
        idle();
        pool.adapt(true);
        assert_eq!(pool.capacity(), 500, "held: the 400 are not trained yet");
        drop(on_the_way);
        idle();
        pool.adapt(true);
        assert!(pool.capacity() > 500, "all trained: the room grows again");
    }

    /// `transitions` reserved and arrived: a chunk waiting for the trainer.
    fn queued(pool: &Arc<CreditPool>, transitions: u64) -> CreditToken {
        let mut token = pool.try_reserve(transitions).unwrap();
        token.arrived(transitions);
        token
    }

    #[test]
    fn a_chunk_larger_than_two_batches_waiting_is_not_room_to_give_back() {
        // Batches of 100 to 1,000; the room starts at 3,200.
        let pool = CreditPool::new(100, 1000, 8);
        // As the controller sets it for sessions of chunks of 1,600.
        pool.largest_chunk.store(1600, Ordering::Relaxed);
        let _first = queued(&pool, 1600);
        pool.adapt(false);
        assert_eq!(
            pool.capacity(),
            3200,
            "one chunk of 1,600 waiting (a batch of 200 and the chunk): hold"
        );
        let _second = queued(&pool, 1600);
        pool.adapt(false);
        assert_eq!(
            pool.capacity(),
            2400,
            "3,200 waiting, 1,200 beyond a batch of 400 and a chunk: shrink by a quarter at most"
        );
    }

    #[test]
    fn room_grows_when_starved_shrinks_when_data_waits_and_the_batch_follows() {
        // Batches of 100 to 200, room for up to 4 of the largest.
        let pool = CreditPool::new(100, 200, 4);
        assert_eq!(
            (pool.capacity(), pool.batch_target()),
            (800, 100),
            "starts at INITIAL_ROOM_BATCHES smallest batches, within the ceiling"
        );
        // Down to one batch, for the rules below.
        let mut queue = queued(&pool, 400);
        for _ in 0..100 {
            drop(queue);
            queue = queued(&pool, 400);
            pool.adapt(false);
        }
        drop(queue);
        assert_eq!(pool.capacity(), 100, "clamped at the floor");
        assert_eq!(pool.adapt(false), 100);
        assert_eq!(
            pool.capacity(),
            100,
            "a busy trainer with nothing queued: hold"
        );
        pool.adapt(true);
        assert_eq!(
            pool.capacity(),
            100,
            "a waiting trainer but no idle actor: hold"
        );
        let idle = || pool.idle_actors.fetch_add(1, Ordering::Relaxed);
        idle();
        pool.adapt(true);
        assert_eq!(
            pool.capacity(),
            200,
            "a waiting trainer, an idle actor, nothing queued: double"
        );
        let mut some = pool.try_reserve(50).unwrap();
        some.arrived(50);
        idle();
        pool.adapt(true);
        assert_eq!(
            pool.capacity(),
            300,
            "a waiting trainer, little queued: grow by a batch"
        );
        idle();
        pool.adapt(true);
        assert_eq!(
            pool.capacity(),
            300,
            "held until what was in flight at the change is trained"
        );
        drop(some);
        for _ in 0..20 {
            idle();
            pool.adapt(true);
        }
        assert_eq!(pool.capacity(), 800, "clamped at the ceiling");
        assert_eq!(pool.batch_target(), 100, "nothing in flight yet");
        let held = queued(&pool, 500);
        assert_eq!(
            pool.batch_target(),
            125,
            "the batch grows with the data in flight"
        );
        pool.adapt(false);
        assert_eq!(
            pool.capacity(),
            600,
            "4 batches of 125 waiting: shrink by what waits beyond two, a quarter at most"
        );
        pool.adapt(false);
        assert_eq!(
            pool.capacity(),
            600,
            "held until the 500 queued are trained"
        );
        drop(held);
        let queue = |transitions| {
            let waiting = queued(&pool, transitions);
            pool.adapt(false);
            waiting
        };
        drop(queue(300));
        assert_eq!(
            pool.capacity(),
            500,
            "3 batches of 100 waiting: shrink by one"
        );
        let mut held = queue(210);
        assert_eq!(
            pool.capacity(),
            469,
            "10 beyond two batches: shrink by a sixteenth at least"
        );
        for _ in 0..100 {
            // Trained, and as much again waiting: each change settles.
            drop(held);
            held = queued(&pool, 500);
            pool.adapt(false);
        }
        assert_eq!(pool.capacity(), 100, "clamped at the floor");
        assert_eq!(
            pool.batch_target(),
            125,
            "until the data in flight is trained"
        );
        drop(held);
        assert_eq!(pool.batch_target(), 100);
    }

    #[test]
    fn waiting_for_data_grows_the_room_past_the_hold_only_when_nothing_is_trained() {
        let pool = CreditPool::new(100, 100, 32);
        pool.capacity.store(400, Ordering::Relaxed);
        // A silent session holds the whole room.
        let silent = pool.try_reserve(400).unwrap();
        let unserved = || pool.unserved.store(true, Ordering::Relaxed);
        unserved();
        pool.adapt_while_waiting();
        assert_eq!(pool.capacity(), 800, "an actor without a credit: grow");
        unserved();
        pool.adapt_while_waiting();
        assert_eq!(
            pool.capacity(),
            1600,
            "nothing trained since: the last change cannot settle, no hold"
        );
        // Another actor's chunk is trained: the last change is settling.
        let mut chunk = pool.try_reserve(100).unwrap();
        chunk.arrived(100);
        drop(chunk);
        unserved();
        pool.adapt_while_waiting();
        assert_eq!(pool.capacity(), 1600, "trained since: held");
        unserved();
        pool.adapt_while_waiting();
        assert_eq!(pool.capacity(), 3200, "nothing trained since: grow");
        drop(silent);
    }

    #[tokio::test]
    async fn a_stalled_session_holds_at_most_its_share_and_the_busy_one_goes_on() {
        // Room for 8 chunks of 5 transitions.
        let pool = CreditPool::new(40, 40, 1);
        let (_stop, stop) = watch::channel(false);
        let controller = Controller::spawn(pool.clone(), stop);
        let mut busy = controller.join(5, u64::MAX).await.unwrap();
        let mut stalled = controller.join(5, u64::MAX).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..200 {
            let token = tokio::time::timeout(std::time::Duration::from_secs(5), busy.tokens.recv())
                .await
                .expect("the busy session keeps getting credits")
                .unwrap();
            busy.used(false);
            drop(token);
            while let Ok(token) = stalled.tokens.try_recv() {
                held.push(token);
            }
            assert!(pool.in_use() <= 40);
        }
        // Fair share of 8 credits between 2 sessions is 4; the cap is 5.
        assert!(
            (2..=5).contains(&held.len()),
            "the stalled session holds {}",
            held.len()
        );
    }

    /// A session that leaves holding no credit is out of the rotation at
    /// once: it no longer sets the largest chunk (nor the fair share, nor
    /// the room kept for a starved session), without waiting for some
    /// other event to wake the controller.
    #[tokio::test]
    async fn a_session_leaving_without_credits_is_dropped_at_once() {
        // Room for 8 chunks of 5 transitions, all taken by `small`.
        let pool = CreditPool::new(40, 40, 1);
        let (_stop, stop) = watch::channel(false);
        let controller = Controller::spawn(pool.clone(), stop);
        let mut small = controller.join(5, u64::MAX).await.unwrap();
        settle().await;
        let held = take(&mut small);
        assert_eq!(held.len(), 8);
        // A session of chunks the room cannot fit now gets nothing.
        let mut large = controller.join(40, u64::MAX).await.unwrap();
        settle().await;
        assert!(take(&mut large).is_empty());
        assert_eq!(pool.largest_chunk.load(Ordering::Relaxed), 40);
        // It leaves. (Nothing else happens: `small` sits on its credits,
        // and turns quiet only after QUIET_AFTER.)
        drop(large);
        settle().await;
        assert_eq!(pool.largest_chunk.load(Ordering::Relaxed), 5);
        drop(held);
    }

    /// The default room (10,240 transitions, batches of 320) filled by a
    /// session of an actor of 16 environments (320 transitions a chunk)
    /// whose chunks arrive as soon as it has the credit and wait for the
    /// trainer.
    struct SmallChunksFillTheRoom {
        pool: Arc<CreditPool>,
        controller: Controller,
        _stop: watch::Sender<bool>,
        small: SessionCredits,
        waiting: VecDeque<CreditToken>,
    }

    impl SmallChunksFillTheRoom {
        async fn new() -> Self {
            let pool = CreditPool::new(320, 320, 32);
            let (stop_sender, stop) = watch::channel(false);
            let controller = Controller::spawn(pool.clone(), stop);
            let small = controller.join(320, u64::MAX).await.unwrap();
            let mut fixture = SmallChunksFillTheRoom {
                pool,
                controller,
                _stop: stop_sender,
                small,
                waiting: VecDeque::new(),
            };
            settle().await;
            fixture.arrive();
            fixture
        }

        /// The chunks of the small session's new credits arrive.
        fn arrive(&mut self) {
            for token in take(&mut self.small) {
                self.small.used(false);
                self.waiting.push_back(token);
            }
        }

        /// The trainer takes the oldest chunk waiting; then the small
        /// session's next chunks arrive.
        async fn train_one(&mut self) {
            drop(self.waiting.pop_front());
            settle().await;
            self.arrive();
        }

        /// Trains small chunks until `large` gets a credit: how many.
        async fn trained_until_served(&mut self, large: &mut SessionCredits) -> Option<usize> {
            for trained in 0..200 {
                if large.tokens.try_recv().is_ok() {
                    return Some(trained);
                }
                self.train_one().await;
            }
            None
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_of_large_chunks_is_not_starved_by_one_of_small_chunks() {
        // An actor of 256 environments (5,120 a chunk) joins the full room.
        let mut room = SmallChunksFillTheRoom::new().await;
        let mut large = room.controller.join(5120, u64::MAX).await.unwrap();
        settle().await;
        let trained = room.trained_until_served(&mut large).await;
        assert!(trained.is_some_and(|n| n <= 32), "served after {trained:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_of_large_chunks_probing_after_a_pause_is_served() {
        // The same, its first credit coming while it probes (one credit
        // at a time) after a pause.
        let mut room = SmallChunksFillTheRoom::new().await;
        let mut large = room.controller.join(5120, u64::MAX).await.unwrap();
        large.pause(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let trained = room.trained_until_served(&mut large).await;
        assert!(trained.is_some_and(|n| n <= 32), "served after {trained:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_room_is_kept_for_a_paused_session() {
        // The large session is paused (its chunks came too old) while it
        // waits: the small one may use the whole room meanwhile.
        let mut room = SmallChunksFillTheRoom::new().await;
        let large = room.controller.join(5120, u64::MAX).await.unwrap();
        // Room is kept for it: the small one is no longer served, and
        // what it holds drains. Then the large one is paused.
        for _ in 0..8 {
            room.train_one().await;
        }
        let pool = room.pool.clone();
        assert!(pool.in_use() <= 8000, "held back: {}", pool.in_use());
        large.pause(Duration::from_secs(60));
        for _ in 0..40 {
            room.train_one().await;
        }
        assert!(
            pool.in_use() > pool.capacity() - 5120,
            "{} of {} in use",
            pool.in_use(),
            pool.capacity()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_session_does_not_shrink_the_share_of_the_others() {
        // Room for 8 chunks of 5 transitions and two sessions: a fair
        // share of 4 each, 5 at most.
        let pool = CreditPool::new(40, 40, 1);
        let (_stop, stop) = watch::channel(false);
        let controller = Controller::spawn(pool.clone(), stop);
        let mut active = controller.join(5, u64::MAX).await.unwrap();
        let mut paused = controller.join(5, u64::MAX).await.unwrap();
        settle().await;
        // The first to join took the whole room before the other came;
        // its chunks are trained, and the room is shared.
        for token in take(&mut active) {
            active.used(false);
            drop(token);
        }
        settle().await;
        let mut held = take(&mut active);
        assert!(held.len() <= 5, "{}", held.len());
        // The other is paused; its chunks arrive and are trained.
        paused.pause(Duration::from_secs(60));
        for token in take(&mut paused) {
            paused.used(false);
            drop(token);
        }
        settle().await;
        held.extend(take(&mut active));
        assert_eq!(held.len(), 8, "the whole room is the active one's share");
        assert!(take(&mut paused).is_empty());
    }

    /// Near the end, each long wait for data lets out one more batch's
    /// worth, not the whole room: what the room holds beyond the batches
    /// left would be rolled out and never trained.
    #[tokio::test(start_paused = true)]
    async fn a_wait_near_the_end_lets_out_one_batch_not_the_room() {
        // Batches of 10 one-transition chunks, a room of 100 batches.
        let pool = CreditPool::new(10, 10, 100);
        pool.capacity.store(1000, Ordering::Relaxed);
        let (_stop, stop) = watch::channel(false);
        let controller = Controller::spawn(pool.clone(), stop);
        // Before anything is granted (actors still starting), a long wait
        // lifts nothing: the taper is not what holds grants back.
        pool.last_step(3, 0);
        pool.adapt_while_waiting();
        // 3 batches left before anything is granted: the taper holds from
        // the first batch.
        let mut session = controller.join(1, u64::MAX).await.unwrap();
        settle().await;
        let mut held = take(&mut session);
        assert_eq!(held.len(), 30, "3 batches of 10, not the room");
        for wait in 1..=2 {
            pool.adapt_while_waiting();
            settle().await;
            let more = take(&mut session);
            assert_eq!(more.len(), 10, "wait {wait}: one batch's worth");
            held.extend(more);
        }
        // The next batch is collated: the taper is the batches left again.
        for token in held.drain(..10) {
            session.used(false);
            drop(token);
        }
        pool.collated(1);
        settle().await;
        assert!(take(&mut session).is_empty(), "40 in use cover 2 batches");
    }

    /// An actor slower than [`QUIET_AFTER`] per chunk sets its own pace:
    /// it is quiet only after four of its usual intervals without a chunk.
    #[test]
    fn a_slow_session_is_quiet_only_after_four_of_its_intervals() {
        let start = Instant::now();
        let pace = Pace::new(start);
        let mut pace = pace.lock().unwrap();
        assert_eq!(pace.quiet_from(), start + QUIET_AFTER);
        let second = Duration::from_secs(1);
        for chunk in 1..=20 {
            pace.arrived(start + 3 * chunk * second);
        }
        assert_eq!(pace.quiet_from(), start + 60 * second + 12 * second);
        // Fast again: back to QUIET_AFTER as its average falls.
        for chunk in 1..=40 {
            pace.arrived(start + 60 * second + chunk * Duration::from_millis(10));
        }
        assert_eq!(pace.quiet_from(), pace.last + QUIET_AFTER);
    }

    /// A session that holds credits and sends nothing for [`QUIET_AFTER`]
    /// (an actor paused or hung) takes no more, and near the end the room
    /// it holds no longer stands for the last batches: the others are
    /// granted them at once, not one batch per long wait until its
    /// session is ended.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_session_takes_no_more_and_does_not_hold_back_the_last_batches() {
        // Batches of 10 one-transition chunks, a room of 10 batches, and
        // 5 batches left to the end of the run.
        let pool = CreditPool::new(10, 10, 10);
        pool.capacity.store(100, Ordering::Relaxed);
        let (_stop, stop) = watch::channel(false);
        let controller = Controller::spawn(pool.clone(), stop);
        pool.last_step(5, 0);
        let mut busy = controller.join(1, u64::MAX).await.unwrap();
        let mut quiet = controller.join(1, u64::MAX).await.unwrap();
        let mut hoard = Vec::new();
        let (mut granted_busy, mut held_quiet) = (Vec::new(), Vec::new());
        // The busy session sends back every chunk each tenth of a second,
        // as the trainer would take them; the quiet one sends none.
        for _ in 0..30 {
            settle().await;
            let tokens = take(&mut busy);
            granted_busy.push(tokens.len());
            for token in tokens {
                busy.used(false);
                drop(token);
            }
            hoard.extend(take(&mut quiet));
            held_quiet.push(hoard.len());
        }
        // Until it turned quiet (2 s after its first credit, round 20), it
        // took the credits of the last batches as the busy one sent its
        // chunks back, and the busy one went without; from then on, the
        // busy one is granted the last batches' worth each round.
        let report = format!("busy took {granted_busy:?}, quiet held {held_quiet:?}");
        assert_eq!(held_quiet[19], 50, "{report}");
        assert!(granted_busy[10..20].iter().all(|&n| n == 0), "{report}");
        assert!(granted_busy[21..].iter().all(|&n| n == 50), "{report}");
        assert_eq!(held_quiet[29], 50, "{report}");

        // With no end in sight and ten times the room, it still takes
        // nothing, and the busy one holds all one session may.
        for _ in take(&mut busy) {
            busy.used(false);
        }
        pool.last_step(u64::MAX, 0);
        pool.capacity.store(1000, Ordering::Relaxed);
        pool.wake.notify_one();
        settle().await;
        assert_eq!(take(&mut busy).len(), MAX_CREDITS_PER_SESSION as usize);
        assert!(take(&mut quiet).is_empty());
        // One chunk of it arrives: it is served again.
        quiet.used(false);
        drop(hoard.pop());
        settle().await;
        assert!(!take(&mut quiet).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn credits_stop_at_what_the_batches_left_need() {
        // Batches of 10 one-transition chunks; 3 batches left.
        let mut fixture = one_session(10, u64::MAX).await;
        let session = &mut fixture.session;
        // What was granted before the limit was set is trained.
        settle().await;
        fixture.pool.last_step(100, 0);
        fixture.pool.collated(97);
        for token in take(session) {
            session.used(false);
            drop(token);
        }
        settle().await;
        let mut held = take(session);
        assert_eq!(held.len(), 30, "3 batches of 10");
        // One batch is taken: 2 left, and what is in use covers them.
        for _ in 0..10 {
            session.used(false);
            held.pop();
        }
        fixture.pool.collated(98);
        settle().await;
        assert!(take(&mut fixture.session).is_empty());
        // The builder waits long for data (the actor holding those credits
        // may have stopped answering): credits flow again until the next
        // batch is collated (see the next test for how many).
        fixture.pool.adapt_while_waiting();
        settle().await;
        let more = take(&mut fixture.session);
        assert!(!more.is_empty(), "served again while starving");
        held.extend(more);
        // The last batch is collated: nothing more, whatever comes back.
        fixture.pool.collated(100);
        // Its chunks arrive and are trained: room and credits come back,
        // and are not granted again.
        for token in held {
            fixture.session.used(true);
            drop(token);
        }
        settle().await;
        assert!(take(&mut fixture.session).is_empty());
        assert_eq!(fixture.pool.in_use(), 0);
        // The builder, past the last batch, waits for data that is not
        // coming while the last step trains: that lifts nothing.
        fixture.pool.adapt_while_waiting();
        settle().await;
        assert!(
            take(&mut fixture.session).is_empty(),
            "granted after the last batch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_session_holds_at_most_max_credits_however_large_the_room() {
        let mut fixture = one_session(1000, u64::MAX).await;
        let pool = fixture.pool.clone();
        settle().await;
        let held = take(&mut fixture.session);
        assert_eq!(held.len(), MAX_CREDITS_PER_SESSION as usize);
        assert_eq!(pool.in_use(), u64::from(MAX_CREDITS_PER_SESSION));
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_session_gets_nothing_then_probes_one_credit_at_a_time() {
        let mut fixture = one_session(1000, u64::MAX).await;
        let session = &mut fixture.session;
        settle().await;
        let before = take(session);
        assert!(before.len() >= 2, "{}", before.len());
        session.pause(Duration::from_millis(400));
        // Its chunks arrive and are trained: room and credits come back.
        for token in before {
            session.used(false);
            drop(token);
        }
        settle().await;
        assert!(take(session).is_empty(), "paused");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let probe = take(session);
        assert_eq!(probe.len(), 1, "one probe after the pause");
        settle().await;
        assert!(take(session).is_empty(), "one credit at a time");
        session.used(false);
        drop(probe);
        settle().await;
        let next = take(session);
        assert_eq!(next.len(), 1, "still probing");
        assert!(session.fresh());
        settle().await;
        assert!(take(session).len() >= 2, "fresh again: credits flow");
        drop(next);
    }

    #[tokio::test(start_paused = true)]
    async fn only_an_actor_idle_for_want_of_room_counts_as_idle() {
        let idle_actors = |pool: &CreditPool| pool.idle_actors.swap(0, Ordering::Relaxed);
        // Free to take credits: its idleness is the room's.
        let mut fixture = one_session(1000, u64::MAX).await;
        settle().await;
        let mut tokens = take(&mut fixture.session);
        assert!(tokens.len() >= 3, "{}", tokens.len());
        fixture.session.used(true);
        drop(tokens.pop());
        assert_eq!(idle_actors(&fixture.pool), 1);
        // Paused, then probing: idle because its chunks are too old.
        fixture.session.pause(Duration::from_millis(400));
        fixture.session.used(true);
        drop(tokens.pop());
        tokio::time::sleep(Duration::from_millis(500)).await;
        fixture.session.used(true);
        drop(tokens.pop());
        assert_eq!(idle_actors(&fixture.pool), 0, "paused or probing");
        // Fresh again: idle counts again.
        assert!(fixture.session.fresh());
        fixture.session.used(true);
        assert_eq!(idle_actors(&fixture.pool), 1);
        drop(tokens);
        drop(take(&mut fixture.session));

        // At its memory bound (2 chunks held): idle because of it.
        let mut fixture = one_session(1, 2).await;
        fixture.pool.adapt(false);
        settle().await;
        let mut waiting = take(&mut fixture.session);
        assert_eq!(waiting.len(), 2);
        for token in &mut waiting {
            token.arrived(1);
        }
        fixture.session.used(true);
        assert_eq!(idle_actors(&fixture.pool), 0, "at its memory bound");
        waiting.pop();
        fixture.session.used(true);
        assert_eq!(idle_actors(&fixture.pool), 1, "below it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_holds_no_more_chunks_than_its_memory_allows() {
        // Plenty of room, batches of one transition, and the session may
        // hold 3 chunks at once.
        let mut fixture = one_session(1, 3).await;
        fixture.pool.adapt(false);
        let session = &mut fixture.session;
        settle().await;
        let mut waiting = take(session);
        for token in &mut waiting {
            // The chunk arrives and waits for the trainer: the credit is
            // used, but its chunk is still held.
            session.used(true);
            token.arrived(1);
        }
        settle().await;
        assert!(take(session).is_empty(), "no credit beyond 3 held chunks");
        assert_eq!(waiting.len(), 3);
        // The trainer takes one chunk: one more credit.
        waiting.pop();
        settle().await;
        assert_eq!(take(session).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_what_one_session_may_hold_still_fills() {
        // The batch being built needs 10 transitions; the one session may
        // hold 3 one-transition chunks. Holding to 3 would leave the
        // batch, and training, waiting for ever.
        let mut fixture = one_session(10, 3).await;
        let session = &mut fixture.session;
        settle().await;
        let mut waiting = take(session);
        for token in &mut waiting {
            session.used(false);
            token.arrived(1);
        }
        settle().await;
        waiting.extend(take(session));
        assert!(waiting.len() >= 10, "{} chunks held", waiting.len());
    }
}
