//! One actor's session: credits and weights out, chunks in.
//!
//! A session task owns everything about one connected actor: the credits
//! granted to it and not yet used (in grant order), the newest weight
//! version it was sent, and its counters. It turns each credit from the
//! [`Controller`](crate::credits::Controller) into a `Grant`, attaching the
//! newest weights when the actor's are at least `weights_refresh_steps`
//! versions old, so weights only ever go to an actor about to roll out. A
//! chunk that arrives uses the oldest credit; it is validated and replayed
//! on the ingest pool and queued for the trainer with that credit.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use flgfn_common::telemetry::panic_message;
use flgfn_common::trajectory::TrajectoryChunk;
use flgfn_common::wire::proto;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::{Code, Status, Streaming};
use tracing::{debug, info, warn};

use crate::credits::{CreditToken, SessionCredits};
use crate::error::{RequestError, framing_fault_as_sender_error, unreadable_reason};
use crate::ingest::{
    IngestContext, IngestStats, IngestedChunk, QueuedChunk, SequenceState, SessionRecord,
    check_chunk, ingest_chunk,
};
use crate::publisher::EncodedWeights;
use crate::service::LearnerState;

/// How long a session whose chunk found the trainer's queue closed with
/// no stop under way (the batch builder failed) waits to learn that
/// training is over (see `Session::wait_for_training_end`); with a stop
/// under way it waits for the trainer's end.
const DONE_GRACE: Duration = Duration::from_secs(10);

/// How long a session that is ending waits to hand the actor its last
/// message (training done, or why the session ends): an actor that stopped
/// reading grants must not keep the session, its place and its buffers.
const LAST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// When the stall clock runs out, what the connection already holds gets
/// this long to be read before the session ends: the clock also runs while
/// the learner itself is paused (SIGSTOP, a VM paused, swapping), and the
/// chunks a healthy actor sent meanwhile wait unread in the connection.
const STALL_GRACE: Duration = Duration::from_secs(1);

/// Chunks in a row that must arrive already stale before a session's
/// credits pause: one can be a hiccup (a slow rollout, a burst of steps).
const STALE_ARRIVALS_TO_PAUSE: u32 = 2;

/// The first pause of a session whose chunks arrive stale; each later one
/// (two stale probes in a row) is twice the one before, up to
/// [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);

/// The longest pause: how long a far actor may wait to find out that the
/// learner slowed down enough for its chunks to be fresh again.
const LONGEST_PAUSE: Duration = Duration::from_secs(16);

/// How a session ended without an error, for its `ended_by`.
enum Ended {
    /// Training ended (or the learner stops for a restart): the session's
    /// last grant said so.
    TrainingDone,
    /// The actor closed its side of the stream.
    ActorLeft,
    /// The stream of grants closed with the actor's side still open: the
    /// connection went under it.
    GrantsUndelivered,
    /// The actor's side ended and the grants' stream closed with it: the
    /// connection was closed under the session (by the learner's keepalive,
    /// its pings unanswered: a frozen actor or a cut link; or by a proxy),
    /// or the actor stopped waiting for its session to end (after its 10 s
    /// drain) and dropped the call.
    ConnectionClosed,
}

/// How long a session whose actor's side ended waits to see its grants'
/// stream close as well, which tells a lost connection from a leaving
/// actor: a leaving actor (this project's, or the Python one) closes its
/// side and reads on until the session ends, while a connection closed by
/// keepalive ends both within microseconds (measured).
const CONNECTION_CLOSE_GRACE: Duration = Duration::from_millis(50);

/// How long a session whose training is done reads on for the chunks its
/// actor sent before it heard: this project's actor closes its side on the
/// last grant, once the chunks it had sent are out.
const LATE_CHUNKS_WAIT: Duration = Duration::from_secs(2);

/// Runs replay and validation on tokio's blocking pool, at most
/// `learner.ingest_threads` at a time, so a flood of chunks never occupies
/// the async workers that serve grants, weights and health checks.
#[derive(Debug, Clone)]
pub struct IngestPool {
    slots: Arc<Semaphore>,
}

impl IngestPool {
    /// A pool of `threads` concurrent validations.
    pub fn new(threads: usize) -> Self {
        IngestPool {
            slots: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// Runs `work` on the blocking pool when a slot is free.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, RequestError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        tokio::task::spawn_blocking(work).await.map_err(|error| {
            if error.is_panic() {
                // A bug, not the end of training: say so, rather than send
                // the actor to wait for a stop that is not coming.
                RequestError::Internal(
                    "validating this chunk panicked; it is refused, and what was accepted before is kept"
                        .to_owned(),
                )
            } else {
                RequestError::ShuttingDown
            }
        })
    }
}

