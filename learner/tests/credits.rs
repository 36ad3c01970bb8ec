//! Credits at work: production follows consumption, lag stays bounded,
//! weights go only to actors about to use them, and the fleet keeps the
//! learner fed behind a slow network.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use flgfn_actor::loadgen::GeneratedActor;
use flgfn_actor::{ActorOptions, ActorReport};
use flgfn_common::config::Config;
use flgfn_learner::delay_proxy::DelayProxy;
use flgfn_learner::report::Report;
use flgfn_learner::{RunOptions, TrainingOutcome};
use tokio::net::TcpListener;

/// Held by every test here: they measure waiting and throughput, so they
/// run one at a time rather than share the cores with each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a learner on `config` with `real` in-process actors (all of one
/// configuration, seeded the default way) and `generated` synthetic ones,
/// optionally behind a proxy adding `delay` each way.
async fn train(
    config: &Config,
    real: usize,
    generated: usize,
    delay: Duration,
    metrics: Option<std::path::PathBuf>,
) -> (TrainingOutcome, Vec<ActorReport>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let proxy = if delay.is_zero() {
        None
    } else {
        Some(DelayProxy::start(address, delay).await.unwrap())
    };
    let target = proxy.as_ref().map_or(address, |p| p.address);
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        RunOptions {
            metrics_path: metrics,
            ..RunOptions::default()
        },
        std::future::pending::<()>(),
    ));
    let mut actor_config = config.clone();
    actor_config.actor.learner = format!("http://{target}");
    let actors: Vec<_> = (0..real)
        .map(|i| {
            let options = ActorOptions {
                name: format!("actor-{i}"),
                seed_offset: None,
            };
            tokio::spawn(flgfn_actor::run(
                actor_config.clone(),
                options,
                std::future::pending(),
            ))
        })
        .collect();
    let load = tokio::spawn(flgfn_actor::loadgen::run(
        actor_config,
        generated,
        std::future::pending(),
    ));
    let outcome = tokio::time::timeout(Duration::from_secs(300), learner)
        .await
        .expect("training finishes")
        .unwrap()
        .unwrap();
    let mut reports = Vec::new();
    for actor in actors {
        reports.push(support::finished_actor(actor).await);
    }
    for report in tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .expect("generated actors stop when training ends")
        .unwrap()
    {
        let report = report.into_result().unwrap();
        assert!(report.training_done);
        reports.push(report);
    }
    (outcome, reports)
}

/// Whether two actors drew the same first chunk. Only comparable when the
/// same weights sampled both (they usually do: version 0, before the
/// learner's first step); None otherwise.
fn same_first_chunk(a: &ActorReport, b: &ActorReport) -> Option<bool> {
    (a.versions_applied.first() == b.versions_applied.first())
        .then(|| a.first_chunk_digest.unwrap() == b.first_chunk_digest.unwrap())
}

/// Two actors of one configuration (with `seed_offset`, or seeded the
/// default way) trained together by a fresh learner: their reports; None
/// where one did not take part (late on a loaded machine, it found the
/// learner finished, and gave up) or rolled out nothing.
async fn pair_of_actors(
    config: &Config,
    seed_offset: Option<u64>,
) -> Option<(ActorReport, ActorReport)> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut actor_config = config.clone();
    actor_config.actor.learner = format!("http://{}", listener.local_addr().unwrap());
    // One that finds the learner finished gives up soon, not never.
    actor_config.actor.reconnect_attempts = 3;
    actor_config.actor.reconnect_initial_s = 0.05;
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        RunOptions::default(),
        std::future::pending::<()>(),
    ));
    let actor = |i: u64| {
        tokio::spawn(flgfn_actor::run(
            actor_config.clone(),
            ActorOptions {
                name: format!("pair-{i}"),
                seed_offset,
            },
            std::future::pending(),
        ))
    };
    let actors = [actor(0), actor(1)];
    support::finished_learner(learner).await;
    let mut reports = Vec::new();
    for actor in actors {
        let ended = tokio::time::timeout(Duration::from_secs(30), actor)
            .await
            .expect("actors stop when training ends, or give up")
            .unwrap();
        match ended {
            Ok(report) if report.training_done && report.first_chunk_digest.is_some() => {
                reports.push(report);
            }
            _ => return None,
        }
    }
    let b = reports.pop()?;
    Some((reports.pop()?, b))
}

