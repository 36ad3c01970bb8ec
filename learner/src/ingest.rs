//! Ingest: turns a wire chunk into replayed, validated trajectories and
//! keeps the counters the reports read.
//!
//! Validation happens here, at the edge and off the trainer thread: the
//! actor must be known, its policy version must exist, and every action must
//! be legal in the learner's own environment. A chunk is accepted or refused
//! whole, so a refused chunk never leaves half its trajectories behind.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use flgfn_common::auth::same_secret;
use flgfn_common::env::Environment;
use flgfn_common::trajectory::{ReplayedTrajectory, TrajectoryChunk, check_fields, replay};

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

impl QueuedChunk {
    /// Its first `trajectories` trajectories as a chunk of their own (same
    /// actor and policy version) with their share of the credit's room;
    /// this one keeps the rest and the credit. So a chunk larger than a
    /// batch trains over several steps instead of making the batch that
    /// large. `trajectories` must leave at least one behind.
    pub fn split_front(&mut self, trajectories: usize) -> QueuedChunk {
        debug_assert!(0 < trajectories && trajectories < self.chunk.trajectories.len());
        let front: Vec<ReplayedTrajectory> =
            self.chunk.trajectories.drain(..trajectories).collect();
        let transitions: usize = front.iter().map(ReplayedTrajectory::len).sum();
        self.chunk.transitions -= transitions;
        QueuedChunk {
            chunk: IngestedChunk {
                actor_id: self.chunk.actor_id,
                policy_version: self.chunk.policy_version,
                trajectories: front,
                transitions,
                unusable_transitions: 0,
            },
            credit: self.credit.split_off(transitions as u64),
        }
    }
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
    /// Chunks that arrived after training ended (sent before the actor
    /// heard): never trained. With `chunks_received`, every chunk the actor
    /// sent in this session, unless its connection was lost.
    pub late_chunks: u64,
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
    /// Usable transitions in accepted chunks, stale ones included. Counted
    /// just after the chunk is queued for the trainer (one refused there,
    /// the trainer gone, is not accepted): a count read while training
    /// may miss a chunk already in a batch, or already dropped as stale.
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
    /// Chunks an actor numbered but the learner never received: gaps in
    /// its sequence numbers across its reconnects, where a new session
    /// starts above the last one's last chunk (chunks sent into a broken
    /// connection, or rolled out for credits that died with it). Within a
    /// session nothing is counted.
    pub lost_chunks: AtomicU64,
    /// Refusals by reason: chunks ([`RequestError::reason`](crate::error::RequestError::reason),
    /// `undecodable`, `too_large`), handshakes and session openings (the
    /// same reasons prefixed `handshake_` and `session_`), and calls or
    /// connections turned away (`unauthenticated`, `too_many_sessions`,
    /// `too_many_connections`, and clients that do not speak the
    /// learner's transport: see [`crate::connections::Transport`]).
    pub rejections: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Times a session's credits were paused because its chunks arrived
    /// at `max_policy_lag` or older (at the bound, a chunk that misses the
    /// batch being built is stale by the next).
    pub session_pauses: AtomicU64,
    /// Sessions ended because their actor held a credit, or took no grant,
    /// for `learner.stall_timeout_s`.
    pub stalled_sessions: AtomicU64,
    /// Transitions dropped where the batch is built because the policy
    /// that sampled them was more than `max_policy_lag` steps old.
    pub stale_transitions: AtomicU64,
    /// Transitions of truncated trajectories the objective cannot use.
    pub unusable_truncated_transitions: AtomicU64,
    /// Accepted transitions the run ended before training: in the batch
    /// builder's hands or still queued when it stopped. Once every session
    /// has ended, accepted = trained (by this process) + stale + these.
    pub untrained_at_stop_transitions: AtomicU64,
    /// Open sessions.
    pub connected_actors: AtomicI64,
    /// Ended sessions, up to [`MAX_SESSION_RECORDS`].
    pub sessions: Mutex<Vec<SessionRecord>>,
    /// Ended sessions, every one (`sessions` stops at its bound).
    pub sessions_ended: AtomicU64,
    /// When refusals of each reason were last said in the log (see
    /// [`IngestStats::worth_a_line`]).
    refusals_said: Mutex<std::collections::BTreeMap<String, std::time::Instant>>,
}