/// Whether actors are told to reconnect when training has ended: the
/// learner stops for a restart, and training had not reached `max_steps`
/// (a restart asked for during the last step's evaluation or final
/// checkpoint finds the run over: nothing would be left to train).
pub(crate) fn restarting(state: &LearnerState) -> bool {
    state.stopping_for_restart.load(Ordering::Acquire) && !state.publisher.reached_max_steps()
}

/// The last grant of a session once training has ended: no credit, and
/// either training is over or, where the learner stops for a restart, the
/// actor is to reconnect.
fn last_grant(state: &LearnerState) -> proto::Grant {
    if restarting(state) {
        proto::Grant {
            learner_restarting: true,
            ..proto::Grant::default()
        }
    } else {
        proto::Grant {
            training_done: true,
            ..proto::Grant::default()
        }
    }
}

/// Why a session ended when training did, for its `session ended` line.
fn training_ended(state: &LearnerState) -> String {
    if restarting(state) {
        "the learner stops for a restart".to_owned()
    } else {
        "training done".to_owned()
    }
}

/// Decrements the connected-actor count when a session ends, however it
/// ends.
struct ConnectedGuard(Arc<IngestStats>);

impl ConnectedGuard {
    fn new(stats: Arc<IngestStats>) -> Self {
        stats.connected_actors.fetch_add(1, Ordering::Relaxed);
        ConnectedGuard(stats)
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.connected_actors.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Logs the end of a session whose task is dropped before it could say
/// how it ended (the learner shutting down while the session waits, for a
/// frozen actor to take its last message, say): every session's end is in
/// the log.
struct EndUnlogged {
    opened_at: Instant,
    /// Cleared once `run` has logged the end itself.
    armed: bool,
}

impl Drop for EndUnlogged {
    fn drop(&mut self) {
        if self.armed {
            info!(
                ended_by = "the learner shut down first",
                duration_s = self.opened_at.elapsed().as_secs_f64(),
                "session ended"
            );
        }
    }
}

/// A future whose panic comes back as its payload instead of unwinding
/// the task that polls it: a session that meets a bug still gives back its
/// actor's numbering, tells the actor why it ends, and is in the report.
/// (Its credits and place go back on drop either way.)
struct PanicCaught<F>(Pin<Box<F>>);

impl<F: Future> Future for PanicCaught<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A future that panicked is never polled again: this one is ready.
        let inner = self.get_mut().0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

/// One actor's session.
pub struct Session {
    /// Shared learner state.
    pub state: Arc<LearnerState>,
    /// From the session's `flgfn-actor-id` header.
    pub actor_id: u64,
    /// Declared by the actor; every credit reserves room for this many
    /// full-length trajectories, and larger chunks are refused.
    pub trajectories_per_chunk: usize,
    /// What one chunk of that size holds once replayed, at most: the
    /// session's credits stop where its chunks, arriving and waiting for
    /// the trainer, could exceed `learner.max_session_bytes`.
    pub chunk_bytes: u64,
    /// Chunks from the actor.
    pub inbound: Streaming<proto::TrajectoryChunk>,
    /// Grants to the actor (the response stream).
    pub grants: mpsc::Sender<Result<proto::Grant, Status>>,
    /// This session's place under `learner.max_sessions`, given back when
    /// the session ends.
    pub slot: SessionSlot,
    /// When the session opened.
    pub opened_at: Instant,
    /// The name the actor shook hands with, under which its chunk numbers
    /// continue across reconnects, and where that numbering stood.
    pub actor_name: (String, SequenceState),
}

/// One of the learner's `learner.max_sessions` places; freed on drop.
pub struct SessionSlot(Arc<LearnerState>);

impl std::fmt::Debug for SessionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSlot")
    }
}

