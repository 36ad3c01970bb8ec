//! An actor outlives a learner that is killed and restarted from scratch,
//! and one stopped for a restart (SIGUSR1, or SIGTERM where
//! `learner.sigterm` says so) and started again on its checkpoint.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use flgfn_actor::ActorOptions;
use flgfn_common::config::Config;
use flgfn_learner::RunOptions;
use flgfn_learner::checkpoint;
use tokio::net::TcpListener;

/// The number after `name=` in `line`.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split(&format!(" {name}="))
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Waits (polling) until `ready` holds, at most `seconds`.
async fn wait_until(seconds: u64, mut ready: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_stopped_for_a_restart_keeps_its_actors_and_goes_on_where_it_stopped() {
    stopped_for_a_restart_by("USR1", "").await;
}

/// As the Kubernetes manifests set it: SIGTERM (a pod moved) is a stop
/// for a restart, and the actors wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_set_to_restart_keeps_the_actors_as_sigusr1_does() {
    stopped_for_a_restart_by("TERM", "\nsigterm = \"restart\"").await;
}

/// A job for a learner process that two in-process actors wait for.
struct Job {
    /// Its scratch folder.
    dir: std::path::PathBuf,
    /// The job file.
    config_path: std::path::PathBuf,
    /// Where the learner checkpoints.
    checkpoints: std::path::PathBuf,
    /// A free address for the learner.
    address: String,
    /// The learner's metrics file.
    metrics: std::path::PathBuf,
    /// The learner's log.
    log_path: std::path::PathBuf,
    /// The two actors, started (quick reconnects: no test waits on
    /// backoff).
    actors: Vec<tokio::task::JoinHandle<Result<flgfn_actor::ActorReport, flgfn_actor::ActorError>>>,
}