/// How often, at least, refusals of one reason are said while they go on:
/// counting alone (1, 2, 4, ...) would leave a new fault unsaid for hours
/// after a flood of the same reason.
const REFUSAL_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

impl IngestStats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    /// Counts one refused chunk under `reason` (see
    /// [`IngestStats::refuse`]).
    pub fn reject(&self, reason: &'static str) -> Option<u64> {
        let so_far = self.count_refusal(reason, true);
        self.worth_a_line(reason, so_far).then_some(so_far)
    }

    /// Counts one refused request under `reason` (a call refused before
    /// any chunk, such as `unauthenticated`, or a connection), returning
    /// how many so far where that one is worth a log line: the 1st, 2nd,
    /// 4th, 8th, ..., and one at least every 5 minutes while
    /// they go on. A flood writes few lines; a new fault after one is
    /// said all the same.
    pub fn refuse(&self, reason: &str) -> Option<u64> {
        let so_far = self.count_refusal(reason, false);
        self.worth_a_line(reason, so_far).then_some(so_far)
    }

    /// Counts one refusal under `reason` that is never logged (a chunk
    /// late at training's end).
    pub fn count(&self, reason: &str) {
        self.count_refusal(reason, false);
    }

    /// Whether the `so_far`-th refusal under `reason` is worth a log line
    /// (see [`IngestStats::refuse`]).
    fn worth_a_line(&self, reason: &str, so_far: u64) -> bool {
        self.worth_a_line_at(reason, so_far, std::time::Instant::now())
    }

    /// [`IngestStats::worth_a_line`] at `now`.
    fn worth_a_line_at(&self, reason: &str, so_far: u64, now: std::time::Instant) -> bool {
        let mut said = self
            .refusals_said
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let due = said
            .get(reason)
            .is_none_or(|at| now.saturating_duration_since(*at) >= REFUSAL_LINE_EVERY);
        if !so_far.is_power_of_two() && !due {
            return false;
        }
        said.insert(reason.to_owned(), now);
        true
    }

    /// Counts one refusal under `reason`, and as a refused chunk where it
    /// is one: under the map's lock, so that a report reading both (see
    /// [`IngestStats::rejections_and_rejected_chunks`]) never sees one
    /// without the other.
    fn count_refusal(&self, reason: &str, chunk: bool) -> u64 {
        let mut rejections = self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if chunk {
            Self::add(&self.rejected_chunks, 1);
        }
        match rejections.get_mut(reason) {
            Some(count) => {
                *count += 1;
                *count
            }
            None => {
                rejections.insert(reason.to_owned(), 1);
                1
            }
        }
    }

    /// The per-reason counts so far.
    pub fn rejections(&self) -> std::collections::BTreeMap<String, u64> {
        self.rejections_and_rejected_chunks().0
    }

    /// The per-reason counts and the refused chunks among them, read at
    /// one moment: a report's calls refused are the difference.
    pub fn rejections_and_rejected_chunks(&self) -> (std::collections::BTreeMap<String, u64>, u64) {
        let rejections = self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (rejections.clone(), Self::get(&self.rejected_chunks))
    }

    /// Counts an ended session and keeps its record (up to a bound).
    pub fn record_session(&self, record: SessionRecord) {
        Self::add(&self.sessions_ended, 1);
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

/// A chunk that passed [`check_chunk`]: the only kind [`ingest_chunk`]
/// replays, so that no chunk is replayed without those checks.
#[derive(Debug)]
pub struct CheckedChunk(TrajectoryChunk);

/// The checks of a chunk that need no replay: its actor, its version, its
/// count of trajectories and each one's lengths and energies. Run by the
/// session before the chunk waits for a replay slot, so that a malformed
/// chunk is refused without holding its decoded bytes meanwhile.
pub fn check_chunk(
    env: &dyn Environment,
    chunk: TrajectoryChunk,
    context: &IngestContext,
) -> Result<CheckedChunk, RequestError> {
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
            "`trajectories` has {} entries, more than this actor declared per chunk when it opened the session ({}: its handshake's `trajectories_per_chunk`, or its `flgfn-trajectories-per-chunk` header; actor.envs for flgfn-actor)",
            chunk.trajectories.len(),
            context.max_trajectories
        )));
    }
    for (index, trajectory) in chunk.trajectories.iter().enumerate() {
        check_fields(env, trajectory)
            .map_err(|source| RequestError::Trajectory { index, source })?;
    }
    Ok(CheckedChunk(chunk))
}

