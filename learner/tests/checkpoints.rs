//! Checkpoints and resume: a stopped run continues where it stopped, and a
//! learner killed with SIGKILL at random moments, again and again, resumes
//! each time with versions that never go backwards while its actors
//! reconnect by themselves.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flgfn_actor::{ActorOptions, ActorReport};
use flgfn_common::config::Config;
use flgfn_learner::checkpoint;
use flgfn_learner::{RunOptions, TrainingOutcome};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flgfn-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn exact_tv(config: &Config, weights: &[u8]) -> f64 {
    support::exact_total_variation(config, weights).0
}

fn actor(config: &Config, url: &str, i: u64) -> Actor {
    let mut config = config.clone();
    config.actor.learner = url.to_owned();
    tokio::spawn(flgfn_actor::run(
        config,
        ActorOptions {
            name: format!("survivor-{i}"),
            seed_offset: Some(i),
        },
        std::future::pending(),
    ))
}

/// The tiny task, checkpointed into `dir/checkpoints` every `every`
/// steps (not by time), for `max_steps`; and that folder.
fn checkpointed(dir: &Path, every: u64, max_steps: u64) -> (Config, PathBuf) {
    let checkpoints = dir.join("checkpoints");
    let mut config = support::tiny_config();
    config.learner.checkpoint_dir = checkpoints.display().to_string();
    config.learner.checkpoint_every_steps = every;
    config.learner.checkpoint_every_s = 0.0;
    config.learner.max_steps = max_steps;
    (config, checkpoints)
}

type Learner = tokio::task::JoinHandle<Result<TrainingOutcome, flgfn_learner::LearnerError>>;
type Actor = tokio::task::JoinHandle<Result<ActorReport, flgfn_actor::ActorError>>;

/// A learner in this process writing `metrics`, and two in-process actors.
async fn start_run(config: &Config, metrics: &Path) -> (Learner, [Actor; 2]) {
    start_run_until(config, metrics, std::future::pending()).await
}

/// [`start_run`], with a learner told to stop when `stop` resolves.
async fn start_run_until(
    config: &Config,
    metrics: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Learner, [Actor; 2]) {
    start_run_with(config, writing(metrics), stop).await
}

/// The learner's options: its reports to `metrics`, the rest default.
fn writing(metrics: &Path) -> RunOptions {
    RunOptions {
        metrics_path: Some(metrics.to_owned()),
        ..RunOptions::default()
    }
}

/// [`start_run_until`], with the learner's options given.
async fn start_run_with(
    config: &Config,
    options: RunOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Learner, [Actor; 2]) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        options,
        stop,
    ));
    (learner, [actor(config, &url, 0), actor(config, &url, 1)])
}

/// [`start_run`], with a learner that stops when the sender is used (or
/// dropped).
async fn start_stoppable_run(
    config: &Config,
    metrics: &Path,
) -> (Learner, [Actor; 2], tokio::sync::oneshot::Sender<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (learner, actors) = start_run_until(config, metrics, async move {
        let _ = stopped.await;
    })
    .await;
    (learner, actors, stop)
}

