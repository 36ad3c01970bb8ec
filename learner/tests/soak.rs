//! A soak: a learner process fed by 64 concurrent actor streams from the
//! load generator for a bounded time. Its resident memory stays flat after
//! warm-up, no stream is starved, and every chunk the actors sent (they
//! stop first, draining) was accepted: none refused, lost or left in
//! flight.
//!
//! `FLGFN_SOAK_S` sets the duration (20 s by default; `deploy/test.sh
//! --long` runs 600 s).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use flgfn_common::config::Config;

const STREAMS: usize = 64;

fn resident_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_streams_for_a_while() {
    let seconds: f64 = std::env::var("FLGFN_SOAK_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20.0);
    let dir = std::env::temp_dir().join(format!("flgfn-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("soak.toml");
    // Until stopped.
    let toml = support::TINY_TOML.replace("[learner]\n", "[learner]\nmax_steps = 0\n");
    std::fs::write(&config_path, &toml).unwrap();
    let mut config = Config::from_file(&config_path).unwrap();
    let address = format!("127.0.0.1:{}", support::free_port().await);
    let metrics = dir.join("metrics.jsonl");
    let mut learner = support::learner_process(&address, &config_path, &metrics, &[]);
    let pid = learner.id();

    config.actor.learner = format!("http://{address}");
    config.actor.reconnect_initial_s = 0.05;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let generators = tokio::spawn(flgfn_actor::loadgen::run(
        config.clone(),
        STREAMS,
        async move {
            let _ = stopped.await;
        },
    ));

    // Warm-up from when every stream is connected and training runs (the
    // learner process loads libtorch first, slowly on a loaded machine):
    // a quarter of the time (at least 3 s); then sample memory.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !support::reports(&metrics)
        .last()
        .is_some_and(|report| report.actors_connected == STREAMS as i64 && report.step > 0)
    {
        assert!(
            Instant::now() < deadline,
            "{STREAMS} streams did not connect and train in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let warm_up = Duration::from_secs_f64((seconds / 4.0).max(3.0));
    tokio::time::sleep(warm_up).await;
    let after_warm_up = resident_mb(pid);
    let mut peak = after_warm_up;
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(resident_mb(pid));
    }
    let at_end = resident_mb(pid);

    // Stop the streams first, then the learner (SIGTERM: a clean stop with
    // a last report).
    stop.send(()).unwrap();
    let reports = tokio::time::timeout(Duration::from_secs(60), generators)
        .await
        .unwrap()
        .unwrap();
    // Let the learner take what is already on the wire.
    tokio::time::sleep(Duration::from_secs(1)).await;
    support::signal(pid, "TERM");
    let exit = tokio::task::spawn_blocking(move || learner.0.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "the learner exited with {exit}");

    let reports: Vec<_> = reports
        .into_iter()
        .map(|generated| generated.into_result().unwrap())
        .collect();
    let chunks: Vec<u64> = reports.iter().map(|r| r.chunks_sent).collect();
    let sent_chunks: u64 = chunks.iter().sum();
    let sent: u64 = reports.iter().map(|r| r.transitions_sent).sum();
    let mean = chunks.iter().sum::<u64>() as f64 / STREAMS as f64;
    let fewest = *chunks.iter().min().unwrap();
    let last = support::reports(&metrics).pop().unwrap();
    // The streams stop before the learner, each draining its upload and
    // waiting for the learner to end its session: nothing they sent can
    // still be on its way, so everything sent was received.
    let tail_transitions = sent
        .checked_sub(last.ingested_transitions)
        .unwrap_or_else(|| {
            panic!(
                "the learner ingested {} transitions, more than the {sent} sent",
                last.ingested_transitions
            )
        });
    // In chunks: sent = accepted + refused + lost (gaps the learner saw in
    // the streams' numbers) + the tail in flight at the stop.
    let received = last.accepted_chunks + last.rejected_chunks + last.lost_chunks;
    let tail_chunks = sent_chunks.checked_sub(received).unwrap_or_else(|| {
        panic!("the learner counted {received} chunks (accepted, refused, lost), more than the {sent_chunks} sent")
    });
    eprintln!(
        "soak {seconds:.0} s, {STREAMS} streams: learner {after_warm_up:.0} MB after {:.0} s of warm-up, peak {peak:.0} MB, {at_end:.0} MB at the end; chunks per stream {fewest}..{} (mean {mean:.0}); {sent_chunks} chunks sent: {} accepted, {} refused, {} lost, {tail_chunks} in flight at the stop; {sent} transitions sent, {} accepted, {tail_transitions} in flight at the stop; {} trained in {} steps",
        warm_up.as_secs_f64(),
        chunks.iter().max().unwrap(),
        last.accepted_chunks,
        last.rejected_chunks,
        last.lost_chunks,
        last.ingested_transitions,
        last.trained_transitions,
        last.step,
    );
    assert!(after_warm_up > 0.0, "could not read the learner's memory");
    assert!(
        peak <= 1.10 * after_warm_up,
        "resident memory grew from {after_warm_up:.0} MB to {peak:.0} MB"
    );
    assert!(
        fewest as f64 >= 0.25 * mean && fewest > 0,
        "a starved stream: {chunks:?}"
    );
    // Nothing was refused: none invalid, and the streams ended before
    // the learner began to stop.
    assert!(last.rejections.is_empty(), "{:?}", last.rejections);
    // Loopback, no connection broke: no stream skipped a number.
    assert_eq!(last.lost_chunks, 0);
    assert_eq!(
        (tail_chunks, tail_transitions),
        (0, 0),
        "chunks and transitions sent that the learner never received"
    );
    let unconfirmed = reports.iter().filter(|r| r.stop_unconfirmed).count();
    assert_eq!(
        unconfirmed, 0,
        "streams whose learner did not confirm their end"
    );
    assert!(last.trained_transitions > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