/// Replays a checked chunk, validating every action.
pub fn ingest_chunk(
    env: &dyn Environment,
    CheckedChunk(chunk): CheckedChunk,
    context: IngestContext,
) -> Result<IngestedChunk, RequestError> {
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

/// Where an actor's chunk numbering stands, across its reconnects (each
/// reconnect is a new actor id; the name, e.g. host and pid, stays).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SequenceState {
    /// The number the next chunk should carry (None: no expectation yet).
    pub next: Option<u64>,
    /// How many numbers may be missing before the next chunk: credits of
    /// earlier sessions whose chunk never arrived (lost with their
    /// connection, or rolled out and dropped by the actor once that
    /// session had ended). Within a session chunks arrive in order over
    /// one stream, so nothing goes missing there, and an actor cannot
    /// inflate the lost count by skipping numbers.
    pub may_skip: u64,
}

impl SequenceState {
    /// Records chunk `sequence` and returns the chunks missing before it.
    /// A number that goes back (a restarted actor process), or skips more
    /// than [`may_skip`](Self::may_skip) (an actor that numbers its chunks
    /// otherwise), starts over and counts nothing.
    pub fn arrived(&mut self, sequence: u64) -> u64 {
        let may_skip = std::mem::take(&mut self.may_skip);
        let expected = self.next.replace(sequence.saturating_add(1));
        match expected {
            Some(expected) if sequence > expected && sequence - expected <= may_skip => {
                sequence - expected
            }
            _ => 0,
        }
    }

    /// Records a chunk whose number could not be read (it could not be
    /// decoded): taken to carry the number expected, so that neither it
    /// nor the next is counted lost.
    pub fn unreadable(&mut self) {
        if let Some(next) = self.next.as_mut() {
            *next = next.saturating_add(1);
        }
    }
}

/// Each actor name's [`SequenceState`] when its last session closed, so
/// that gaps are counted across an actor's reconnects. Bounded: beyond
/// [`SequenceBook::MAX_NAMES`] names, the one whose last session closed
/// longest ago is forgotten. Consulted only when sessions open and close; a
/// session counts its own chunks without locks.
#[derive(Debug, Default)]
pub struct SequenceBook {
    inner: Mutex<SequenceEntries>,
}

#[derive(Debug, Default)]
struct SequenceEntries {
    /// Handshaken actor ids whose session has not opened yet, oldest
    /// (lowest: ids only grow) first, with their name and session key.
    name_of_id: std::collections::BTreeMap<u64, (String, String)>,
    /// Per actor name, where its numbering stood when its last session
    /// closed, with that session's actor id and when it was recorded (in
    /// `recorded`'s count).
    last_of_name: std::collections::HashMap<String, (u64, SequenceState, u64)>,
    /// States recorded so far: the clock of `last_of_name`'s entries.
    recorded: u64,
    /// Sessions open per actor name (names with none are removed): at most
    /// one per open session.
    open_of_name: std::collections::HashMap<String, u32>,
}

impl SequenceEntries {
    /// Whether `actor_id` waits for its session with session key `key`.
    fn issued_with(&self, actor_id: u64, key: &str) -> bool {
        self.name_of_id
            .get(&actor_id)
            .is_some_and(|(_, issued)| same_secret(key.as_bytes(), issued.as_bytes()))
    }
}

impl SequenceBook {
    /// Most names (and pending handshakes) tracked: 16 times the default
    /// `max_sessions`, and at most ~128 MB for the two maps even with
    /// names at their clipped length (1 KiB as a status sends them).
    pub const MAX_NAMES: usize = 16_384;