/// Waits (at most 60 s) until `metrics` holds `count` reports.
async fn wait_for_reports(metrics: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while support::reports(metrics).len() < count {
        assert!(Instant::now() < deadline, "no reports");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Trains in this process until `max_steps` with two in-process actors.
async fn train(config: &Config, metrics: &Path) -> TrainingOutcome {
    let (learner, actors) = start_run(config, metrics).await;
    let outcome = support::finished_learner(learner).await;
    // Every actor that took part learns that training ended and stops. One
    // whose first connection came only after the end (on a loaded machine
    // one actor can drive a short run alone) cannot, and retries forever:
    // that one is stopped here, and only that one.
    let took_part: std::collections::BTreeSet<u64> =
        outcome.sessions.iter().map(|s| s.actor_id).collect();
    let mut still_running = 0;
    for mut a in actors {
        match tokio::time::timeout(Duration::from_secs(30), &mut a).await {
            Ok(report) => assert!(report.unwrap().unwrap().training_done),
            Err(_) => {
                a.abort();
                still_running += 1;
            }
        }
    }
    assert!(
        still_running + took_part.len() <= 2,
        "{still_running} actors still running after training ended, {} took part",
        took_part.len()
    );
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_resumes_where_it_stopped() {
    let dir = scratch("resume");
    let (mut config, checkpoints) = checkpointed(&dir, 100, 300);
    let metrics = dir.join("metrics.jsonl");

    let first = train(&config, &metrics).await;
    assert_eq!((first.steps, first.version), (300, 300));
    let steps: Vec<u64> = checkpoint::list(&checkpoints)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [100, 200, 300]);
    // The final weights on disk are the ones the run handed back.
    let saved = std::fs::read(checkpoints.join(checkpoint::FINAL_WEIGHTS)).unwrap();
    assert_eq!(saved, first.weights.to_vec());
    let first_reports = support::reports(&metrics).len();

    // Both say which build wrote them.
    let decoded = flgfn_common::weights::decode(&first.weights).unwrap();
    assert_eq!(
        decoded.metadata[flgfn_learner::BUILD_METADATA_KEY],
        flgfn_learner::BUILD
    );
    assert!(flgfn_learner::BUILD.starts_with(env!("CARGO_PKG_VERSION")));

    // Whole-run figures are saved for the resumed run to add to.
    let saved = latest_state(&checkpoints);
    assert_eq!(saved.build, flgfn_learner::BUILD);
    let first_lag_sum = first.totals.mean_policy_lag * first.totals.trained_transitions as f64;
    assert!(
        (saved.totals.lag_weighted - first_lag_sum).abs() <= 1e-6 * first_lag_sum.max(1.0),
        "{:?} vs {:?}",
        saved.totals,
        first.totals
    );
    assert_eq!(saved.totals.max_lag, first.totals.max_policy_lag);
    assert!(saved.totals.waiting_s > 0.0, "{:?}", saved.totals);

    // Started again with no step left to train, it says where the run
    // stands (no report of its own covers it).
    let again = train(&config, &metrics).await;
    assert_eq!((again.steps, again.version), (300, 300));
    let stands = &again.final_report;
    assert_eq!(stands.step, 300);
    assert_eq!(stands.trained_transitions, first.totals.trained_transitions);
    assert_eq!(
        stands.resumed_trained_transitions,
        stands.trained_transitions
    );

    // The same configuration with a larger budget continues the run.
    config.learner.max_steps = 600;
    let second = train(&config, &metrics).await;
    assert_eq!(second.steps, 600);
    // The resumed process's accounts close over what it trained itself.
    let last = &second.final_report;
    assert_eq!(
        last.resumed_trained_transitions,
        first.totals.trained_transitions
    );
    assert_eq!(
        last.ingested_transitions + last.resumed_trained_transitions,
        last.trained_transitions + last.stale_transitions + second.untrained_at_stop_transitions,
        "{last:?}"
    );

    assert!(second.totals.max_policy_lag >= first.totals.max_policy_lag);
    assert_eq!(
        second.version, 600,
        "versions continue from 300 without a jump"
    );
    let all = support::reports(&metrics);
    assert!(
        all.len() > first_reports,
        "the metrics file was appended to"
    );
    assert!(
        all.windows(2)
            .all(|w| w[0].version <= w[1].version && w[0].step < w[1].step)
    );
    assert!(
        all.windows(2).all(|w| w[0].wall_s <= w[1].wall_s),
        "wall_s continues"
    );
    assert!(all[first_reports].step > 300);
    assert!(all.last().unwrap().trained_transitions > all[first_reports - 1].trained_transitions);
    let tv = exact_tv(&config, &second.weights);
    assert!(tv <= 0.05, "exact TV {tv} after resuming");

    // Another objective cannot take the run over: the error names the key
    // and both objectives.
    config.learner.max_steps = 700;
    config.objective.name = flgfn_common::config::ObjectiveName::Tb;
    let error = support::learner_refusal(config, "127.0.0.1:0").await;
    assert!(
        error.contains("objective.name") && error.contains("fl_db") && error.contains("tb,"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Trains with two in-process actors until the learner fails; its error.
async fn failed_run(config: &Config, metrics: &Path) -> String {
    failed_run_until(config, metrics, std::future::pending()).await
}

/// [`failed_run`], with a learner told to stop when `stop` resolves.
async fn failed_run_until(
    config: &Config,
    metrics: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> String {
    failed_run_with(config, writing(metrics), stop).await
}

/// [`failed_run_until`], with the learner's options given.
async fn failed_run_with(
    config: &Config,
    options: RunOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> String {
    let (learner, actors) = start_run_with(config, options, stop).await;
    let error = failure_of(learner).await;
    for a in actors {
        a.abort();
    }
    error
}

/// The error `learner` fails with, within two minutes.
async fn failure_of(learner: Learner) -> String {
    tokio::time::timeout(Duration::from_secs(120), learner)
        .await
        .expect("the learner fails")
        .unwrap()
        .unwrap_err()
        .to_string()
}

/// The steps of the checkpoints in `dir`.
fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let listed = checkpoint::list(dir).unwrap();
    listed.into_iter().map(|(step, _)| step).collect()
}

/// The state of the latest checkpoint in `dir`, which must have one.
fn latest_state(dir: &Path) -> checkpoint::CheckpointState {
    checkpoint::load_latest(dir).unwrap().unwrap().state
}

/// With `checkpoint_every_s` alone (no step cadence), checkpoints come
/// by training time: a run of several tenths of a second at 0.05 s keeps
/// earlier ones beside the final one (the last `keep_checkpoints`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_come_by_training_time_alone() {
    let dir = scratch("by-time");
    let (mut config, checkpoints) = checkpointed(&dir, 0, 600);
    config.learner.checkpoint_every_s = 0.05;
    let outcome = train(&config, &dir.join("metrics.jsonl")).await;
    assert_eq!(outcome.steps, 600);
    let steps = checkpoint_steps(&checkpoints);
    eprintln!(
        "checkpoints kept at steps {steps:?} of a {:.2} s run",
        outcome.totals.wall_s
    );
    assert!(
        outcome.totals.wall_s > 0.15,
        "too short a run to say: {}",
        outcome.totals.wall_s
    );
    assert_eq!(steps.len(), config.learner.keep_checkpoints, "{steps:?}");
    assert_eq!(steps.last(), Some(&600));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run that fails (here its metrics file cannot be written: /dev/full
/// refuses every write) still saves what it trained: the error ends it
/// with a checkpoint of its last step, and a restart resumes from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_fails_leaves_a_checkpoint_of_its_last_step() {
    let dir = scratch("failed-write");
    let (mut config, checkpoints) = checkpointed(&dir, 1000, 300);
    config.learner.eval_every_steps = 40;
    let error = failed_run(&config, Path::new("/dev/full")).await;
    assert!(error.contains("/dev/full"), "{error}");
    assert_eq!(
        checkpoint_steps(&checkpoints),
        [40],
        "the step of the failed report is saved"
    );

    config.learner.max_steps = 100;
    let resumed = train(&config, &dir.join("metrics.jsonl")).await;
    assert_eq!((resumed.steps, resumed.version), (100, 100));
    let reports = support::reports(&dir.join("metrics.jsonl"));
    assert!(reports.first().unwrap().step > 40, "{:?}", reports.first());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A periodic checkpoint write still under way at a stop, which then
/// fails: the stop's checkpoint stands in for it, as the last checkpoint
/// does at `max_steps` (the failure is warned about), and the run ends as
/// stopped rather than failed. One periodic write goes to a FIFO in place
/// of its temporary file: it waits for the reader this test opens 12 s
/// after the stop, then fails, since a FIFO cannot be synced. (The next
/// periodic write comes 1,000 steps later.)
///
/// That long a wind-down also shows the sessions waiting for it, past
/// their 10 s grace without a stop: the actors are told that training
/// is over, not that the learner is shutting down (which they would
/// take for a lost connection, and reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stop_after_a_periodic_write_that_fails_ends_well() {
    let dir = scratch("failed-at-stop");
    let (mut config, checkpoints) = checkpointed(&dir, 1000, 0);
    config.learner.eval_every_steps = 100;
    let metrics = dir.join("metrics.jsonl");
    let (learner, actors, stop) = start_stoppable_run(&config, &metrics).await;
    // After the start, which removes unfinished writes' files; for a
    // write at least 1,000 steps ahead (a second or more here), so that
    // the FIFO is in place before it.
    wait_for_reports(&metrics, 1).await;
    let reported = support::reports(&metrics).last().unwrap().step;
    let target = (reported / 1000 + 2) * 1000;
    let fifo = checkpoints.join(format!(".ckpt-{target:012}.safetensors.tmp"));
    support::make_fifo(&fifo);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !support::reports(&metrics).iter().any(|r| r.step > target) {
        assert!(Instant::now() < deadline, "no report after step {target}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    // Read once the stop has reached the trainer (its steps take a
    // millisecond here): read earlier, the write's failure would reach
    // it between two steps, as any periodic write's does, and end
    // training as failed.
    tokio::time::sleep(Duration::from_secs(12)).await;
    // (Read on a thread of its own: opening a FIFO waits for its writer,
    // which a broken run may never open.)
    let (read, reader) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut written = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::open(&fifo).unwrap(), &mut written).unwrap();
        let _ = read.send(written.len());
    });
    let outcome = support::finished_learner(learner).await;
    for a in actors {
        let report = tokio::time::timeout(Duration::from_secs(30), a)
            .await
            .expect("an actor told that training is over stops")
            .unwrap()
            .unwrap();
        assert!(report.training_done, "{report:?}");
    }
    assert!(
        (target + 100..target + 1000).contains(&outcome.steps),
        "stopped at step {}, not between the write of step {target} and the next",
        outcome.steps
    );
    // The stop's step, not the failed write's (those before it stay).
    let steps = checkpoint_steps(&checkpoints);
    assert!(
        steps.last() == Some(&outcome.steps) && !steps.contains(&target),
        "{steps:?}"
    );
    let written = reader
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the write of step {target} never came to the FIFO"));
    assert!(written > 0, "the write of step {target} sent nothing");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner refused at start-up once it has made its checkpoint folder
/// (here given a file that holds no reports as its metrics file) removes
/// the folder again: the mistake leaves nothing to clean up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_refused_at_start_leaves_no_checkpoint_folder() {
    let dir = scratch("refused-start");
    std::fs::create_dir_all(&dir).unwrap();
    let (config, checkpoints) = checkpointed(&dir, 1000, 100);
    let not_metrics = dir.join("job.toml");
    std::fs::write(&not_metrics, "[learner]\n").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = flgfn_learner::serve(
        config,
        listener,
        writing(&not_metrics),
        std::future::pending::<()>(),
    )
    .await;
    let error = refused.expect_err("refused").to_string();
    assert!(error.contains("job.toml"), "{error}");
    assert!(!checkpoints.exists(), "{} is left", checkpoints.display());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Checkpoints are written beside training, and a write that fails
/// still ends it, naming the folder (here replaced by a file after the
/// first checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_written_ends_training() {
    let dir = scratch("unwritable");
    let (config, checkpoints) = checkpointed(&dir, 20, 1_000_000);
    let folder = checkpoints.clone();
    let replace = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while checkpoint_steps(&folder).is_empty() {
            assert!(Instant::now() < deadline, "no checkpoint");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // A write under way may put a file back into the folder, or the
        // folder back: until the file stands.
        loop {
            let _ = std::fs::remove_dir_all(&folder);
            if std::fs::write(&folder, "not a folder").is_ok() {
                break;
            }
        }
    });
    let error = failed_run(&config, &dir.join("metrics.jsonl")).await;
    replace.await.unwrap();
    // Said as what it is, not as "File exists".
    assert!(
        error.contains(&format!("{}: not a folder", checkpoints.display())),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run's end that cannot be saved (here a folder stands where its final
/// weights, or its last checkpoint, go) fails the run before any actor
/// hears that training is over: the actors wait for the learner's
/// restart, which resumes from the last checkpoint saved and trains the
/// rest with them. Told first, they would have stopped for good (compose
/// restarts only a failed container), and the restarted learner would
/// wait for data that never comes; with the checkpoint saved before the
/// weights, a restart would find the run over and end at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actors_hear_that_training_is_over_only_once_it_is_saved() {
    const MAX_STEPS: u64 = 1200;
    for obstacle in [
        checkpoint::FINAL_WEIGHTS.to_owned(),
        format!("ckpt-{MAX_STEPS:012}.safetensors"),
    ] {
        an_end_that_cannot_be_saved_keeps_the_actors(&obstacle, MAX_STEPS).await;
    }
}

/// [`actors_hear_that_training_is_over_only_once_it_is_saved`], with a
/// folder at `obstacle` in the checkpoint folder.
async fn an_end_that_cannot_be_saved_keeps_the_actors(obstacle: &str, max_steps: u64) {
    let dir = scratch(&format!("final-unsaved-{obstacle}"));
    let (mut config, checkpoints) = checkpointed(&dir, 400, max_steps);
    config.actor.reconnect_initial_s = 0.05;
    config.actor.reconnect_max_s = 0.2;
    let metrics = dir.join("metrics.jsonl");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let url = format!("http://{address}");
    let learner = |config: Config, listener: TcpListener| {
        tokio::spawn(flgfn_learner::serve(
            config,
            listener,
            writing(&metrics),
            std::future::pending::<()>(),
        ))
    };
    let first = learner(config.clone(), listener);
    let actors = [actor(&config, &url, 0), actor(&config, &url, 1)];
    // After the first learner has loaded (its folder checked, and
    // cleared of what is no checkpoint), 800 steps before its last.
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint_steps(&checkpoints).is_empty() {
        assert!(Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let in_the_way = checkpoints.join(obstacle);
    std::fs::create_dir_all(in_the_way.join("taken")).unwrap();
    let error = failure_of(first).await;
    assert!(error.contains(&in_the_way.display().to_string()), "{error}");
    let saved = checkpoint_steps(&checkpoints);
    assert!(saved.contains(&800), "{saved:?}");
    // Not saved: still the folder put in its way, or absent.
    let last_name = format!("ckpt-{max_steps:012}.safetensors");
    let last = checkpoints.join(&last_name);
    if obstacle == last_name {
        assert!(last.is_dir(), "the last step's checkpoint was saved");
    } else {
        assert!(!last.exists(), "the last step's checkpoint was saved");
    }
    for a in &actors {
        assert!(!a.is_finished(), "an actor stopped with the failed learner");
    }

    std::fs::remove_dir_all(&in_the_way).unwrap();
    // The port may be taken for a moment: by the first learner's server
    // winding down, or by an actor's reconnect that met itself (Linux
    // connects a socket to itself when the port it dials is its own
    // ephemeral port and nothing listens there).
    let deadline = Instant::now() + Duration::from_secs(30);
    let listener = loop {
        match TcpListener::bind(address).await {
            Ok(listener) => break listener,
            Err(error) => assert!(Instant::now() < deadline, "{address}: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outcome = support::finished_learner(learner(config.clone(), listener)).await;
    assert_eq!(outcome.steps, max_steps);
    // Both actors trained with the restarted learner, and it told them
    // that training is over.
    let trained_again: std::collections::BTreeSet<u64> =
        outcome.sessions.iter().map(|s| s.actor_id).collect();
    assert!(!trained_again.is_empty(), "no actor came back");
    for a in actors {
        let report = support::finished_actor(a).await;
        assert!(report.sessions_opened >= 2, "{report:?}");
    }
    let reports = support::reports(&metrics);
    assert_eq!(reports.last().map(|r| r.step), Some(max_steps));
    assert!(checkpoints.join(checkpoint::FINAL_WEIGHTS).is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A report whose metrics write fails counts the skipped steps of its
/// window once in the checkpoint saved after it (a learning rate of 1e30:
/// every step after the first is skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_report_counts_its_skipped_steps_once() {
    let dir = scratch("failed-skipping");
    let (mut config, checkpoints) = checkpointed(&dir, 1000, 300);
    config.learner.eval_every_steps = 10;
    config.learner.learning_rate = 1e30;
    let error = failed_run(&config, Path::new("/dev/full")).await;
    assert!(error.contains("/dev/full"), "{error}");
    let listed = checkpoint::list(&checkpoints).unwrap();
    let [(10, path)] = listed.as_slice() else {
        panic!("one checkpoint, at the failed report's step: {listed:?}");
    };
    let skipped = checkpoint::read(path).unwrap().state.totals.skipped_batches;
    assert!((1..10).contains(&skipped), "{skipped} of 10 steps skipped");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner whose actors vanish, and that is stopped a while later, left
/// that wait out of its clock: counted as training, it read as busy time
/// in the last report (seconds per step) and carried into the checkpoint,
/// and so into a resumed run's wall_s and time to quality.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_after_starving_leaves_the_wait_out_of_wall_s() {
    const STARVED: Duration = Duration::from_secs(4);
    let dir = scratch("starved-stop");
    let (config, checkpoints) = checkpointed(&dir, 0, 0);
    let metrics = dir.join("metrics.jsonl");
    let started = Instant::now();
    let (learner, actors, stop) = start_stoppable_run(&config, &metrics).await;
    wait_for_reports(&metrics, 2).await;
    for a in actors {
        a.abort();
    }
    tokio::time::sleep(STARVED).await;
    stop.send(()).unwrap();
    let outcome = support::finished_learner(learner).await;
    let elapsed = started.elapsed().as_secs_f64();
    let last = outcome.final_report.clone();
    // At most the time before the actors went: the starved seconds are
    // not in it (nor in the checkpoint it resumes from).
    assert!(
        last.wall_s < elapsed - STARVED.as_secs_f64(),
        "wall_s {} of {elapsed:.2} s, {} s of them starved",
        last.wall_s,
        STARVED.as_secs_f64()
    );
    let saved = latest_state(&checkpoints).wall_s;
    assert!(
        (saved - last.wall_s).abs() < 0.5,
        "{saved} against {}",
        last.wall_s
    );
    // Steps cost milliseconds here: none took a second.
    assert!(last.busy_ms_per_step < 1000.0, "{last:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run with reports every so many steps (an experiment's) that is
/// stopped between two of them reports where it stopped, but the
/// checkpoint it resumes from holds the grid's evaluations only: a run
/// stopped and resumed rests on as many samples as one that was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_between_grid_reports_adds_no_evaluation_to_the_checkpoint() {
    let dir = scratch("off-grid");
    let (mut config, checkpoints) = checkpointed(&dir, 0, 0);
    // Wide: a stop landing on a grid step (which this test could not tell
    // from one between) comes about once in this many runs.
    config.learner.eval_every_steps = 50;
    let metrics = dir.join("metrics.jsonl");
    let (learner, actors, stop) = start_stoppable_run(&config, &metrics).await;
    // Until some reports are in, then at whatever step it is.
    wait_for_reports(&metrics, 2).await;
    stop.send(()).unwrap();
    let outcome = support::finished_learner(learner).await;
    for a in actors {
        a.abort();
    }
    let saved = latest_state(&checkpoints);
    assert_eq!(saved.step, outcome.steps);
    let reported: Vec<u64> = support::reports(&metrics).iter().map(|r| r.step).collect();
    assert_eq!(
        reported.last(),
        Some(&outcome.steps),
        "the stop reports where it stopped: {reported:?}"
    );
    let grid_reports = outcome.steps / 50;
    assert_eq!(
        saved.evaluator.samples_so_far,
        grid_reports * config.learner.eval_samples as u64,
        "stopped at step {}",
        outcome.steps
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run whose `max_steps` is off its report grid ends with a report at
/// its last step, and that report stays out of its final checkpoint, as a
/// stop's does: a finished run resumed with more steps rests on the
/// grid's evaluations only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_step_off_the_report_grid_adds_no_evaluation_to_the_checkpoint() {
    let dir = scratch("off-grid-end");
    let (mut config, checkpoints) = checkpointed(&dir, 0, 25);
    config.learner.eval_every_steps = 10;
    let metrics = dir.join("metrics.jsonl");
    let outcome = train(&config, &metrics).await;
    assert_eq!(outcome.steps, 25);
    let steps: Vec<u64> = support::reports(&metrics).iter().map(|r| r.step).collect();
    assert_eq!(steps, [10, 20, 25]);
    let saved = latest_state(&checkpoints);
    assert_eq!(saved.step, 25);
    assert_eq!(
        saved.evaluator.samples_so_far,
        2 * config.learner.eval_samples as u64,
        "the evaluations of steps 10 and 20 only"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run whose only report is its off-grid last one, at quality: its
/// outcome says quality was reached (the report says so, and the run's
/// line did), while its checkpoint, holding the grid's evaluations only,
/// has no time to quality. (Before, the outcome said not reached.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_found_only_by_the_off_grid_last_report_is_the_runs() {
    let dir = scratch("off-grid-quality");
    let (mut config, checkpoints) = checkpointed(&dir, 0, 1000);
    config.learner.eval_every_steps = 5000;
    config.learner.eval_samples = 2048;
    let metrics = dir.join("metrics.jsonl");
    let outcome = train(&config, &metrics).await;
    let steps: Vec<u64> = support::reports(&metrics).iter().map(|r| r.step).collect();
    assert_eq!(steps, [1000]);
    assert_eq!(
        outcome.final_report.at_quality,
        Some(true),
        "the tiny task reaches quality in 1,000 steps: {:?}",
        outcome.final_report
    );
    assert_eq!(outcome.quality_reached(), Some(true));
    assert_eq!(outcome.time_to_quality_s, Some(outcome.final_report.wall_s));
    let saved = latest_state(&checkpoints);
    assert_eq!(saved.step, 1000);
    assert_eq!(saved.time_to_quality_s, None);
    assert_eq!(saved.evaluator.samples_so_far, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run's checkpoint of its last step says it is over: a learner killed
/// after writing it but before its last report (an evaluation, which may
/// be long) would leave a run that resumes to nothing, that report never
/// written. So the last report comes first. (A slow evaluation here: the
/// checkpoint is looked for every millisecond.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_steps_checkpoint_comes_after_the_last_report() {
    let dir = scratch("last-report-first");
    let (mut config, checkpoints) = checkpointed(&dir, 5, 25);
    config.learner.eval_every_steps = 10;
    config.learner.eval_samples = 1 << 17;
    let metrics = dir.join("metrics.jsonl");
    let watched = {
        let (checkpoints, metrics) = (checkpoints.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !checkpoint::list(&checkpoints)
                .is_ok_and(|saved| saved.iter().any(|&(step, _)| step == 25))
            {
                assert!(Instant::now() < deadline, "no checkpoint of step 25");
                std::thread::sleep(Duration::from_millis(1));
            }
            support::reports(&metrics).last().map(|r| r.step)
        })
    };
    let outcome = train(&config, &metrics).await;
    assert_eq!(outcome.steps, 25);
    assert_eq!(
        watched.await.unwrap(),
        Some(25),
        "the last report was written when the last step's checkpoint appeared"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The last step's report failing (its metrics write: the pipe's reader
/// goes away after the first report) leaves no checkpoint of the last
/// step: one would say the run is over, and resumed, it would write no
/// last report. The checkpoint before it stays the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_report_that_fails_leaves_no_checkpoint_of_the_last_step() {
    use std::io::BufRead;
    let dir = scratch("last-report-fails");
    let (mut config, checkpoints) = checkpointed(&dir, 50, 200);
    config.learner.eval_every_steps = 100;
    let metrics = dir.join("metrics.pipe");
    support::make_fifo(&metrics);
    // Reads the first report (step 100) and goes: the next, at step 200
    // (100 steps and an evaluation later), fails to write.
    let pipe = metrics.clone();
    let reader = std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(std::fs::File::open(pipe).unwrap()).lines();
        lines.next().unwrap().unwrap();
    });
    let error = failed_run(&config, &metrics).await;
    reader.join().unwrap();
    assert!(error.contains("metrics.pipe"), "{error}");
    assert_eq!(checkpoint_steps(&checkpoints).last(), Some(&150), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The learner's health as `url` answers it, asked every 100 ms until it
/// is `wanted` or 60 s pass: whether it came.
async fn health_becomes(url: &str, wanted: support::ServingStatus) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let tls = flgfn_common::auth::TlsConfig::default();
        if flgfn_actor::health::check(url, "", &tls).await.ok() == Some(wanted) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A trainer stuck on one piece of work past `learner.stuck_after_s` (here
/// its metrics write, to a pipe nobody reads: a blocked file system)
/// turns health NOT_SERVING, for a liveness probe to restart the learner;
/// once it moves on (the pipe read), health is SERVING again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_trainer_fails_health_until_it_moves_on() {
    use std::io::Read;
    support::init_logs();
    let dir = scratch("stuck-trainer");
    let mut config = support::tiny_config();
    // Until stopped: the pipe fills at some step, however fast they are.
    config.learner.max_steps = 0;
    // Well beyond what start-up, filling the pipe and the watcher's 1 s
    // tick take together, so that the bound below shows the threshold.
    config.learner.stuck_after_s = 4.0;
    // A report every 10 ms of training: the pipe (64 KiB) fills within
    // about fifty of them, and the next write waits.
    config.learner.first_report_s = 0.01;
    config.learner.report_every_s = 0.01;
    config.learner.eval_samples = 16;
    let metrics = dir.join("metrics.pipe");
    support::make_fifo(&metrics);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let pipe = metrics.clone();
    let reader = std::thread::spawn(move || {
        // Opened (the learner's open waits for it), then left unread until
        // released, then read to the learner's end.
        let mut file = std::fs::File::open(pipe).unwrap();
        released.recv().unwrap();
        let mut rest = Vec::new();
        let _ = file.read_to_end(&mut rest);
    });
    let (url, learner, stop) = support::stoppable_learner(&config, writing(&metrics)).await;
    let actors = [actor(&config, &url, 0), actor(&config, &url, 1)];
    // SERVING once it trains (NOT_SERVING before: that says nothing).
    assert!(
        health_becomes(&url, support::ServingStatus::Serving).await,
        "the learner never served"
    );
    let served = Instant::now();
    assert!(
        health_becomes(&url, support::ServingStatus::NotServing).await,
        "health stayed SERVING with the trainer stuck"
    );
    // Not before the trainer was stuck for stuck_after_s.
    assert!(
        served.elapsed() >= Duration::from_secs(4),
        "{:?}",
        served.elapsed()
    );
    release.send(()).unwrap();
    assert!(
        health_becomes(&url, support::ServingStatus::Serving).await,
        "health stayed NOT_SERVING after the trainer moved on"
    );
    stop.send(()).unwrap();
    let outcome = support::finished_learner(learner).await;
    assert!(outcome.steps > 0);
    reader.join().unwrap();
    for a in actors {
        a.abort();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same stop between grid reports, with that last report's metrics
/// write failing (the metrics file is a pipe whose reader goes away after
/// the first report): the error path saves a checkpoint too, and it holds
/// the grid's evaluations only, as after a stop whose report succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_last_report_fails_adds_no_evaluation_to_the_checkpoint() {
    use std::io::BufRead;
    let dir = scratch("off-grid-failed");
    // A checkpoint at step 210 shows the trainer past the first report.
    let (mut config, checkpoints) = checkpointed(&dir, 210, 0);
    // Far apart: the stop lands well before the next grid report.
    config.learner.eval_every_steps = 200;
    let metrics = dir.join("metrics.pipe");
    support::make_fifo(&metrics);
    // Reads the first report (step 200), closes the pipe, then lets the
    // stop through: the next report, the stop's, at a step between 200
    // and 400, fails to write.
    let (closed, reader_gone) = tokio::sync::oneshot::channel::<()>();
    let pipe = metrics.clone();
    let saved_so_far = checkpoints.clone();
    let reader = std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(std::fs::File::open(pipe).unwrap()).lines();
        lines.next().unwrap().unwrap();
        drop(lines);
        // A stop that came before the step after the report would find
        // nothing to report (1 run in 20 did, with a 30 ms pause here):
        // wait for the checkpoint of step 210.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !checkpoint::list(&saved_so_far).is_ok_and(|saved| !saved.is_empty()) {
            assert!(Instant::now() < deadline, "no checkpoint at step 210");
            std::thread::sleep(Duration::from_millis(2));
        }
        closed.send(()).unwrap();
    });
    let error = failed_run_until(&config, &metrics, async move {
        let _ = reader_gone.await;
    })
    .await;
    reader.join().unwrap();
    assert!(error.contains("metrics.pipe"), "{error}");
    let saved = latest_state(&checkpoints);
    assert!(
        (210..400).contains(&saved.step),
        "the stop's report, off the grid, failed: saved at step {}",
        saved.step
    );
    assert_eq!(
        saved.evaluator.samples_so_far, config.learner.eval_samples as u64,
        "the evaluation of step 200 only; failed at step {}",
        saved.step
    );
    eprintln!("the stop's report failed at step {}", saved.step);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model that diverges (a learning rate of 1e30: after the first step
/// every loss is infinite, and each such step is skipped) stops after
/// three reports without a finite step, with a checkpoint; every
/// checkpoint counts each skipped step once, those between two reports
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_run_stops_with_a_checkpoint_counting_every_skipped_step() {
    let dir = scratch("diverged");
    let (mut config, checkpoints) = checkpointed(&dir, 15, 300);
    config.learner.eval_every_steps = 10;
    config.learner.learning_rate = 1e30;
    // An earlier run's summary, which this run's end replaces.
    let summary = dir.join("metrics.summary.json");
    std::fs::write(&summary, r#"{"ended_by": "max_steps"}"#).unwrap();
    let error = failed_run(&config, &dir.join("metrics.jsonl")).await;
    // Diverged from its first step: no checkpoint to go back to.
    assert!(
        error.contains("diverged") && error.contains("start over with --fresh and a lower"),
        "{error}"
    );
    assert_eq!(checkpoint_steps(&checkpoints), [15, 30, 40]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(summary["ended_by"], "error", "{summary}");
    assert_eq!(summary["error"], error.as_str(), "{summary}");
    assert_eq!(summary["steps"], 40, "{summary}");
    let finite_steps: Vec<u64> = checkpoint::list(&checkpoints)
        .unwrap()
        .iter()
        .map(|(step, path)| {
            let state = checkpoint::read(path).unwrap().state;
            step - state.totals.skipped_batches
        })
        .collect();
    assert!(
        finite_steps.iter().all(|&n| n == finite_steps[0]) && (1..10).contains(&finite_steps[0]),
        "finite steps by checkpoint (15, 30, 40): {finite_steps:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run that diverges too late for three reports in a row (here, a short
/// run with one report, at its end) fails too: its final policy's logits
/// are not finite. No checkpoint of its last step is kept, so a resume
/// trains again from the one before (and fails again) rather than find the
/// run finished and end well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_final_policy_diverged_fails_and_resumes_from_before() {
    let dir = scratch("diverged-at-the-end");
    let (mut config, checkpoints) = checkpointed(&dir, 15, 25);
    config.learner.first_report_s = 1e6;
    config.learner.report_every_s = 1e6;
    config.learner.learning_rate = 1e30;
    let metrics = dir.join("metrics.jsonl");
    // The remedy: a run diverged from the start begins again; so does one
    // resumed from it, whose checkpoint recorded no step known sound.
    for (run, remedy) in [
        ("first", "start over with --fresh and a lower"),
        ("resumed", "start over with --fresh and a lower"),
    ] {
        let error = failed_run(&config, &metrics).await;
        assert!(
            error.contains("the final policy's logits are not finite") && error.contains(remedy),
            "{run}: {error}"
        );
        assert_eq!(checkpoint_steps(&checkpoints), [15], "{run}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A resumed run that diverges (the rate raised with --resume-changed)
/// goes on saving checkpoints until it stops, but pruning keeps the one it
/// resumed from beside the newest `keep_checkpoints`, and the error names
/// it as the one to resume from; so does a plain restart of that run
/// (resuming from a diverged checkpoint, which recorded the step known
/// sound). Resumed from it with the old rate, the run ends well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverging_run_keeps_the_checkpoint_to_go_back_to() {
    let dir = scratch("diverged-keeps-sound");
    let (mut config, checkpoints) = checkpointed(&dir, 15, 30);
    config.learner.keep_checkpoints = 2;
    config.learner.eval_every_steps = 10;
    let metrics = dir.join("metrics.jsonl");
    train(&config, &metrics).await;
    assert_eq!(checkpoint_steps(&checkpoints), [15, 30]);

    let sound_rate = config.learner.learning_rate;
    config.learner.learning_rate = 1e30;
    config.learner.max_steps = 300;
    let resume_changed = || RunOptions {
        resume_changed: true,
        ..writing(&metrics)
    };
    let error = failed_run_with(&config, resume_changed(), std::future::pending()).await;
    let saved = checkpoint_steps(&checkpoints);
    assert!(
        saved.len() == 3 && saved[0] == 30 && saved[1] > 30,
        "the one resumed from and the newest two: {saved:?}"
    );
    assert!(
        error.contains("diverged")
            && error.contains("ckpt-000000000030.safetensors (kept for this)"),
        "{error}"
    );
    // Restarted as it is (a job system would): it resumes from the newest,
    // diverged, checkpoint, and still keeps and names step 30.
    let error = failed_run(&config, &metrics).await;
    let again = checkpoint_steps(&checkpoints);
    assert!(
        again.len() == 3 && again[0] == 30 && again[1] > saved[2],
        "the one known sound and the newest two: {again:?}"
    );
    assert!(
        error.contains("ckpt-000000000030.safetensors (kept for this)"),
        "{error}"
    );

    // The remedy, followed: the later ones moved out, the rate lowered.
    for (step, path) in checkpoint::list(&checkpoints).unwrap() {
        if step > 30 {
            std::fs::remove_file(path).unwrap();
        }
    }
    config.learner.learning_rate = sound_rate;
    config.learner.max_steps = 60;
    let (learner, actors) = start_run_with(&config, resume_changed(), std::future::pending()).await;
    let outcome = support::finished_learner(learner).await;
    for a in actors {
        a.abort();
    }
    assert_eq!(outcome.steps, 60);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// TB's log Z and the policy step together: when only log Z's update
/// overflows (a log Z learning rate beyond f32's range), the policy's step
/// is undone too, every step, and the run stops as diverged with nothing
/// moved; it does not train on with log Z frozen at its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_z_update_that_overflows_undoes_the_policy_step_too() {
    let dir = scratch("log-z-overflow");
    let (mut config, checkpoints) = checkpointed(&dir, 15, 300);
    config.learner.eval_every_steps = 10;
    config.objective.name = flgfn_common::config::ObjectiveName::Tb;
    config.objective.log_z_learning_rate = 1e39;
    let error = failed_run(&config, &dir.join("metrics.jsonl")).await;
    assert!(error.contains("diverged"), "{error}");
    let saved = checkpoint::list(&checkpoints).unwrap();
    assert!(!saved.is_empty());
    for (step, path) in saved {
        let skipped = checkpoint::read(&path)
            .unwrap()
            .state
            .totals
            .skipped_batches;
        assert_eq!(skipped, step, "every step was undone");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run whose final checkpoint is damaged resumes from the one before:
/// the damaged file is set aside, versions continue above every one
/// published (the final version is not issued again with older weights),
/// and the metrics keep only the reports up to the step it resumed at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_final_checkpoint_resumes_from_the_one_before_above_every_version() {
    let dir = scratch("damaged-final");
    let (mut config, checkpoints) = checkpointed(&dir, 100, 300);
    let metrics = dir.join("metrics.jsonl");
    let first = train(&config, &metrics).await;
    assert_eq!((first.steps, first.version), (300, 300));
    let (step, newest) = checkpoint::list(&checkpoints).unwrap().pop().unwrap();
    assert_eq!(step, 300);
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();

    let first_steps: Vec<u64> = support::reports(&metrics).iter().map(|r| r.step).collect();
    assert_eq!(first_steps.last(), Some(&300));

    config.learner.max_steps = 400;
    let second = train(&config, &metrics).await;
    assert_eq!(second.steps, 400);
    assert_eq!(
        second.version,
        400 + 101,
        "resumed at step 200 as version 301, one above the last published"
    );
    let mut aside = newest.clone().into_os_string();
    aside.push(".damaged");
    assert!(std::path::Path::new(&aside).exists());
    let steps: Vec<u64> = support::reports(&metrics).iter().map(|r| r.step).collect();
    // The first run's reports past step 200 (its last, at 300) went: that
    // training was done again.
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    let kept: Vec<u64> = first_steps.into_iter().filter(|&s| s <= 200).collect();
    assert_eq!(steps[..kept.len()], kept[..], "{steps:?}");
    assert!(steps[kept.len()..].iter().all(|&s| s > 200), "{steps:?}");
    assert_eq!(steps.last(), Some(&400));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_killed_up_to_five_times_resumes_and_its_actors_carry_on() {
    // More than five short-lived learners train (each about 1,000 to 2,000
    // steps, by the machine's speed). On a machine so fast that the run
    // ends sooner, the cycles stop there (at least three are required):
    // a learner resumed at the last step has nothing left to train, and
    // never reports.
    const MAX_STEPS: u64 = 12_000;
    const MIN_KILLS: usize = 3;
    let dir = scratch("kill");
    let config_path = dir.join("run.toml");
    let checkpoints = dir.join("checkpoints");
    let toml = support::TINY_TOML
        .replace(
            "checkpoint_dir = \"\"",
            &format!(
                "checkpoint_dir = \"{}\"\ncheckpoint_every_steps = 100\ncheckpoint_every_s = 0.0\nmax_steps = {MAX_STEPS}",
                checkpoints.display()
            ),
        )
        .replace(
            "[actor]",
            "[actor]\nreconnect_initial_s = 0.05\nreconnect_max_s = 0.2",
        );
    std::fs::write(&config_path, &toml).unwrap();
    let config = Config::from_file(&config_path).unwrap();
    let address = format!("127.0.0.1:{}", support::free_port().await);
    let metrics = dir.join("metrics.jsonl");
    let learner = || support::learner_process(&address, &config_path, &metrics, &[]);

    let url = format!("http://{address}");
    let actors = [actor(&config, &url, 0), actor(&config, &url, 1)];
    let mut rng = SmallRng::seed_from_u64(7);
    let mut last_version = 0;
    let mut restarts = Vec::new();
    let mut over_before_the_last_learner = false;
    for cycle in 0..5 {
        let started = Instant::now();
        // The new process keeps the reports up to the step it resumes at
        // and drops the later ones (that training is done again): its first
        // report is the line after those it keeps.
        let old = support::reports(&metrics);
        let resumes_at = checkpoint::load_latest(&checkpoints)
            .unwrap()
            .map_or(0, |c| c.state.step);
        if resumes_at >= MAX_STEPS {
            over_before_the_last_learner = true;
            break;
        }
        let kept = old.iter().take_while(|r| r.step <= resumes_at).count();
        let mut process = learner();
        // Wait for this process's first report (it resumed and trained),
        // then kill it at a random moment within the next half second.
        let deadline = Instant::now() + Duration::from_secs(60);
        let first_report = loop {
            let now = support::reports(&metrics);
            if now.len() > kept && old.get(kept) != Some(&now[kept]) {
                break now[kept].clone();
            }
            assert!(Instant::now() < deadline, "cycle {cycle}: no report");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(first_report.step > resumes_at, "cycle {cycle}");
        let to_first_report = started.elapsed();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        process.0.kill().unwrap();
        process.0.wait().unwrap();
        let resumed_from = checkpoint::load_latest(&checkpoints)
            .unwrap()
            .map(|c| c.state);
        eprintln!(
            "cycle {cycle}: first report at step {} version {} after {:.2} s; killed; newest checkpoint step {:?} version {:?}",
            first_report.step,
            first_report.version,
            to_first_report.as_secs_f64(),
            resumed_from.as_ref().map(|s| s.step),
            resumed_from.as_ref().map(|s| s.version),
        );
        // Killed, a learner restarts above its version floor, so above
        // every version it published: none is issued twice.
        assert!(
            first_report.version > last_version,
            "cycle {cycle}: version {} after {last_version}",
            first_report.version
        );
        last_version = support::reports(&metrics).last().unwrap().version;
        restarts.push(to_first_report);
    }
    assert!(
        restarts.len() >= MIN_KILLS,
        "the run ended after {} kills",
        restarts.len()
    );
    // The last learner runs to the end (or, the run over, finds nothing
    // left); the actors finish with it.
    let mut process = learner();
    let status = tokio::task::spawn_blocking(move || process.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let mut sessions = Vec::new();
    for a in actors {
        let report = support::finished_actor(a).await;
        // Never a version lower than one already applied.
        let versions = &report.versions_applied;
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        sessions.push(report.sessions_opened);
    }
    // Each actor reconnected to (nearly) every learner; one may miss a
    // short-lived one, but not several. (A last learner that found the run
    // over exits at once: the actors need not have reached it.)
    let learners = restarts.len() as u32 + u32::from(!over_before_the_last_learner);
    assert!(
        sessions.iter().all(|&s| s + 1 >= learners),
        "sessions {sessions:?} with {learners} learners"
    );
    let all = support::reports(&metrics);
    assert!(
        all.windows(2).all(|w| w[0].version <= w[1].version),
        "versions went backwards"
    );
    // Reports of training done again after a kill were dropped.
    assert!(
        all.windows(2).all(|w| w[0].step < w[1].step),
        "steps went backwards: {:?}",
        all.iter().map(|r| r.step).collect::<Vec<_>>()
    );
    let last = all.last().unwrap();
    assert_eq!(last.step, MAX_STEPS);
    let weights = std::fs::read(checkpoints.join(checkpoint::FINAL_WEIGHTS)).unwrap();
    let tv = exact_tv(&config, &weights);
    let log_z_error = (last.logz_est - last.logz_exact.unwrap()).abs();
    eprintln!(
        "after {} kills: exact TV {tv:.4}, log Z error {log_z_error:.4}, final version {}, restart to first report {:?}",
        restarts.len(),
        last.version,
        restarts
    );
    // The tolerance of an uninterrupted run of the tiny task.
    assert!(tv <= 0.05, "exact TV {tv}");
    assert!(log_z_error < 0.1, "log Z error {log_z_error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner killed before its first step (no actor came) had published
/// its first version all the same (an actor may hold it): the version
/// floor is above it already, so the next start, which may begin from
/// other weights (another seed; no checkpoint to resume), issues a newer
/// version, not that one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_killed_before_its_first_step_publishes_above_it_next_time() {
    let dir = scratch("killed-before-training");
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoints = dir.join("checkpoints");
    let config_path = dir.join("run.toml");
    let toml = support::TINY_TOML.replace(
        "checkpoint_dir = \"\"",
        &format!("checkpoint_dir = \"{}\"", checkpoints.display()),
    );
    std::fs::write(&config_path, &toml).unwrap();
    let address = format!("127.0.0.1:{}", support::free_port().await);
    let metrics = dir.join("metrics.jsonl");
    let log = support::learner_log(&metrics);
    let mut versions = Vec::new();
    for start in 0..3 {
        let mut process = support::learner_process(&address, &config_path, &metrics, &[]);
        let health = support::health(&format!("http://{address}"), &Default::default()).await;
        assert!(
            matches!(health, Ok(support::ServingStatus::Serving)),
            "start {start}: {health:?}"
        );
        process.0.kill().unwrap();
        process.0.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let listening: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("learner listening"))
            .collect();
        assert_eq!(listening.len(), start + 1, "{text}");
        let version = listening[start]
            .split_whitespace()
            .find_map(|field| field.strip_prefix("version="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no version in {}", listening[start]));
        versions.push(version);
        // Its last checkpoint never came: what tells the next start where
        // to begin is the floor, recorded before the version went out.
        let floor = checkpoint::read_version_floor(&checkpoints).unwrap();
        assert!(
            floor > version,
            "start {start}: floor {floor}, published {version}"
        );
    }
    assert_eq!(versions[0], 0, "a fresh run starts at 0");
    assert!(
        versions.windows(2).all(|pair| pair[1] > pair[0]),
        "each start publishes above the one before: {versions:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint taken between two publications (`publish_every` > 1) is
/// resumed from at its own weights' version, not at the last published
/// one below its step (which made the version offset negative: wrapped in
/// release builds, a panic in debug ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_between_publications_resumes_at_its_own_version() {
    let dir = scratch("between-publications");
    let (mut config, checkpoints) = checkpointed(&dir, 10, 15);
    config.learner.publish_every = 7;
    let metrics = dir.join("metrics.jsonl");
    let first = train(&config, &metrics).await;
    assert_eq!((first.steps, first.version), (15, 15));

    // As if the learner had been killed after step 10's checkpoint, and the
    // checkpoint directory copied without its version floor.
    for (step, path) in checkpoint::list(&checkpoints).unwrap() {
        if step > 10 {
            std::fs::remove_file(path).unwrap();
        }
    }
    std::fs::remove_file(checkpoints.join(checkpoint::VERSION_FLOOR)).unwrap();
    std::fs::remove_file(checkpoints.join(checkpoint::FINAL_WEIGHTS)).unwrap();

    config.learner.max_steps = 20;
    let second = train(&config, &metrics).await;
    assert_eq!(
        (second.steps, second.version),
        (20, 20),
        "resumed at step 10 with version 10, the version of its weights"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
