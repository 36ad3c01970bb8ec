use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::controller::MAX_CREDITS_PER_SESSION;
use super::pool::{CreditPool, CreditToken};
use super::session::{Pace, SessionCredits};
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
        busy.used();
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
            self.small.used();
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
        active.used();
        drop(token);
    }
    settle().await;
    let mut held = take(&mut active);
    assert!(held.len() <= 5, "{}", held.len());
    // The other is paused; its chunks arrive and are trained.
    paused.pause(Duration::from_secs(60));
    for token in take(&mut paused) {
        paused.used();
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
        session.used();
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
            busy.used();
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
        busy.used();
    }
    pool.last_step(u64::MAX, 0);
    pool.capacity.store(1000, Ordering::Relaxed);
    pool.wake.notify_one();
    settle().await;
    assert_eq!(take(&mut busy).len(), MAX_CREDITS_PER_SESSION as usize);
    assert!(take(&mut quiet).is_empty());
    // One chunk of it arrives: it is served again.
    quiet.used();
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
        session.used();
        drop(token);
    }
    settle().await;
    let mut held = take(session);
    assert_eq!(held.len(), 30, "3 batches of 10");
    // One batch is taken: 2 left, and what is in use covers them.
    for _ in 0..10 {
        session.used();
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
        fixture.session.used();
        fixture.session.ran_out();
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
        session.used();
        drop(token);
    }
    settle().await;
    assert!(take(session).is_empty(), "paused");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let probe = take(session);
    assert_eq!(probe.len(), 1, "one probe after the pause");
    settle().await;
    assert!(take(session).is_empty(), "one credit at a time");
    session.used();
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
    fixture.session.used();
    fixture.session.ran_out();
    drop(tokens.pop());
    assert_eq!(idle_actors(&fixture.pool), 1);
    // Paused, then probing: idle because its chunks are too old.
    fixture.session.pause(Duration::from_millis(400));
    fixture.session.used();
    fixture.session.ran_out();
    drop(tokens.pop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    fixture.session.used();
    fixture.session.ran_out();
    drop(tokens.pop());
    assert_eq!(idle_actors(&fixture.pool), 0, "paused or probing");
    // Fresh again: idle counts again.
    assert!(fixture.session.fresh());
    fixture.session.used();
    fixture.session.ran_out();
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
    fixture.session.used();
    fixture.session.ran_out();
    assert_eq!(idle_actors(&fixture.pool), 0, "at its memory bound");
    waiting.pop();
    fixture.session.used();
    fixture.session.ran_out();
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
        session.used();
        session.ran_out();
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
        session.used();
        token.arrived(1);
    }
    settle().await;
    waiting.extend(take(session));
    assert!(waiting.len() >= 10, "{} chunks held", waiting.len());
}