    /// An actor shook hands as `actor_id` under `name`: the session key
    /// its session must bring (128 random bits, as 32 hex digits, from the
    /// operating system's generator by way of `rand`'s thread generator).
    pub fn joined(&self, actor_id: u64, name: &str) -> String {
        let key = format!("{:032x}", rand::random::<u128>());
        let mut entries = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.name_of_id.len() >= Self::MAX_NAMES {
            // The oldest handshake that never opened a session (refused,
            // or its actor shook hands again): forgotten, so that a flood
            // of handshakes cannot push out those opening their session
            // right now.
            entries.name_of_id.pop_first();
        }
        entries
            .name_of_id
            .insert(actor_id, (name.to_owned(), key.clone()));
        key
    }

    /// Whether `actor_id` was issued with `key` by a handshake of this
    /// process whose session has not opened yet: one session per
    /// handshake.
    pub fn pending(&self, actor_id: u64, key: &str) -> bool {
        let entries = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        entries.issued_with(actor_id, key)
    }

    /// A session of `actor_id` opens: the name it shook hands with (once),
    /// and where its name's numbering stood when its last session closed.
    /// Nothing expected while another session of the name is still open
    /// (the actor reconnected while the learner had not yet noticed its
    /// old session gone): the number recorded is then older than what that
    /// session received, and the gap would be counted lost.
    pub fn opened(&self, actor_id: u64, key: &str) -> Option<(String, SequenceState)> {
        let mut entries = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !entries.issued_with(actor_id, key) {
            return None;
        }
        let (name, _) = entries.name_of_id.remove(&actor_id)?;
        let open = entries.open_of_name.entry(name.clone()).or_insert(0);
        *open += 1;
        let alone = *open == 1;
        let state = entries
            .last_of_name
            .get(&name)
            .filter(|_| alone)
            .map(|&(_, state, _)| state)
            .unwrap_or_default();
        Some((name, state))
    }

    /// The session `actor_id` of `name` closed with its numbering at
    /// `state` (`may_skip` including its own credits whose chunk never
    /// came). A session that closes after a newer one of the same name
    /// (ids only grow: the older one lingered until its stall timeout
    /// while the actor reconnected) leaves the newer one's state.
    pub fn closed(&self, actor_id: u64, name: String, state: SequenceState) {
        let mut entries = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = entries.open_of_name.get_mut(&name) {
            *open -= 1;
            if *open == 0 {
                entries.open_of_name.remove(&name);
            }
        }
        if state.next.is_none() {
            return;
        }
        entries.recorded += 1;
        let recorded = entries.recorded;
        match entries.last_of_name.get_mut(&name) {
            Some(entry) if entry.0 > actor_id => {}
            Some(entry) => *entry = (actor_id, state, recorded),
            None => {
                if entries.last_of_name.len() >= Self::MAX_NAMES {
                    // The name recorded longest ago (by close, not by id:
                    // a long session's id is old): a long run whose actors
                    // restart under new names (host/pid) keeps counting
                    // what the newest lose, and a steady actor that just
                    // reconnected stays. (A scan, only once full: closes
                    // are rare.)
                    let oldest = entries
                        .last_of_name
                        .iter()
                        .min_by_key(|(_, (_, _, at))| *at)
                        .map(|(oldest, _)| oldest.clone());
                    if let Some(oldest) = oldest {
                        entries.last_of_name.remove(&oldest);
                    }
                }
                entries
                    .last_of_name
                    .insert(name, (actor_id, state, recorded));
            }
        }
    }
}

#[cfg(test)]
mod sequence_tests {
    use super::{IngestStats, MAX_SESSION_RECORDS, SequenceBook, SequenceState, SessionRecord};

    /// A session's close: its numbering, with `unanswered` credits whose
    /// chunk never came.
    fn close(book: &SequenceBook, id: u64, name: String, state: SequenceState, unanswered: u64) {
        let may_skip = state.may_skip + unanswered;
        book.closed(id, name, SequenceState { may_skip, ..state });
    }

    #[test]
    fn a_handshake_opens_one_session_and_a_flood_forgets_the_oldest() {
        let book = SequenceBook::default();
        let last = SequenceBook::MAX_NAMES as u64 + 1;
        let keys: Vec<String> = (1..=last).map(|id| book.joined(id, "flood")).collect();
        let key = |id: u64| keys[id as usize - 1].as_str();
        assert!(!book.pending(1, key(1)), "the oldest is forgotten");
        assert!(book.pending(2, key(2)) && book.pending(last, key(last)));
        // Keys are random: another id's key opens nothing (ids are issued
        // in order, so a client could otherwise take the next actor's
        // session without its handshake's task and model checks).
        assert_ne!(key(2), key(3));
        assert!(!book.pending(last, key(2)) && !book.pending(last, ""));
        assert!(book.opened(last, key(2)).is_none());
        assert!(book.opened(last, key(last)).is_some());
        assert!(!book.pending(last, key(last)), "one session per handshake");
        assert!(book.opened(last, key(last)).is_none());
    }