impl SessionSlot {
    /// A place for one more session, if the learner has one left.
    pub fn claim(state: &Arc<LearnerState>) -> Option<Self> {
        state
            .open_sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < state.max_sessions).then_some(open + 1)
            })
            .ok()
            .map(|_| SessionSlot(state.clone()))
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.open_sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a session tracks while it runs.
#[derive(Debug, Default)]
struct Progress {
    record: SessionRecord,
    /// Credits granted whose chunk has not arrived, oldest first, with
    /// when they were granted.
    unused: VecDeque<(CreditToken, Instant)>,
    /// When the last chunk arrived: the stall clock runs from it or from
    /// the oldest unused credit's grant, whichever is later.
    last_chunk_at: Option<Instant>,
    /// Newest version sent to this actor.
    sent_version: Option<u64>,
    /// This actor's chunk numbering: the next number, and how many may be
    /// missing before it.
    sequence: SequenceState,
    /// Chunks in a row that arrived at `max_policy_lag` or older.
    stale_arrivals: u32,
    /// How long the next pause lasts (zero: the first pause comes next).
    next_pause: Duration,
    /// When the last pause began: chunks for credits granted before it
    /// say nothing new when they arrive.
    paused_at: Option<Instant>,
    /// This session's pauses so far: an actor hovering at the bound for
    /// hours pauses again and again, and only the 1st, 2nd, 4th, ... are
    /// logged at info.
    pauses: u64,
}

impl Session {
    /// Serves the session until the actor leaves, training ends, or the
    /// actor sends something refused (then the refusal ends the stream).
    pub async fn run(mut self) {
        let stats = self.state.stats.clone();
        let _connected = ConnectedGuard::new(stats.clone());
        let mut end_unlogged = EndUnlogged {
            opened_at: self.opened_at,
            armed: true,
        };
        let (name, sequence) = std::mem::take(&mut self.actor_name);
        let mut progress = Progress {
            record: SessionRecord {
                actor_id: self.actor_id,
                ..SessionRecord::default()
            },
            sequence,
            ..Progress::default()
        };
        let served = match PanicCaught(Box::pin(self.serve(&mut progress))).await {
            Ok(served) => served,
            Err(payload) => {
                // (The session's span names the actor.)
                let panic = panic_message(&*payload);
                tracing::error!(
                    panic,
                    "serving a session panicked (a bug): the session ends, the learner goes on"
                );
                Err(Status::from(RequestError::Internal(format!(
                    "serving this session panicked ({panic}); what it accepted before is kept"
                ))))
            }
        };
        // The credits this actor holds go back to the room now: the last
        // message below may wait on an actor that no longer reads. Their
        // chunks may have been sent, and lost with the connection.
        let held = progress.unused.len();
        progress.sequence.may_skip += held as u64;
        progress.unused.clear();
        // Recorded before the last message: an actor that reconnects on
        // reading it finds its numbering where this session left it.
        self.state
            .sequences
            .closed(self.actor_id, name, progress.sequence);
        // Why, for the operator's log line below: the end of training, the
        // actor's leaving, or the status that ended the session (a
        // refusal, a stall, a broken connection).
        // A lost connection (a crashed or frozen actor, a cut link) is a
        // warning: an operator watching warnings sees actors go.
        let mut lost = false;
        let ended_by = match served {
            Ok(Ended::TrainingDone) => training_ended(&self.state),
            Ok(_) if *self.state.publisher.done().borrow() => training_ended(&self.state),
            Ok(Ended::ActorLeft) => "the actor left".to_owned(),
            Ok(Ended::GrantsUndelivered) => {
                lost = true;
                "the connection was lost (a grant could not be delivered)".to_owned()
            }
            Ok(Ended::ConnectionClosed) => {
                lost = true;
                "the connection was lost (closed under the session: keepalive pings unanswered, from a frozen actor or across a cut link; or the actor stopped waiting for the session's end)".to_owned()
            }
            Err(status) => {
                // Training may be ending while this session was busy (a
                // chunk finds the trainer gone, the credits stop on a
                // requested stop): then that, not the error, is the news
                // for the actor.
                let mut done = self.state.publisher.done();
                if status.code() == Code::Unavailable {
                    self.wait_for_training_end(&mut done).await;
                }
                let done = *done.borrow();
                let ended_by = if done {
                    training_ended(&self.state)
                } else if is_broken_connection(&status) {
                    lost = true;
                    format!("the connection was lost ({})", status.message())
                } else {
                    format!("{:?}: {}", status.code(), status.message())
                };
                self.send_last(if done {
                    Ok(last_grant(&self.state))
                } else {
                    Err(status)
                })
                .await;
                if done {
                    // (Their numbers come after the session's record:
                    // training is over, no session follows.)
                    self.read_late_chunks(&mut progress.record, held).await;
                }
                ended_by
            }
        };
        let record = &progress.record;
        end_unlogged.armed = false;
        let duration_s = self.opened_at.elapsed().as_secs_f64();
        let (chunks, credits) = (record.chunks_received, record.credits_granted);
        let (late_chunks, versions_sent) = (record.late_chunks, record.versions_sent);
        if lost {
            warn!(
                ended_by,
                duration_s, chunks, late_chunks, credits, versions_sent, "session ended"
            );
        } else {
            info!(
                ended_by,
                duration_s, chunks, late_chunks, credits, versions_sent, "session ended"
            );
        }
        stats.record_session(progress.record);
    }

