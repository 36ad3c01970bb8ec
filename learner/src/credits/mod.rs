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
//! ([`QUIET_AFTER`], or four times its own pace where that is longer) is quiet: it is granted
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
//! A session whose chunks arrive already at `max_policy_lag` or older (an
//! actor far behind a slow link while near ones set the pace) would only
//! roll out for the stale counter: the session [`pauses`](SessionCredits::pause)
//! its credits, then probes with one credit at a time until a chunk arrives
//! fresh again.
//!
//! # Layout
//!
//! - `pool.rs`: the room and the batch target ([`CreditPool`]), and one
//!   credit's share of it ([`CreditToken`]);
//! - `session.rs`: a session's end ([`SessionCredits`]): its pace, throttle
//!   and memory bound;
//! - `controller.rs`: the task that grants round-robin ([`Controller`]).

mod controller;
mod pool;
mod session;
#[cfg(test)]
mod tests;

pub use controller::{Controller, MAX_CREDITS_PER_SESSION};
pub use pool::{CreditPool, CreditToken, INITIAL_ROOM_BATCHES};
pub use session::{QUIET_AFTER, SessionCredits};
