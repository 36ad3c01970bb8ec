//! A session's end of the controller ([`SessionCredits`]): the credits
//! it receives, its pace (to tell when it has gone quiet), its throttle
//! after chunks that arrived too old, and its memory bound.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::pool::{CreditPool, CreditToken};
use tokio::sync::mpsc;
use tokio::time::Instant;

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
pub(super) struct Pace {
    /// The last chunk's arrival, or the credit that ended a time with none.
    pub(super) last: Instant,
    /// The usual interval between its chunks (a moving average; None
    /// before the first chunk, whose interval counts from its first
    /// credit, weights loading included: an over-estimate, which only
    /// makes the session slower to count as quiet, and which the next
    /// chunks average away).
    pub(super) interval: Option<Duration>,
}

impl Pace {
    pub(super) fn new(now: Instant) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Pace {
            last: now,
            interval: None,
        }))
    }

    /// A chunk arrived.
    pub(super) fn arrived(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last);
        self.interval = Some(self.interval.map_or(gap, |usual| (usual * 7 + gap) / 8));
        self.last = now;
    }

    /// When the session turns quiet if no chunk comes.
    pub(super) fn quiet_from(&self) -> Instant {
        let usual = self.interval.unwrap_or_default() * QUIET_INTERVALS;
        self.last + QUIET_AFTER.max(usual)
    }
}

/// Whether the controller may grant to a session now.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    /// No credit before this.
    pub(super) paused_until: Mutex<Option<Instant>>,
    /// After a pause: one credit at a time until a chunk arrives fresh.
    pub(super) probing: AtomicBool,
}

impl Throttle {
    /// The most credits the session may hold now (None: no limit here), and
    /// when a pause ends, if one is on.
    pub(super) fn cap(&self, now: Instant) -> (Option<u32>, Option<Instant>) {
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
    pub(super) outstanding: Arc<AtomicU32>,
    /// Its chunks in time (see the controller's `Member::pace`).
    pub(super) pace: Arc<Mutex<Pace>>,
    pub(super) throttle: Arc<Throttle>,
    /// The session's chunks in memory, as the controller counts them: an
    /// actor idle because its session holds all it may is no sign that
    /// the room is short.
    pub(super) memory: SessionMemory,
    pub(super) pool: Arc<CreditPool>,
}

/// A session's chunks in memory and their bound, shared by the controller
/// (which grants within it) and the session.
#[derive(Clone, Debug)]
pub(super) struct SessionMemory {
    /// Credits alive: granted, and their chunk (its last part) not yet in
    /// a batch. Each stands for at most one chunk held in memory for this
    /// session.
    pub(super) held: Arc<AtomicU64>,
    /// Most credits alive at once (`learner.max_session_bytes` over the
    /// bytes of one chunk), exceeded only while the batch being built
    /// could not fill otherwise (so by at most that batch and one chunk,
    /// learner-wide).
    pub(super) max_held: u64,
}

impl SessionMemory {
    /// Whether the session may take another credit: within its memory, or
    /// beyond it while the batch being built could not fill otherwise (as
    /// the room itself allows): held chunks wait for that batch, which
    /// waits for more data.
    pub(super) fn allows_another(&self, pool: &CreditPool) -> bool {
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

    /// One credit was used: its chunk arrived (valid or not).
    pub fn used(&self) {
        self.pace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .arrived(Instant::now());
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.pool.wake.notify_one();
    }

    /// The actor had no other credit left to start when it sent a chunk
    /// the learner accepted (`credits_left` 0): it sits idle. Told only
    /// once the chunk has replayed, so that a refused chunk's word counts
    /// for nothing. Only an actor idle for want of room counts: one paused
    /// or probing (its chunks arrive too old), or held back by its memory
    /// bound, would stay idle however large the room, and growing it would
    /// only age the others' credits. (Nor one held back near the end,
    /// where what is granted covers every batch left.)
    pub fn ran_out(&self) {
        let throttled = self.throttle.cap(Instant::now()).0.is_some();
        if !throttled && self.memory.allows_another(&self.pool) && !self.pool.covers_what_is_left()
        {
            self.pool.idle_actors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