    /// Waits to learn whether training is over, for a session whose
    /// credits stopped or whose chunk found the trainer gone. With a stop
    /// under way, for as long as the trainer takes to wind down (its
    /// step, a checkpoint, an evaluation: seconds, more with many
    /// evaluation samples on a slow CPU), so that the actor is told that
    /// training ended (or that the learner restarts) and its chunks on
    /// the way are counted late, not lost; otherwise up to `DONE_GRACE`.
    /// A trainer that ends without finishing (an error) ends the wait.
    async fn wait_for_training_end(&self, done: &mut watch::Receiver<bool>) {
        let mut trainer_ended = self.state.trainer_ended.clone();
        // (An actor that leaves meanwhile ends the wait: there is no one
        // left to tell.)
        let ended = async {
            tokio::select! {
                _ = done.wait_for(|done| *done) => {}
                _ = trainer_ended.wait_for(|ended| *ended) => {}
                () = self.grants.closed() => {}
            }
        };
        if *self.state.stopping.borrow() {
            ended.await;
        } else {
            let _ = tokio::time::timeout(DONE_GRACE, ended).await;
        }
    }

    async fn serve(&mut self, progress: &mut Progress) -> Result<Ended, Status> {
        let reserve = (self.trajectories_per_chunk * self.state.env.max_trajectory_len()) as u64;
        let max_held = self.max_held_chunks();
        let mut credits = self
            .state
            .credits
            .join(reserve, max_held)
            .await
            .ok_or(RequestError::ShuttingDown)?;
        let mut done = self.state.publisher.done();
        // An actor that holds a credit this long without sending a chunk
        // is stalled: its session ends and its credits go back to the
        // room, so it cannot hold up training. Counted from its last
        // chunk, not from the oldest credit's grant: a slow actor holding
        // many credits fills them one at a time, and its oldest credit
        // waits behind all the others.
        let stalled_after = self.state.stalled_after;
        // The stall clock's start when it last ran out, and when: the
        // session ends if no chunk moves the start within STALL_GRACE.
        let mut ran_out: Option<(Instant, Instant)> = None;
        loop {
            let since = progress.unused.front().map(|(_, granted)| {
                progress
                    .last_chunk_at
                    .map_or(*granted, |at| at.max(*granted))
            });
            if ran_out.is_some_and(|(start, _)| since != Some(start)) {
                ran_out = None;
            }
            let deadline = match (since, ran_out) {
                (Some(_), Some((_, at))) => Some(at + STALL_GRACE),
                (since, _) => since.map(|since| since + stalled_after),
            };
            let stalled = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = async { let _ = done.wait_for(|done| *done).await; } => {
                    let held = progress.unused.len();
                    progress.unused.clear();
                    self.send_last(Ok(last_grant(&self.state))).await;
                    for sequence in self.read_late_chunks(&mut progress.record, held).await {
                        IngestStats::add(&self.state.stats.lost_chunks, progress.sequence.arrived(sequence));
                    }
                    return Ok(Ended::TrainingDone);
                }
                token = credits.tokens.recv() => {
                    let first = token.ok_or(RequestError::ShuttingDown)?;
                    // Every credit already granted goes in one message: the
                    // controller grants in bursts (a batch taken frees room
                    // for many chunks), and h2 >= 0.4.20 closes a
                    // connection on which more than about a hundred small
                    // DATA frames wait unread (ENHANCE_YOUR_CALM,
                    // "too_many_data_frames"), which one grant per credit
                    // reached under load.
                    let mut tokens = vec![first];
                    while let Ok(token) = credits.tokens.try_recv() {
                        tokens.push(token);
                    }
                    match self.grant(tokens, progress).await {
                        Ok(true) => {}
                        // Its grants' stream is closed: the connection went
                        // (a killed actor, a keepalive timeout, a proxy), or
                        // the actor dropped the call (a leaving actor reads
                        // grants until the session ends, so not one that
                        // left in order).
                        Ok(false) => return Ok(self.take_arrived_chunks(&credits, progress).await),
                        // It took no grant for the stall timeout (nothing
                        // inbound was read meanwhile), or its weights could
                        // not be encoded: what arrived whole is still
                        // taken, not dropped unread.
                        Err(ended) => {
                            self.take_arrived_chunks(&credits, progress).await;
                            return Err(ended);
                        }
                    }
                }
                message = self.inbound.message() => {
                    let message = match message {
                        Ok(message) => message,
                        Err(status) => return Err(self.unreadable(status, progress)),
                    };
                    let Some(message) = message else {
                        // The actor closed its side, leaving; or its
                        // connection was closed under the session (hyper
                        // ends the stream the same way then).
                        let closed = tokio::time::timeout(CONNECTION_CLOSE_GRACE, self.grants.closed()).await;
                        return Ok(if closed.is_ok() {
                            Ended::ConnectionClosed
                        } else {
                            Ended::ActorLeft
                        });
                    };
                    if let Err(error) = self.receive(message, &credits, progress).await {
                        return Err(self.refused(error, &mut progress.record));
                    }
                }
                // After the inbound stream: a chunk that arrived while the
                // session was busy (sending a grant, waiting for an ingest
                // slot) answers its credit even if the timer ran out since.
                () = stalled => {
                    if ran_out.is_none() {
                        ran_out = since.map(|since| (since, Instant::now()));
                        continue;
                    }
                    return Err(self.stalled(format!(
                        "held a credit for {stalled_after:?} without sending its chunk (learner.stall_timeout_s)"
                    )));
                }
            }
        }
    }

    /// Counts a chunk `receive` did not take, and gives the status that
    /// ends its session: late where training ended while it was on its
    /// way, else refused (logged where [`IngestStats::refuse`] says a line
    /// is due: an actor that reconnects to send it again would flood the
    /// log).
    fn refused(&self, error: RequestError, record: &mut SessionRecord) -> Status {
        if matches!(error, RequestError::ShuttingDown) {
            self.count_late_chunk(record);
            debug!(
                actor_id = self.actor_id,
                "a chunk arrived after training ended"
            );
        } else if let Some(refused_so_far) = self.state.stats.reject(error.reason()) {
            warn!(
                actor_id = self.actor_id,
                %error,
                refused_so_far,
                "refused a trajectory chunk"
            );
        }
        Status::from(error)
    }

    /// After a grant could not be delivered: the chunks that arrived whole
    /// before the connection went (already read off it, waiting in the
    /// stream) are taken as any others, not dropped unread and counted
    /// lost; then the end is told apart. A stream that ended is a closed
    /// connection; one that waits for more, or failed, or whose chunk was
    /// refused (a flood of chunks without credits ends there), is a grant
    /// undelivered.
    async fn take_arrived_chunks(
        &mut self,
        credits: &SessionCredits,
        progress: &mut Progress,
    ) -> Ended {
        loop {
            match tokio::time::timeout(Duration::ZERO, self.inbound.message()).await {
                Ok(Ok(Some(message))) => {
                    if let Err(error) = self.receive(message, credits, progress).await {
                        let _ = self.refused(error, &mut progress.record);
                        return Ended::GrantsUndelivered;
                    }
                }
                Ok(Ok(None)) => return Ended::ConnectionClosed,
                Ok(Err(status)) => {
                    // Counted as in the session, not lost.
                    self.unreadable(status, progress);
                    return Ended::GrantsUndelivered;
                }
                Err(_) => return Ended::GrantsUndelivered,
            }
        }
    }

    /// A chunk the stream could not read (undecodable, too large): counted
    /// refused where it is the sender's fault; it used a credit, as a
    /// chunk refused in `receive` does, and its number arrived, so it is
    /// not counted lost as well when the actor reconnects. The status
    /// the session ends with.
    fn unreadable(&self, status: Status, progress: &mut Progress) -> Status {
        let status = framing_fault_as_sender_error(status, "chunk");
        if self.count_unreadable(&status) {
            progress.unused.pop_front();
            progress.sequence.unreadable();
        }
        status
    }

    /// Ends a stalled session: counted, logged, and the status the actor
    /// is sent (if it still reads).
    fn stalled(&self, why: String) -> Status {
        IngestStats::add(&self.state.stats.stalled_sessions, 1);
        warn!(
            actor_id = self.actor_id,
            "ending the session of an actor that stalled: it {why}; its credits go back to the room"
        );
        Status::deadline_exceeded(why)
    }

    /// Most chunks this session may hold at once (its memory limit over
    /// its largest chunk).
    fn max_held_chunks(&self) -> u64 {
        self.state.max_session_bytes / self.chunk_bytes.max(1)
    }

    /// Counts a chunk that arrived after training ended, in the run's
    /// `rejections.shutting_down` and the session's `record`: never
    /// trained, but nothing wrong with it, so not a refused chunk.
    fn count_late_chunk(&self, record: &mut SessionRecord) {
        self.state.stats.count(RequestError::ShuttingDown.reason());
        record.late_chunks += 1;
    }

    /// After the last grant: the chunks the actor sent before it heard that
    /// training is done, read until it closes its side (at most
    /// [`LATE_CHUNKS_WAIT`]) and counted late (see [`Self::count_late_chunk`]).
    /// Without this, the chunks in flight at the end would be counted sent
    /// by the actor and never by the learner. An actor that drops the call
    /// instead (an older one) ends this at once. At most one chunk per
    /// credit it `held` unanswered: more could not be chunks of its own
    /// (an actor sends one per credit), and would only inflate the counts.
    /// Their sequence numbers, in order.
    async fn read_late_chunks(&mut self, record: &mut SessionRecord, held: usize) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + LATE_CHUNKS_WAIT;
        let mut sequences = Vec::new();
        while sequences.len() < held {
            let chunk = tokio::select! {
                biased;
                read = tokio::time::timeout_at(deadline, self.inbound.message()) => read,
                () = self.grants.closed() => break,
            };
            let Ok(Ok(Some(chunk))) = chunk else {
                break;
            };
            self.count_late_chunk(record);
            sequences.push(chunk.sequence);
        }
        sequences
    }

    /// Hands the actor its last message, unless it has not taken one for
    /// [`LAST_MESSAGE_TIMEOUT`].
    async fn send_last(&self, message: Result<proto::Grant, Status>) {
        let _ = tokio::time::timeout(LAST_MESSAGE_TIMEOUT, self.grants.send(message)).await;
    }

    /// Sends these credits in one grant, with the newest weights if the
    /// actor's are old enough. False when the actor no longer listens.
    async fn grant(
        &self,
        tokens: Vec<CreditToken>,
        progress: &mut Progress,
    ) -> Result<bool, Status> {
        let weights = self.weights_to_send(progress.sent_version).await?;
        let count = tokens.len() as u64;
        let grant = proto::Grant {
            credits: u32::try_from(count).unwrap_or(u32::MAX),
            weights: weights.as_ref().map(|w| proto::Weights {
                version: w.version,
                safetensors: w.bytes.clone(),
            }),
            ..proto::Grant::default()
        };
        match tokio::time::timeout(self.state.stalled_after, self.grants.send(Ok(grant))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Ok(false),
            Err(_) => {
                return Err(self.stalled(format!(
                    "took no grant for {:?} (learner.stall_timeout_s)",
                    self.state.stalled_after
                )));
            }
        }
        // Timed from when the grant is on its way, not from before a send
        // that may have waited on a slow reader.
        let now = Instant::now();
        progress
            .unused
            .extend(tokens.into_iter().map(|token| (token, now)));
        // Counted once on its way: a grant the actor can no longer take is
        // not counted.
        let stats = &self.state.stats;
        let record = &mut progress.record;
        if let Some(weights) = &weights {
            progress.sent_version = Some(weights.version);
            record.versions_sent += 1;
            record.weight_bytes += weights.bytes.len() as u64;
            IngestStats::add(&stats.weight_versions_sent, 1);
            IngestStats::add(&stats.weight_bytes, weights.bytes.len() as u64);
            if let Some(published_at) = weights.published_at {
                // From when this actor could have had it: a version older
                // than the session waited for the actor, not the learner.
                let since = published_at.max(self.opened_at);
                IngestStats::add(
                    &stats.publish_to_send_us,
                    since.elapsed().as_micros() as u64,
                );
            }
        }
        record.credits_granted += count;
        IngestStats::add(&stats.credits_granted, count);
        Ok(true)
    }

    /// The newest weights if this actor's are `weights_refresh_steps` or
    /// more versions old (or it has none yet).
    async fn weights_to_send(
        &self,
        sent: Option<u64>,
    ) -> Result<Option<Arc<EncodedWeights>>, Status> {
        let publisher = &self.state.publisher;
        let refresh = self.state.weights_refresh_steps;
        // The oldest version worth sending.
        let least = sent.map_or(0, |sent| sent.saturating_add(refresh));
        if sent.is_some() && publisher.latest_version() < least {
            return Ok(None);
        }
        let encoded = publisher
            .latest(least)
            .await
            .map_err(|e| Status::internal(format!("cannot encode weights: {e}")))?;
        Ok((Some(encoded.version) != sent).then_some(encoded))
    }

    /// Validates a chunk against the credit it uses and queues it for the
    /// trainer.
    async fn receive(
        &self,
        message: proto::TrajectoryChunk,
        credits: &SessionCredits,
        progress: &mut Progress,
    ) -> Result<(), RequestError> {
        let wire_bytes = message.encoded_len() as u64;
        let (mut credit, _sent_at) = progress.unused.pop_front().ok_or(RequestError::NoCredit)?;
        progress.last_chunk_at = Some(Instant::now());
        // Whether or not the chunk is valid, its number arrived: a refused
        // chunk is not also counted lost by the next session.
        let stats = &self.state.stats;
        IngestStats::add(
            &stats.lost_chunks,
            progress.sequence.arrived(message.sequence),
        );
        let chunk = TrajectoryChunk::try_from(message)
            .map_err(|status| RequestError::Malformed(status.message().to_owned()))?;
        let (policy_version, credits_left) = (chunk.policy_version, chunk.credits_left);
        let context = IngestContext {
            actor_id: self.actor_id,
            latest_version: progress.sent_version.unwrap_or(0),
            keep_truncated: self.state.keep_truncated,
            max_trajectories: self.trajectories_per_chunk,
        };
        let env = self.state.env.clone();
        // Refused here, a malformed chunk does not wait for a replay slot
        // holding its decoded bytes (up to several times its wire size).
        let chunk = check_chunk(env.as_ref(), chunk, &context)?;
        // After those checks (a version from the future would read as
        // fresh and end a pause) but before the replay, so that the next
        // credit can be granted while this chunk is replayed; the throttle
        // first, so that the controller, woken by `used`, sees a pause
        // decided on this chunk before it grants. (When the controller
        // granted the credit, not when it was sent on: one granted before
        // a pause and sent after says nothing of the probes since.)
        self.throttle(policy_version, credit.reserved_at(), credits, progress);
        credits.used();
        let ingested: IngestedChunk = self
            .state
            .ingest_pool
            .run(move || ingest_chunk(env.as_ref(), chunk, context))
            .await??;
        // Only now: a chunk refused at replay (an action illegal further
        // on) must not grow the room for all by saying its actor is idle.
        if credits_left == 0 {
            credits.ran_out();
        }
        let (transitions, unusable) = (ingested.transitions, ingested.unusable_transitions);
        if transitions > 0 {
            credit.arrived(transitions as u64);
            // Queued before it is counted: a chunk that finds the trainer
            // gone is refused (shutting down), not also counted accepted.
            // The queue holds more chunks than credits can cover (each
            // holds at least a transition of the room), so it is never
            // full; were it ever, that is this learner's fault, not news
            // that training ended.
            self.state
                .queue
                .try_send(QueuedChunk {
                    chunk: ingested,
                    credit,
                })
                .map_err(|error| match error {
                    mpsc::error::TrySendError::Closed(_) => RequestError::ShuttingDown,
                    mpsc::error::TrySendError::Full(_) => RequestError::Internal(
                        "the trainer's queue is full, which credits should prevent".to_owned(),
                    ),
                })?;
        }
        // (With nothing to train on, the credit's room goes back here.)
        IngestStats::add(&stats.accepted_chunks, 1);
        IngestStats::add(&stats.wire_bytes, wire_bytes);
        IngestStats::add(&stats.accepted_transitions, transitions as u64);
        IngestStats::add(&stats.unusable_truncated_transitions, unusable as u64);
        progress.record.chunks_received += 1;
        Ok(())
    }

    /// Pauses this session's credits when its chunks keep arriving at
    /// `max_policy_lag` or older (two in a row): they would only be dropped
    /// as stale, and the actor's time is better spent idle. After the
    /// pause, one credit at a time probes whether its chunks are fresh again
    /// (the learner may have slowed, or the near actors left); two stale
    /// probes pause it again, twice as long. A fresh chunk ends any pause.
    fn throttle(
        &self,
        policy_version: u64,
        granted_at: Instant,
        credits: &SessionCredits,
        progress: &mut Progress,
    ) {
        // Its lag in the batch being built, as the batch builder counts it.
        let lag = self
            .state
            .next_training_step
            .load(Ordering::Acquire)
            .saturating_sub(policy_version);
        // The chunk may miss that batch and go into the next: at the bound
        // now, it would be past it then. (Of a chunk larger than a batch,
        // the part that would go stale joins the batch it is due in.)
        if lag < self.state.max_policy_lag {
            progress.stale_arrivals = 0;
            progress.next_pause = Duration::ZERO;
            if credits.fresh() {
                if progress.pauses.is_power_of_two() {
                    info!(
                        actor_id = self.actor_id,
                        lag, "chunks arrive fresh again: credits resume"
                    );
                } else {
                    debug!(actor_id = self.actor_id, lag, "credits resume");
                }
            }
            return;
        }
        if progress.paused_at.is_some_and(|paused| granted_at < paused) {
            // Rolled out for a credit granted before the last pause: it
            // says nothing about the probes since.
            return;
        }
        progress.stale_arrivals += 1;
        if progress.stale_arrivals < STALE_ARRIVALS_TO_PAUSE {
            return;
        }
        progress.stale_arrivals = 0;
        let pause = progress.next_pause.max(FIRST_PAUSE);
        progress.next_pause = (pause * 2).min(LONGEST_PAUSE);
        progress.paused_at = Some(Instant::now());
        credits.pause(pause);
        IngestStats::add(&self.state.stats.session_pauses, 1);
        progress.pauses += 1;
        if progress.pauses.is_power_of_two() {
            info!(
                actor_id = self.actor_id,
                lag,
                max_policy_lag = self.state.max_policy_lag,
                pause_s = pause.as_secs_f64(),
                pauses_so_far = progress.pauses,
                "this actor's chunks arrive at max_policy_lag or older, likely to be dropped as stale: pausing its credits (an actor far behind the others, or a max_policy_lag too small for this many actors)"
            );
        } else {
            debug!(
                actor_id = self.actor_id,
                lag,
                pause_s = pause.as_secs_f64(),
                "pausing credits again"
            );
        }
    }

    /// Counts a chunk that could not be read as refused: undecodable or
    /// oversized, refused by tonic before validation, but still a refused
    /// chunk. False where `status` is a broken connection instead (a
    /// vanished actor's is not a refused chunk).
    fn count_unreadable(&self, status: &Status) -> bool {
        if is_broken_connection(status) {
            // (Whatever its code: ENHANCE_YOUR_CALM comes as
            // RESOURCE_EXHAUSTED.)
            return false;
        }
        let Some(reason) = unreadable_reason(status.code()) else {
            return false;
        };
        if let Some(refused_so_far) = self.state.stats.reject(reason) {
            warn!(
                actor_id = self.actor_id,
                status = %status.message(),
                refused_so_far,
                "unreadable trajectory chunk"
            );
        }
        true
    }
}