    /// A long run whose actors restart under new names (host/pid) keeps
    /// counting what the newest lose once the book is full: the name
    /// whose last session closed longest ago makes room, and a steady
    /// actor whose first, long session (an old id) closed last stays.
    #[test]
    fn a_full_book_forgets_the_name_closed_longest_ago() {
        let book = SequenceBook::default();
        let session = |id: u64, name: &str, sequence: u64| {
            let key = book.joined(id, name);
            let (name, mut state) = book.opened(id, &key).unwrap();
            let lost = state.arrived(sequence);
            close(&book, id, name, state, 2);
            lost
        };
        let key = book.joined(1, "steady");
        let (steady, mut state) = book.opened(1, &key).unwrap();
        state.arrived(0);
        let names = SequenceBook::MAX_NAMES as u64;
        for id in 2..=names + 1 {
            session(id, &format!("host/{id}"), 0);
        }
        // The steady actor's connection breaks; a new name closes while
        // it reconnects.
        close(&book, 1, steady, state, 2);
        session(names + 2, "newcomer", 0);
        // Both remembered: their reconnects count the 2 credits each
        // session left unanswered.
        assert_eq!(session(names + 3, "steady", 3), 2);
        assert_eq!(session(names + 4, "newcomer", 3), 2);
        // The two closed longest ago made room, and their numbering
        // starts afresh; the next is still there.
        assert_eq!(session(names + 5, "host/4", 3), 2);
        assert_eq!(session(names + 6, "host/2", 3), 0);
        assert_eq!(session(names + 7, "host/3", 3), 0);
    }

    #[test]
    fn gaps_are_counted_across_sessions_up_to_the_credits_never_answered() {
        let book = SequenceBook::default();
        let key = book.joined(1, "host/1");
        let (name, mut state) = book.opened(1, &key).unwrap();
        assert_eq!(book.opened(1, &key), None, "a handshake opens one session");
        assert_eq!(state, SequenceState::default(), "a name never seen before");
        assert_eq!(state.arrived(0), 0);
        assert_eq!(state.arrived(1), 0);
        // Within a session nothing is lost: a jump is numbering, not loss.
        assert_eq!(state.arrived(4), 0);
        // Closed holding 3 credits whose chunks never came.
        close(&book, 1, name, state, 3);
        // A reconnect: up to 3 numbers may be missing before its first
        // chunk (here 2: 5 and 6), none after it.
        let key = book.joined(2, "host/1");
        let (name, mut state) = book.opened(2, &key).unwrap();
        assert_eq!(state.next, Some(5));
        assert_eq!(state.arrived(7), 2, "5 and 6 missing");
        assert_eq!(state.arrived(9), 0);
        close(&book, 2, name, state, 1);
        // A session that received nothing passes its credits on.
        let key = book.joined(3, "host/1");
        let (name, state) = book.opened(3, &key).unwrap();
        close(&book, 3, name, state, 2);
        let key = book.joined(4, "host/1");
        let (name, mut state) = book.opened(4, &key).unwrap();
        assert_eq!(
            state,
            SequenceState {
                next: Some(10),
                may_skip: 3
            }
        );
        assert_eq!(state.arrived(13), 3);
        close(&book, 4, name, state, 0);
        // More than the credits could explain: counted nothing.
        let key = book.joined(5, "host/1");
        let (name, mut state) = book.opened(5, &key).unwrap();
        assert_eq!(state.arrived(15), 0);
        close(&book, 5, name, state, 0);
        // The actor process restarted: numbering starts over.
        let key = book.joined(6, "host/1");
        let (_, mut state) = book.opened(6, &key).unwrap();
        assert_eq!(state.arrived(0), 0);
        assert_eq!(state.arrived(1), 0);
        // Another actor's numbers are its own.
        let key = book.joined(7, "host/2");
        let (_, mut other) = book.opened(7, &key).unwrap();
        assert_eq!(other.arrived(3), 0);
        assert_eq!(other.arrived(u64::MAX), 0);
        assert_eq!(other.arrived(5), 0);
    }