impl Job {
    /// The tiny task in scratch folder `name`, with `learner_keys` (TOML
    /// lines) and layers `hidden`, checkpointed there.
    async fn start(name: &str, learner_keys: &str, hidden: &str) -> Job {
        let dir = std::env::temp_dir().join(format!("flgfn-restart-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("tiny.toml");
        let checkpoints = dir.join("checkpoints");
        let toml = support::TINY_TOML
            .replace(
                "checkpoint_dir = \"\"",
                &format!(
                    "checkpoint_dir = \"{}\"\n{learner_keys}",
                    checkpoints.display()
                ),
            )
            .replace("hidden = [64, 64]", &format!("hidden = {hidden}"))
            .replace(
                "[actor]",
                "[actor]\nreconnect_initial_s = 0.05\nreconnect_max_s = 0.2",
            );
        std::fs::write(&config_path, toml).unwrap();
        let config = Config::from_file(&config_path).unwrap();
        let address = format!("127.0.0.1:{}", support::free_port().await);
        let metrics = dir.join("metrics.jsonl");
        let actors = (0..2)
            .map(|i| {
                let mut config = config.clone();
                config.actor.learner = format!("http://{address}");
                tokio::spawn(flgfn_actor::run(
                    config,
                    ActorOptions {
                        name: format!("{name}-{i}"),
                        seed_offset: None,
                    },
                    std::future::pending(),
                ))
            })
            .collect();
        Job {
            log_path: support::learner_log(&metrics),
            dir,
            config_path,
            checkpoints,
            address,
            metrics,
            actors,
        }
    }
}

/// A learner with these `learner_keys` (TOML lines) stopped by `signal`
/// tells its actors to reconnect; started again, it goes on where it
/// stopped, with them.
async fn stopped_for_a_restart_by(signal: &str, learner_keys: &str) {
    // Only the stop's checkpoint: the second learner can resume from no
    // other.
    let Job {
        dir,
        config_path,
        checkpoints,
        address,
        metrics,
        log_path,
        actors,
    } = Job::start(
        &format!("stop-{signal}"),
        &format!(
            "checkpoint_every_steps = 1000000\ncheckpoint_every_s = 0.0\nmax_steps = 1000000{learner_keys}"
        ),
        "[64, 64]",
    )
    .await;
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut first = support::learner_process(&address, &config_path, &metrics, &[]);
    wait_until(
        120,
        || {
            read_log().matches("actor joined").count() >= 2
                && !support::reports(&metrics).is_empty()
        },
        || format!("two actors and a report:\n{}", read_log()),
    )
    .await;
    support::signal(first.id(), signal);
    let status = tokio::task::spawn_blocking(move || {
        let status = first.0.wait().unwrap();
        drop(first);
        status
    })
    .await
    .unwrap();
    let log = read_log();
    assert!(status.success(), "{log}");
    assert!(log.contains("stop for a restart requested"), "{log}");
    let finished = support::finished_line(&log);
    assert!(finished.contains("ended_by=restart"), "{finished}");
    let stopped_at = field(finished, "steps").unwrap_or_else(|| panic!("{finished}"));
    // Each session open at the stop was told to reconnect, none that
    // training is over. (One may have ended before, for its own reasons.)
    let ended: Vec<&str> = log
        .lines()
        .skip_while(|line| !line.contains("stop for a restart requested"))
        .filter(|line| line.contains("session ended"))
        .collect();
    assert!(!ended.is_empty(), "{log}");
    assert!(
        ended
            .iter()
            .all(|line| line.contains("the learner stops for a restart")),
        "{ended:?}"
    );
    // The stop's checkpoint holds every step trained.
    let saved = checkpoint::load_latest(&checkpoints).unwrap().unwrap();
    assert_eq!(saved.state.step, stopped_at);

    // The actors wait for the learner to come back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(actors.iter().all(|actor| !actor.is_finished()));

    let more_steps = stopped_at + 200;
    let mut second = support::learner_process(
        &address,
        &config_path,
        &metrics,
        &["--max-steps", &more_steps.to_string()],
    );
    let status = tokio::task::spawn_blocking(move || second.0.wait().unwrap())
        .await
        .unwrap();
    let log = read_log();
    assert!(status.success(), "{log}");
    let finished = log
        .lines()
        .filter(|line| line.contains("training finished"))
        .nth(1)
        .unwrap_or_else(|| panic!("{log}"));
    assert!(finished.contains("ended_by=max_steps"), "{finished}");
    let resumed = log
        .lines()
        .find(|line| line.contains("resuming from a checkpoint"))
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(field(resumed, "step"), Some(stopped_at), "{resumed}");
    let reports = support::reports(&metrics);
    assert_eq!(reports.last().map(|r| r.step), Some(more_steps));
    for actor in actors {
        let report = support::finished_actor(actor).await;
        // One session with each learner, and versions only going up: the
        // second learner went on from the first one's. (Stopped cleanly,
        // the first one's last version may come again, with the same
        // weights, and the new session loads it again: once, at most.)
        assert_eq!(report.sessions_opened, 2, "{report:?}");
        let versions = &report.versions_applied;
        assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
        let repeated = versions.windows(2).filter(|w| w[0] == w[1]).count();
        assert!(repeated <= 1, "{versions:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_reconnects_to_a_restarted_learner_and_loads_its_weights() {
    let dir = std::env::temp_dir().join(format!("flgfn-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("tiny.toml");
    // Quick reconnects, so the test does not wait on backoff.
    let toml = support::TINY_TOML.replace(
        "[actor]",
        "[actor]\nreconnect_initial_s = 0.05\nreconnect_max_s = 0.2",
    );
    std::fs::write(&config_path, toml).unwrap();
    let config = Config::from_file(&config_path).unwrap();

    let address = format!("127.0.0.1:{}", support::free_port().await);

    // First learner: a separate process, trained for a while, then killed
    // without a chance to say goodbye.
    let metrics = dir.join("first.jsonl");
    let mut first =
        support::learner_process(&address, &config_path, &metrics, &["--max-steps", "0"]);

    let mut actor_config = config.clone();
    actor_config.actor.learner = format!("http://{address}");
    let actor = tokio::spawn(flgfn_actor::run(
        actor_config,
        ActorOptions {
            name: "survivor".to_owned(),
            seed_offset: None,
        },
        std::future::pending(),
    ));
    // A report means a second of training on the actor's data, hundreds of
    // published versions: the actor has loaded some above 0 by then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(true, |text| text.is_empty()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first learner never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    // Second learner: in this process, versions start from 0 again.
    let mut second_config = config.clone();
    second_config.learner.max_steps = 200;
    let listener = TcpListener::bind(&address).await.unwrap();
    let outcome = tokio::time::timeout(
        Duration::from_secs(120),
        flgfn_learner::serve(
            second_config,
            listener,
            RunOptions::default(),
            std::future::pending::<()>(),
        ),
    )
    .await
    .expect("the actor feeds the second learner")
    .unwrap();
    assert_eq!(outcome.steps, 200);

    let report = tokio::time::timeout(Duration::from_secs(30), actor)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(report.training_done);
    assert_eq!(report.sessions_opened, 2, "one per learner: {report:?}");
    // Versions went up under the first learner, then restarted lower.
    let versions = &report.versions_applied;
    let restart = versions.windows(2).position(|w| w[1] < w[0]);
    let restart = restart.unwrap_or_else(|| panic!("no restart in {versions:?}"));
    // The second learner's initial weights (version 0) came next, then
    // newer ones.
    assert_eq!(versions[restart + 1], 0, "{versions:?}");
    assert!(versions.len() > restart + 2, "{versions:?}");
    assert!(
        versions[restart + 1..].windows(2).all(|w| w[0] < w[1]),
        "{versions:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A restart asked for once the last step is done (here as the final
/// report appears, while the final weights and checkpoint are written)
/// finds the run over: the actors are told that training is done, and
/// end, rather than wait for a learner with nothing left to train.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_asked_for_after_the_last_step_ends_the_actors_run() {
    // A network large enough that its final save takes a while (its
    // checkpoint holds Adam's moments too), the window the restart
    // comes in.
    let Job {
        dir,
        config_path,
        address,
        metrics,
        log_path,
        actors,
        ..
    } = Job::start(
        "at-end",
        "checkpoint_every_s = 0.0\nmax_steps = 150",
        "[1024, 1024]",
    )
    .await;
    let mut learner = support::learner_process(&address, &config_path, &metrics, &[]);
    // The report of the last step is written before the final save:
    // looked for every millisecond, so as to signal within the save.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while support::reports(&metrics)
        .last()
        .is_none_or(|report| report.step != 150)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no report of the last step:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    support::signal(learner.id(), "USR1");
    let status = tokio::task::spawn_blocking(move || learner.0.wait().unwrap())
        .await
        .unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "{log}");
    let finished = support::finished_line(&log);
    assert!(finished.contains("ended_by=max_steps"), "{finished}");
    // (Whether the restart came before the end was said: it may come
    // too late, the run's end already told.)
    eprintln!(
        "restart asked for before the end: {}",
        log.contains("training reached max_steps before the restart asked for")
    );
    for actor in actors {
        // Told that training is done, not to reconnect.
        support::finished_actor(actor).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