/// Whether `status` is the actor's connection breaking under its stream
/// (a killed actor, a cut link, a reset), not something it sent: tonic
/// gives such errors the code of their HTTP/2 reason (UNKNOWN, INTERNAL,
/// RESOURCE_EXHAUSTED for ENHANCE_YOUR_CALM, ...) and this message. Not a
/// CANCEL: the actor dropped its call (a drain that gave up, an actor
/// failing on its side), which is no lost connection.
fn is_broken_connection(status: &Status) -> bool {
    status.code() != Code::Cancelled && status.message().starts_with("h2 protocol error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_validation_is_an_internal_error_and_the_pool_goes_on() {
        let pool = IngestPool::new(1);
        let error = pool
            .run(|| -> u32 { panic!("a bug met while validating") })
            .await
            .unwrap_err();
        assert!(matches!(error, RequestError::Internal(_)), "{error:?}");
        assert_eq!(error.reason(), "internal");
        assert_eq!(Status::from(error).code(), Code::Internal);
        // The slot was given back: the next chunk is validated.
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_panic_while_serving_comes_back_as_its_message() {
        let mut polls = 0;
        let output = PanicCaught(Box::pin(async {
            polls += 1;
            tokio::task::yield_now().await;
            polls += 1;
            panic!("a bug met while serving");
        }))
        .await;
        let payload = output.expect_err("the panic comes back");
        assert_eq!(panic_message(&*payload), "a bug met while serving");
        assert_eq!(polls, 2, "it panicked after a pending poll, not at once");
        // A future that finishes comes back as its output.
        assert_eq!(PanicCaught(Box::pin(async { 7 })).await.ok(), Some(7));
    }
}