    /// An actor that skips numbers on every chunk, reconnecting each time,
    /// counts as lost no more than the credits its sessions never answered.
    #[test]
    fn skipping_numbers_cannot_inflate_the_lost_count() {
        let book = SequenceBook::default();
        let mut lost = 0;
        let mut sequence = 0;
        for id in 1..=100 {
            let key = book.joined(id, "liar");
            let (name, mut state) = book.opened(id, &key).unwrap();
            for _ in 0..10 {
                sequence += 1_000;
                lost += state.arrived(sequence);
            }
            close(&book, id, name, state, 1);
        }
        assert!(lost <= 99, "{lost} counted lost");
    }

    #[test]
    fn an_older_session_closing_last_leaves_the_newer_ones_number() {
        let book = SequenceBook::default();
        let key = book.joined(1, "host/1");
        let (old_name, mut old) = book.opened(1, &key).unwrap();
        assert_eq!(old.arrived(99), 0);
        // The actor reconnects while its old session lingers.
        let key = book.joined(2, "host/1");
        let (new_name, mut new) = book.opened(2, &key).unwrap();
        assert_eq!(new.arrived(500), 0);
        close(&book, 2, new_name, new, 0);
        close(&book, 1, old_name, old, 4);
        let key = book.joined(3, "host/1");
        let (name, mut next) = book.opened(3, &key).unwrap();
        assert_eq!(
            next,
            SequenceState {
                next: Some(501),
                may_skip: 0
            }
        );
        assert_eq!(next.arrived(501), 0);

        // Session 3 lingers while the actor reconnects as 4: the number
        // recorded (500) is older than what 3 received, so 4 expects
        // nothing rather than counting the gap lost.
        assert_eq!(next.arrived(900), 0);
        let key = book.joined(4, "host/1");
        let (newer_name, mut newer) = book.opened(4, &key).unwrap();
        assert_eq!(newer, SequenceState::default());
        assert_eq!(newer.arrived(905), 0);
        close(&book, 4, newer_name, newer, 0);
        close(&book, 3, name, next, 0);
        let key = book.joined(5, "host/1");
        assert_eq!(book.opened(5, &key).unwrap().1.next, Some(906));
    }

    /// Every ended session is counted, the records past the bound too
    /// (a run summary's `sessions` read the records' number).
    #[test]
    fn every_ended_session_is_counted_past_the_records_bound() {
        let stats = IngestStats::default();
        for _ in 0..MAX_SESSION_RECORDS + 5 {
            stats.record_session(SessionRecord::default());
        }
        assert_eq!(stats.sessions.lock().unwrap().len(), MAX_SESSION_RECORDS);
        assert_eq!(
            IngestStats::get(&stats.sessions_ended),
            (MAX_SESSION_RECORDS + 5) as u64
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{IngestStats, REFUSAL_LINE_EVERY};

    /// Refusals are said at the 1st, 2nd, 4th, ... of each reason, and,
    /// however many came before, again once a line is overdue.
    #[test]
    fn refusals_are_said_at_powers_of_two_and_at_least_every_few_minutes() {
        let stats = IngestStats::default();
        let start = Instant::now();
        let said: Vec<u64> = (1..=20)
            .filter(|&n| stats.worth_a_line_at("unauthenticated", n, start))
            .collect();
        assert_eq!(said, [1, 2, 4, 8, 16]);
        // Another reason counts on its own.
        assert!(stats.worth_a_line_at("too_many_sessions", 1, start));
        // After a flood, a refusal minutes later is said once, then the
        // counting goes on.
        let later = start + REFUSAL_LINE_EVERY;
        assert!(!stats.worth_a_line_at("unauthenticated", 1001, later - Duration::from_secs(1)));
        assert!(stats.worth_a_line_at("unauthenticated", 1001, later));
        assert!(!stats.worth_a_line_at("unauthenticated", 1002, later));
        assert!(stats.worth_a_line_at("unauthenticated", 1024, later));
    }
}