/// Runs `pair` (two actors trained together) until both took part and
/// their first chunks came from the same weights, so that comparing them
/// says something (they usually do: version 0, before the learner's first
/// step; a late second actor starts from a later version), and returns
/// whether the chunks were the same.
async fn first_chunks_match<F, Fut>(mut pair: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<(ActorReport, ActorReport)>>,
{
    for _ in 0..5 {
        if let Some((a, b)) = pair().await
            && let Some(same) = same_first_chunk(&a, &b)
        {
            return same;
        }
    }
    panic!("in 5 runs the two actors never both took part starting from the same weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actors_of_one_configuration_draw_different_trajectories() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut config = support::tiny_config();
    // Long enough (a second or so) that both actors usually join.
    config.learner.max_steps = 300;
    let same = first_chunks_match(|| async {
        let (a, b) = pair_of_actors(&config, None).await?;
        assert_ne!(a.seed.unwrap(), b.seed.unwrap());
        Some((a, b))
    })
    .await;
    assert!(
        !same,
        "two actors of one configuration drew the same first chunk"
    );

    // The check can fail: two actors given the same --seed-offset draw from
    // the same seed, and the same first chunk from the same weights.
    let twins = first_chunks_match(|| async {
        let (a, b) = pair_of_actors(&config, Some(5)).await?;
        assert_eq!(a.seed, b.seed);
        Some((a, b))
    })
    .await;
    assert!(twins, "twins drew different first chunks");
}

/// On loopback, and behind 25 ms each way, where each actor holds many
/// credits, each of its own grant's version: near the end credits cover
/// only the batches left, so none is left queued when training ends. (A
/// session cut short skips its queued orders, and their versions.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_actor_receives_more_versions_than_the_rollouts_it_starts_plus_one() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut config = support::tiny_config();
    config.learner.max_steps = 300;
    for delay in [Duration::ZERO, Duration::from_millis(25)] {
        let (outcome, reports) = train(&config, 2, 0, delay, None).await;
        for report in &reports {
            // Counted by the learner, for this actor's session.
            let sessions: Vec<_> = outcome
                .sessions
                .iter()
                .filter(|s| s.actor_id == report.actor_id)
                .collect();
            assert_eq!(sessions.len(), 1, "{:?}", outcome.sessions);
            let sent = sessions[0].versions_sent;
            eprintln!(
                "{delay:?}: actor {}: {} versions sent, {} received, {} rollouts, {} credits granted, {} received, {} orders skipped, last applied {:?}",
                report.actor_id,
                sent,
                report.versions_received,
                report.rollouts,
                sessions[0].credits_granted,
                report.credits,
                report.orders_skipped,
                report.versions_applied.last()
            );
            assert!(sent >= 2, "weights did flow: {sent}");
            // Behind the delay, a builder kept waiting near the end (a
            // loaded machine) lets out a batch more, whose orders are
            // queued when training ends: their versions go unused.
            let skipped = if delay.is_zero() {
                0
            } else {
                report.orders_skipped
            };
            assert!(
                sent <= report.rollouts + 1 + skipped,
                "{delay:?}: {sent} versions for {} rollouts ({skipped} orders skipped)",
                report.rollouts
            );
            // Every version received was loaded for a rollout, except those
            // that came with credits still queued when training ended.
            assert_eq!(report.versions_received, sent);
            let applied = report.versions_loaded;
            // (Checked first: a wrapped subtraction would pass anything.)
            assert!(
                report.rollouts <= report.credits,
                "{delay:?}: {} rollouts on {} credits",
                report.rollouts,
                report.credits
            );
            let unused_credits = report.credits - report.rollouts;
            assert!(
                sent - applied <= unused_credits,
                "{delay:?}: {applied} of {sent} applied, {unused_credits} credits unused"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_generated_actors_against_a_slow_learner_waste_nothing() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut config = support::tiny_config();
    // A network far too big for the task: each step takes milliseconds on
    // one thread, while 32 generated actors could produce a chunk each in
    // microseconds.
    config.model.hidden = vec![512, 512, 512];
    config.learner.max_steps = 120;
    config.learner.first_report_s = 0.25;
    config.learner.report_every_s = 0.25;
    config.learner.eval_samples = 64;
    let dir = std::env::temp_dir().join(format!("flgfn-credits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = dir.join("metrics.jsonl");
    let rss_before = flgfn_learner::report::resident_mb();
    let (outcome, reports) = train(&config, 0, 32, Duration::ZERO, Some(metrics.clone())).await;
    let rss_after = flgfn_learner::report::resident_mb();

    let report = &outcome.final_report;
    let room = (config.learner.max_batch_transitions as u64) * config.learner.max_in_flight_batches;
    let produced: u64 = reports.iter().map(|r| r.transitions_sent).sum();
    let trained = outcome.totals.trained_transitions;
    eprintln!(
        "produced {produced}, ingested {}, trained {trained}, stale {}, lag {:.2} mean / {} max, RSS {rss_before:.0} -> {rss_after:.0} MB",
        report.ingested_transitions,
        report.stale_transitions,
        outcome.totals.mean_policy_lag,
        outcome.totals.max_policy_lag,
    );
    assert!(outcome.totals.max_policy_lag <= config.learner.max_policy_lag);
    assert!(
        (report.stale_transitions as f64) < 0.01 * produced as f64,
        "{} of {produced} stale",
        report.stale_transitions
    );
    // Production followed consumption: what was produced and not trained
    // is at most what the credit room holds, plus the one batch built while
    // the last step trained (its credits were already returned).
    assert!(produced >= trained);
    let bound = room + config.learner.max_batch_transitions as u64;
    assert!(
        produced - trained <= bound,
        "{produced} produced, {trained} trained, bound {bound}"
    );
    // Memory stayed bounded: the data granted and not trained never
    // exceeded the room, at any report. (The resident size is printed
    // above, not bounded here: allocator and libtorch caching move it;
    // the scale bench gives it per scenario.)
    let reports: Vec<Report> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(reports.len() >= 3, "{} reports", reports.len());
    for r in &reports {
        assert!(
            r.in_flight_transitions <= room,
            "{} > {room}",
            r.in_flight_transitions
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actors_behind_25_ms_each_way_keep_the_learner_fed() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut config = support::tiny_config();
    config.learner.max_steps = 1200;
    // The paper's network: the trainer, not the loopback data path, sets
    // the pace, as in the default job.
    config.model.hidden = vec![256, 256];
    // Batches of 64 to 1,024 transitions, up to 24 of them in flight: room
    // for 24,576 transitions, over 300,000 a second at a 75 ms credit
    // cycle. (The default, 48, keeps the batches behind the delay smaller,
    // which reaches quality sooner but, at batches of 64 where a step's
    // fixed cost dominates, trains fewer transitions per second: a loaded
    // suite run once saw 0.66x loopback. Flow control is what this checks.)
    // On loopback the room stays small and the batches at 64.
    config.learner.max_batch_transitions = 1024;
    config.learner.max_in_flight_batches = 24;
    config.learner.max_policy_lag = 32;
    // Generated actors produce in microseconds: the learner, not the
    // actors' CPU, sets the pace on loopback, which is what flow control
    // must keep up behind the delay.
    let (direct, _) = train(&config, 0, 4, Duration::ZERO, None).await;
    let (delayed, _) = train(&config, 0, 4, Duration::from_millis(25), None).await;
    let (d, l) = (&direct.totals, &delayed.totals);
    eprintln!(
        "loopback: wait {:.3}, {:.0} trained/s, lag {:.2}; 25 ms: wait {:.3}, {:.0} trained/s, lag {:.2}",
        d.data_wait_fraction,
        d.trained_transitions as f64 / d.wall_s,
        d.mean_policy_lag,
        l.data_wait_fraction,
        l.trained_transitions as f64 / l.wall_s,
        l.mean_policy_lag,
    );
    // The credit room opened up to the bandwidth-delay product: the
    // learner trains about as fast as on loopback (bigger batches make up
    // for some waiting) and waits for data well under half the time. A
    // window-bound flow trained 0.38x as fast and waited 61 % here
    // (issue 5); with credits, 2.2-2.7x as fast, waiting 14-30 % (here
    // and on CI; loopback waits 8-21 %). Side by side the rate ratio is
    // noisy on a loaded 2-core machine, mostly through the loopback run
    // (17-24k trained/s): 0.54-0.77 in 11 runs of stop 41, as low with
    // quiet sessions turned off. The bound sits at 0.45, above the
    // window-bound 0.38; the wait fraction below (12-17 % in those runs)
    // is the steadier check.
    let (direct_rate, delayed_rate) = (
        d.trained_transitions as f64 / d.wall_s,
        l.trained_transitions as f64 / l.wall_s,
    );
    assert!(
        delayed_rate >= 0.45 * direct_rate,
        "{delayed_rate:.0} trained/s behind the delay vs {direct_rate:.0} on loopback"
    );
    assert!(
        l.data_wait_fraction <= 0.45,
        "waiting {:.3} behind the delay ({:.3} on loopback)",
        l.data_wait_fraction,
        d.data_wait_fraction
    );
    assert!(l.max_policy_lag <= config.learner.max_policy_lag);
}

/// Four actors on loopback set the pace; four others sit behind 300 ms
/// each way, so their chunks arrive tens of steps old. Their sessions pause
/// instead of feeding the stale counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actors_far_behind_the_others_do_not_roll_out_for_nothing() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut config = support::tiny_config();
    config.learner.max_steps = 4000;
    config.model.hidden = vec![256, 256];
    // A tight lag bound, so that the far chunks are well past it on any
    // machine (with 32, they could arrive half fresh on a slow one).
    config.learner.max_policy_lag = 16;
    config.learner.max_in_flight_batches = 8;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // 300 ms each way: a chunk granted now arrives some 600 ms later, while
    // the near actors feed a step every few milliseconds. (At 100 ms, a
    // learner slower than 12 ms a step saw the far chunks fresh.)
    let proxy = DelayProxy::start(address, Duration::from_millis(300))
        .await
        .unwrap();
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        RunOptions::default(),
        std::future::pending::<()>(),
    ));
    let fleet = |target: std::net::SocketAddr| {
        let mut config = config.clone();
        config.actor.learner = format!("http://{target}");
        tokio::spawn(flgfn_actor::loadgen::run(config, 4, std::future::pending()))
    };
    let (near, far) = (fleet(address), fleet(proxy.address));
    let outcome = tokio::time::timeout(Duration::from_secs(300), learner)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let sent = |fleet: tokio::task::JoinHandle<Vec<GeneratedActor>>| async move {
        let reports = fleet.await.unwrap();
        reports
            .into_iter()
            .map(|r| r.into_result().unwrap().transitions_sent)
            .sum::<u64>()
    };
    let (near, far) = (sent(near).await, sent(far).await);
    let report = &outcome.final_report;
    eprintln!(
        "pauses {}; near actors sent {near}, far actors {far}; ingested {}, trained {}, stale {} ({:.2} % of ingested), lag {:.2} mean / {} max",
        report.session_pauses,
        report.ingested_transitions,
        outcome.totals.trained_transitions,
        report.stale_transitions,
        100.0 * report.stale_transitions as f64 / report.ingested_transitions.max(1) as f64,
        outcome.totals.mean_policy_lag,
        outcome.totals.max_policy_lag,
    );
    // Without pauses the far actors rolled out all along for nothing: here
    // 36,768 transitions of which 36,096 dropped as stale, 6.7 % of what
    // was ingested. With them, ~3,000 sent (their first credits, then
    // probes) and ~1 % stale (measured at 100 ms each way).
    let produced = near + far;
    assert!(
        (report.stale_transitions as f64) <= 0.02 * produced as f64,
        "{} of {produced} stale after {} pauses",
        report.stale_transitions,
        report.session_pauses
    );
    assert!(outcome.totals.max_policy_lag <= config.learner.max_policy_lag);
    // The mechanism itself: the far sessions paused (20 times on a slow
    // day at 100 ms each way). Only a learner slower than 37 ms a step
    // (600 ms / 16) would see their chunks fresh.
    assert!(
        report.session_pauses > 0,
        "far {far}, near {near}: no pause"
    );
}

/// Generated actors that fail (here: their learner stopped for a restart
/// that never comes, and they give up reconnecting) keep their counts:
/// what they sent before reached the learner, and a load generator's
/// summary must not read as if nothing had been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_actors_that_give_up_keep_what_they_sent() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    support::init_logs();
    let mut config = support::tiny_config();
    // Trains until stopped.
    config.learner.max_steps = 0;
    config.learner.first_report_s = 0.05;
    config.learner.report_every_s = 0.05;
    let metrics = std::env::temp_dir().join(format!("flgfn-give-up-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        RunOptions {
            metrics_path: Some(metrics.clone()),
            ..RunOptions::default()
        },
        async move {
            let _ = stopped.await;
            flgfn_learner::StopRequest::Restart
        },
    ));
    config.actor.learner = format!("http://{address}");
    config.actor.reconnect_attempts = 2;
    config.actor.reconnect_initial_s = 0.01;
    config.actor.reconnect_max_s = 0.02;
    let load = tokio::spawn(flgfn_actor::loadgen::run(config, 3, std::future::pending()));
    // Stopped once all three are connected and many chunks came since (a
    // fixed wait could stop actors still connecting, on a loaded machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut all_joined_at = None;
    loop {
        let last = support::reports(&metrics).pop();
        if let Some(last) = last {
            match all_joined_at {
                None if last.actors_connected == 3 => all_joined_at = Some(last.accepted_chunks),
                Some(at) if last.accepted_chunks >= at + 30 => break,
                _ => {}
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "3 generated actors did not all join and send"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), learner)
        .await
        .expect("the learner stops")
        .unwrap()
        .unwrap();
    let generated = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("the generated actors give up")
        .unwrap();
    let mut sent = 0;
    for actor in &generated {
        assert!(
            matches!(actor.ended, Err(flgfn_actor::ActorError::GaveUp { .. })),
            "{:?}",
            actor.ended
        );
        assert!(actor.report.chunks_sent > 0, "{:?}", actor.report);
        sent += actor.report.transitions_sent;
    }
    let ingested = outcome.final_report.ingested_transitions;
    assert!(ingested > 0);
    // What the learner took was sent; in flight at the stop, a little
    // more may have been sent than taken.
    assert!(sent >= ingested, "sent {sent}, ingested {ingested}");
    let _ = std::fs::remove_file(&metrics);
    let _ = std::fs::remove_file(metrics.with_extension("summary.json"));
}

/// A report's ingest rate counts what arrived in its own window of
/// training time: the first report's leaves out what arrived before the
/// first step (the first credit room, filled while the actors started,
/// the first batch at least), which that window does not cover. And a
/// report's counts are taken with its clock, not after its evaluation,
/// while chunks keep arriving: each later window's ingest is what they
/// say arrived since the report before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_reports_ingest_rate_leaves_out_what_came_before_training() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut config = support::tiny_config();
    config.learner.max_steps = 200;
    // Reports by steps: several in so short a run.
    config.learner.eval_every_steps = 25;
    let dir = std::env::temp_dir().join(format!("flgfn-ingest-rate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = dir.join("metrics.jsonl");
    train(&config, 0, 2, Duration::ZERO, Some(metrics.clone())).await;
    let first = support::reports(&metrics).into_iter().next().unwrap();
    // Its window is its training time, from the first step.
    let in_window = first.ingested_per_s * first.wall_s;
    let before_training = config.learner.batch_transitions as f64;
    assert!(
        in_window <= first.ingested_transitions as f64 - before_training + 1.0,
        "{in_window:.0} transitions in the first window, of {} ingested, {before_training} of them before the first step",
        first.ingested_transitions
    );
    let reports = support::reports(&metrics);
    assert!(reports.len() >= 3, "{} reports", reports.len());
    for pair in reports.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let in_window = after.ingested_per_s * (after.wall_s - before.wall_s);
        let counted = after.ingested_transitions - before.ingested_transitions;
        assert!(
            (in_window - counted as f64).abs() < 0.5,
            "step {}: {in_window:.1} transitions in its window, {counted} counted since step {}",
            after.step,
            before.step
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
