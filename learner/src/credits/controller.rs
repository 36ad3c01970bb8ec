//! The task that hands out credits ([`Controller`]): admits sessions and
//! grants round-robin within each one's fair share, keeping room for a
//! starved session and none for quiet ones.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::pool::{CreditPool, CreditToken};
use super::session::{Pace, SessionCredits, SessionMemory, Throttle};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Most credits one session holds at a time. Each is one chunk on its way,
/// often one small HTTP/2 DATA frame, and h2 (>= 0.4.20) closes a
/// connection on which frames below 256 bytes wait unread for more than
/// about 25,600 bytes of framing overhead (about 100 of them): 64 stays
/// clear of that even when every chunk is tiny, and is far more than one
/// actor rolling out one chunk at a time needs in flight.
pub const MAX_CREDITS_PER_SESSION: u32 = 64;

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
