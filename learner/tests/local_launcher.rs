//! The binaries as a user runs them: `flgfn-learner --local-actors` with a
//! config file, a metrics file and a step budget.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;

fn learner() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flgfn-learner"))
}

/// Polls `done` every 20 ms until it holds; fails with `why()` after
/// `within_s` seconds.
fn wait_until(within_s: u64, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(within_s);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{}", why());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How `process` exited, which it must within `within_s` seconds.
fn exit_within(
    process: &mut support::KillOnDrop,
    within_s: u64,
    why: &str,
) -> std::process::ExitStatus {
    let mut status = None;
    wait_until(
        within_s,
        || {
            status = process.0.try_wait().unwrap();
            status.is_some()
        },
        || why.to_owned(),
    );
    status.unwrap_or_else(|| unreachable!("waited for"))
}

/// A new scratch folder `flgfn-NAME-PID` holding the tiny task's
/// configuration: the folder and the file.
fn scratch_with_tiny_config(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("flgfn-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tiny.toml");
    std::fs::write(&config, support::TINY_TOML).unwrap();
    (dir, config)
}

/// The run's summary the learner wrote beside `DIR/metrics.jsonl`.
fn run_summary(dir: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("metrics.summary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The launcher starts the actor binary found next to the learner's; cargo
/// builds it only when asked (`cargo build --bins`, as deploy/test.sh does).
fn actor() -> PathBuf {
    learner().with_file_name(format!("flgfn-actor{}", std::env::consts::EXE_SUFFIX))
}

/// The keys every metrics line must carry (the contract).
const REQUIRED_KEYS: [&str; 13] = [
    "step",
    "wall_s",
    "loss",
    "logz_est",
    "logz_exact",
    "marginal_tv",
    "energy_w1",
    "top100_mean_reward",
    "trained_transitions",
    "ingested_transitions",
    "version",
    "actors_connected",
    "mean_policy_lag",
];

#[test]
fn the_local_launcher_trains_with_actor_processes_and_writes_metrics() {
    let dir = std::env::temp_dir().join(format!("flgfn-launcher-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tiny.toml");
    // The actors get the learner's configuration with its flags applied:
    // `--actors 3` corrects this file, which they would refuse on its own.
    let toml = format!("{}\n[launch]\nactors = 0\n", support::TINY_TOML);
    std::fs::write(&config, toml).unwrap();
    let metrics = dir.join("metrics.jsonl");

    assert!(actor().exists(), "deploy/test.sh builds flgfn-actor first");
    // Trains until stopped (Ctrl-C) once every actor has joined: a step
    // budget could run out before an actor slow to start (libtorch loading
    // on a loaded machine) has joined.
    let log_path = dir.join("learner.log");
    // Killed (its actors with it) if the test fails before it ends.
    let mut learner = support::KillOnDrop(
        Command::new(learner())
            // The --seed flag wins over this, for the learner and its actors.
            .env("FLGFN_SEED", "999")
            .args(["--listen", "127.0.0.1:0", "--local-actors", "--actors", "3"])
            .args(["--max-steps", "1000000", "--seed", "40", "--config"])
            .arg(&config)
            .arg("--metrics")
            .arg(&metrics)
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(
        60,
        || {
            read_log().matches("actor joined").count() >= 3
                && std::fs::metadata(&metrics).map_or(0, |m| m.len()) > 0
        },
        || format!("three actors and a report within a minute:\n{}", read_log()),
    );
    support::signal(learner.id(), "INT");
    let status = learner.0.wait().unwrap();
    let log = read_log();
    assert!(status.success(), "learner failed:\n{log}");
    assert!(log.contains("started local actors count=3"), "{log}");
    // Each actor's process id under its name, for the lines naming pids.
    for i in 0..3 {
        let started = log
            .lines()
            .find(|line| {
                line.contains("local actor started") && line.contains(&format!("actor=local-{i} "))
            })
            .unwrap_or_else(|| panic!("{log}"));
        let pid = started
            .split("pid=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next());
        assert!(
            pid.is_some_and(|pid| pid.parse::<u32>().is_ok()),
            "{started}"
        );
    }
    let finished = support::finished_line(&log);
    // Stopped by SIGINT, not at max_steps, and said so.
    assert!(finished.contains("ended_by=stop"), "{finished}");
    // Actors that leave once training is done are no news.
    assert!(!log.contains("exited while training goes on"), "{log}");
    // Three actor processes joined and each saw the end of training.
    assert_eq!(log.matches("actor joined").count(), 3, "{log}");
    assert_eq!(
        log.matches("the learner ended training").count(),
        3,
        "{log}"
    );
    // The learner's --seed reaches its actors: actor i draws from seed
    // 40 + 1 + i.
    for seed in 41..=43 {
        assert!(
            log.contains(&format!("action draws seeded seed={seed}")),
            "no actor drew from seed {seed}:\n{log}"
        );
    }

    let text = std::fs::read_to_string(&metrics).unwrap();
    let reports: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(!reports.is_empty());
    for report in &reports {
        for key in REQUIRED_KEYS {
            assert!(report.get(key).is_some(), "missing {key} in {report}");
        }
    }
    // The last report is the stop's, at its last step, published.
    let last = reports.last().unwrap();
    let steps = last["step"].as_u64().unwrap();
    assert!(steps > 0, "{last}");
    assert_eq!(last["version"], steps);
    assert!(last["trained_transitions"].as_u64().unwrap() >= steps * 64);
    assert!(
        log.contains(&format!("training finished steps={steps} ")),
        "{log}"
    );
    // The summary beside the metrics file, written once every session
    // ended: the final line's figures, the run's accounts closed.
    let summary = run_summary(&dir);
    assert_eq!(summary["ended_by"], "stop", "{summary}");
    assert_eq!(summary["steps"], steps, "{summary}");
    assert!(summary.get("time_to_quality_s").is_some(), "{summary}");
    let count = |value: &serde_json::Value| value.as_u64().unwrap();
    let report = &summary["last_report"];
    // The final line of the metrics file: its training figures are the
    // summary's (its accounts, closed once every session ended, may have
    // grown since), so the words below agree with what the run wrote
    // there, not only with the summary's own copy.
    for key in [
        "step",
        "version",
        "wall_s",
        "at_quality",
        "loss",
        "logz_est",
        "logz_exact",
        "trained_transitions",
    ] {
        assert_eq!(report[key], last[key], "{key}: {summary}");
    }
    // The final line's quality words: reached once, and at the end, as
    // the last report says.
    assert_eq!(summary["at_quality"], report["at_quality"], "{summary}");
    assert_eq!(
        summary["quality_reached"].as_bool(),
        Some(!summary["time_to_quality_s"].is_null()),
        "{summary}"
    );
    assert!(summary["logz_error"].is_f64(), "{summary}");
    assert_eq!(
        summary["late_chunks"],
        report["rejections"]
            .get("shutting_down")
            .cloned()
            .unwrap_or(0.into()),
        "{summary}"
    );
    assert_eq!(summary["refused_calls"], 0, "{summary}");
    // One clock: the run's totals end where its last report does.
    assert_eq!(summary["totals"]["wall_s"], report["wall_s"], "{summary}");
    assert_eq!(
        count(&report["ingested_transitions"]),
        count(&report["trained_transitions"])
            + count(&report["stale_transitions"])
            + count(&summary["untrained_at_stop_transitions"]),
        "{summary}"
    );
    assert!(count(&summary["sessions"]) >= 3, "{summary}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stop for a restart (SIGUSR1) tells the local actors to reconnect, as
/// it tells remote ones; but a learner started again starts its own, so
/// this one then asks them to stop. They exit cleanly, none killed. The
/// learner, stopped before its last step, exits with
/// `learner.unfinished_exit_status` where that is set (as a Kubernetes
/// Job needs).
#[test]
fn a_stop_for_a_restart_ends_the_local_actors_cleanly() {
    let (dir, config) = scratch_with_tiny_config("launcher-restart");
    let log_path = dir.join("learner.log");
    let mut learner = support::KillOnDrop(
        Command::new(learner())
            .env("FLGFN_LEARNER__UNFINISHED_EXIT_STATUS", "75")
            .args(["--listen", "127.0.0.1:0", "--local-actors", "--actors", "2"])
            .args(["--max-steps", "1000000", "--config"])
            .arg(&config)
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(
        60,
        || read_log().matches("actor joined").count() >= 2 && read_log().contains("trained_per_s="),
        || format!("two actors and a report within a minute:\n{}", read_log()),
    );
    support::signal(learner.id(), "USR1");
    let status = exit_within(
        &mut learner,
        60,
        "the learner exits after a stop for a restart",
    );
    let log = read_log();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(
        log.contains("exiting with learner.unfinished_exit_status: stopped before max_steps status=75 ended_by=restart"),
        "{log}"
    );
    let finished = support::finished_line(&log);
    assert!(finished.contains("ended_by=restart"), "{finished}");
    assert_eq!(
        log.matches("the learner stops for a restart; reconnecting")
            .count(),
        2,
        "{log}"
    );
    assert!(log.contains("asking the local actors to stop"), "{log}");
    assert!(!log.contains("killing it"), "{log}");
    assert!(!log.contains("local actor failed"), "{log}");
    assert!(!log.contains("the learner ended training"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_resumed_already_finished_starts_no_actors() {
    let (dir, config) = scratch_with_tiny_config("finished");
    let run = || {
        let output = Command::new(learner())
            .args(["--listen", "127.0.0.1:0", "--local-actors", "--actors", "2"])
            .args(["--max-steps", "30", "--config"])
            .arg(&config)
            .arg("--checkpoint-dir")
            .arg(dir.join("checkpoints"))
            .arg("--metrics")
            .arg(dir.join("metrics.jsonl"))
            // A checkpoint every 10 steps, and a report too, so that the
            // last step's report comes in the loop (see below).
            .env("FLGFN_LEARNER__CHECKPOINT_EVERY_STEPS", "10")
            .env("FLGFN_LEARNER__CHECKPOINT_EVERY_S", "0")
            .env("FLGFN_LEARNER__EVAL_EVERY_STEPS", "10")
            // Finished at max_steps: 0 all the same.
            .env("FLGFN_LEARNER__UNFINISHED_EXIT_STATUS", "75")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "learner failed:\n{log}");
        log
    };
    let first = run();
    assert!(first.contains("started local actors"), "{first}");
    let first_summary = run_summary(&dir);
    // Steps 10, 20 and 30, the last once: the periodic checkpoint due at
    // the last step, whose report has run, is the final one.
    let saved: Vec<&str> = first
        .lines()
        .filter(|l| l.contains("checkpoint saved"))
        .collect();
    assert_eq!(saved.len(), 3, "{first}");
    assert_eq!(
        saved.iter().filter(|l| l.contains("step=30 ")).count(),
        1,
        "{first}"
    );
    assert!(!first.contains("replaced=true"), "{first}");
    // The same command again: the checkpoint says step 30 of 30.
    let second = run();
    assert!(second.contains("this run already finished"), "{second}");
    // Its exit saves step 30 again, and says so.
    assert!(
        second
            .lines()
            .any(|l| l.contains("checkpoint saved") && l.contains("replaced=true")),
        "{second}"
    );
    assert!(second.contains("no local actors started"), "{second}");
    assert!(!second.contains("started local actors"), "{second}");
    assert!(!second.contains("killing it"), "{second}");
    // Its closing line has no evaluation of its own, but the checkpoint's
    // best objects: not a top-100 reward of 0.
    let top100 = |log: &str| -> f64 {
        let finished = log.lines().find(|line| line.contains("training finished"));
        let field = finished.and_then(|line| line.split("top100_mean_reward=").nth(1));
        let value = field.and_then(|rest| rest.split_whitespace().next());
        value
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{log}"))
    };
    assert!(top100(&first) > 0.0, "{first}");
    assert!(top100(&second) > 0.0, "{second}");
    // Its summary's last report is the first run's last, which the
    // metrics file kept (not one of zeros), with this process's counts.
    let second_summary = run_summary(&dir);
    let (earlier, last) = (
        &first_summary["last_report"],
        &second_summary["last_report"],
    );
    for field in [
        "step",
        "wall_s",
        "loss",
        "logz_est",
        "marginal_tv",
        "at_quality",
        "eval_samples",
    ] {
        assert_eq!(last[field], earlier[field], "{field}: {second_summary}");
    }
    assert!(last["eval_samples"].as_u64() > Some(0), "{second_summary}");
    assert_eq!(second_summary["at_quality"], first_summary["at_quality"]);
    assert_eq!(
        second_summary["quality_reached"],
        first_summary["quality_reached"]
    );
    assert_eq!(second_summary["logz_error"], first_summary["logz_error"]);
    assert_eq!(last["ingested_transitions"], 0, "{second_summary}");
    assert_eq!(last["trained_transitions"], earlier["trained_transitions"]);
    assert_eq!(
        last["resumed_trained_transitions"],
        earlier["trained_transitions"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--resume` is answered: the learner resumes by default (clap alone
/// would suggest `--resume-changed`, which waives a check).
#[test]
fn resume_is_said_to_be_the_default() {
    let output = Command::new(learner()).arg("--resume").output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(said.contains("resumes by default"), "{said}");
    assert!(!said.contains("--resume-changed"), "{said}");
}

#[test]
fn a_bad_config_file_fails_with_the_key_named() {
    let dir = std::env::temp_dir().join(format!("flgfn-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[learner]\nlerning_rate = 0.1\n").unwrap();
    for binary in [learner(), actor()] {
        let output = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        // What, where and the key meant, in one line.
        assert!(
            log.lines().any(|line| line.contains("bad.toml: line 2, column 1: unknown field `lerning_rate`; did you mean `learning_rate`?")),
            "{log}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Local actors whose chunks the learner would refuse (more trajectories
/// than `learner.max_chunk_trajectories`), or more of them than its
/// sessions, are not started: the learner stops at once naming the key,
/// instead of starting actors that are each refused; and
/// `--print-config` refuses what such a start refuses.
#[test]
fn local_actors_whose_chunks_would_be_refused_are_not_started() {
    let dir = std::env::temp_dir().join(format!("flgfn-bigchunks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The learner's standard error, started with `actors` local actors,
    // the variables `settings` and checkpoints in `checkpoints` ("":
    // none); it must fail.
    let refused_start_in = |checkpoints: &str, actors: &str, settings: &[[&str; 2]]| {
        let output = Command::new(learner())
            .args([
                "--local-actors",
                "--actors",
                actors,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--checkpoint-dir", checkpoints])
            .envs(settings.iter().map(|[name, value]| (*name, *value)))
            .current_dir(&dir)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{log}");
        assert!(!log.contains("connected to the learner"), "{log}");
        log
    };
    let refused_start =
        |actors: &str, settings: &[[&str; 2]]| refused_start_in("", actors, settings);
    // (256 trajectories per chunk, against 32; `actor.envs = 0` would
    // stay within the 32.)
    let too_large = [
        ["FLGFN_LEARNER__MAX_CHUNK_TRAJECTORIES", "32"],
        ["FLGFN_ACTOR__ENVS", "256"],
    ];
    let log = refused_start("2", &too_large);
    assert!(
        log.contains("local actors' chunks would be refused")
            && log.contains("`actor.envs` is 256")
            && log.contains("learner.max_chunk_trajectories"),
        "{log}"
    );
    let printed = Command::new(learner())
        .args(["--local-actors", "--print-config"])
        .envs(too_large.iter().map(|[name, value]| (*name, *value)))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&printed.stderr);
    assert!(!printed.status.success(), "{stderr}");
    assert!(stderr.contains("`actor.envs` is 256"), "{stderr}");
    let log = refused_start("3", &[["FLGFN_LEARNER__MAX_SESSIONS", "2"]]);
    assert!(
        log.contains("launch.actors") && log.contains("max_sessions (2)"),
        "{log}"
    );
    // Refused so with a checkpoint folder, it leaves none behind (nor a
    // version floor for a version it never published).
    let checkpoints = dir.join("checkpoints");
    let log = refused_start_in(&checkpoints.display().to_string(), "2", &too_large);
    assert!(
        log.contains("local actors' chunks would be refused"),
        "{log}"
    );
    assert!(
        !checkpoints.exists(),
        "{} is left: {log}",
        checkpoints.display()
    );
    let log = refused_start("2", &[["FLGFN_LEARNER__MAX_CONNECTIONS", "1"]]);
    assert!(
        log.contains("launch.actors") && log.contains("max_connections (1)"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Processes whose parent is `pid` (Linux: read from /proc).
#[cfg(target_os = "linux")]
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| proc_stat(child).is_some_and(|(_, parent)| parent == pid))
        .collect()
}

/// A process's state letter and parent, from /proc/PID/stat.
#[cfg(target_os = "linux")]
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

#[cfg(target_os = "linux")]
fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Steps no test waits for.
#[cfg(target_os = "linux")]
const FAR_MORE_STEPS: u64 = 100_000_000;

/// A learner with two local actors, run in `dir` on `config`, training
/// `max_steps` (with [`FAR_MORE_STEPS`], longer than the test), and its
/// actors' process ids once both run.
#[cfg(target_os = "linux")]
fn learner_with_two_actors(
    dir: &std::path::Path,
    config: &std::path::Path,
    max_steps: u64,
) -> (support::KillOnDrop, Vec<u32>) {
    let learner = Command::new(learner())
        .args(["--listen", "127.0.0.1:0", "--local-actors", "--actors", "2"])
        .arg("--max-steps")
        .arg(max_steps.to_string())
        .arg("--metrics")
        .arg(dir.join("metrics.jsonl"))
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("learner.log")).unwrap())
        .spawn()
        .map(support::KillOnDrop)
        .unwrap();
    let mut actors = Vec::new();
    wait_until(
        30,
        || {
            actors = children_of(learner.id());
            actors.len() == 2
        },
        || "no actors".to_owned(),
    );
    (learner, actors)
}

/// Kills, when dropped, those of these processes still running.
#[cfg(target_os = "linux")]
struct KillRemaining(Vec<u32>);

#[cfg(target_os = "linux")]
impl Drop for KillRemaining {
    fn drop(&mut self) {
        for &pid in self.0.iter().filter(|&&pid| running(pid)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Every local actor gone while training goes on: the learner stops with
/// an error saying so, instead of waiting for data for ever.
#[cfg(target_os = "linux")]
#[test]
fn a_learner_whose_local_actors_all_died_stops_with_an_error() {
    let (dir, config) = scratch_with_tiny_config("actors-died");
    let (mut learner, actors) = learner_with_two_actors(&dir, &config, FAR_MORE_STEPS);
    std::thread::sleep(std::time::Duration::from_millis(500));
    for pid in actors {
        support::signal(pid, "KILL");
    }
    let status = exit_within(&mut learner, 60, "the learner went on without actors");
    let log = std::fs::read_to_string(dir.join("learner.log")).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(
            "error: training stopped: every local actor exited before training finished (2 with an error"
        ),
        "{log}"
    );
    assert_eq!(
        log.matches("a local actor exited while training goes on")
            .count(),
        2,
        "{log}"
    );
    // Each named as its other lines are.
    for name in ["local-0", "local-1"] {
        assert!(
            log.lines().any(
                |line| line.contains("a local actor exited while training goes on")
                    && line.contains(&format!("actor={name}"))
            ),
            "{name}: {log}"
        );
    }
    // Each exit once: not again when the learner reaps them.
    assert!(!log.contains("local actor failed"), "{log}");
    // The run's summary names the error, its accounts closed all the same.
    let summary = run_summary(&dir);
    assert_eq!(summary["ended_by"], "error", "{summary}");
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("training stopped: every local actor exited"),
        "{summary}"
    );
    assert!(log.contains(error), "{log}");
    assert!(
        summary["steps"].is_u64() && summary["last_report"].is_object(),
        "{summary}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A local actor that fails while another trains on: the run goes to its
/// end, then exits 1 saying so, its figures logged and its summary naming
/// the error.
#[cfg(target_os = "linux")]
#[test]
fn a_run_with_a_failed_local_actor_finishes_and_fails() {
    let (dir, config) = scratch_with_tiny_config("actor-failed");
    let steps = 200;
    let (mut learner, actors) = learner_with_two_actors(&dir, &config, steps);
    support::signal(actors[0], "KILL");
    let status = exit_within(&mut learner, 120, "the learner did not finish");
    let log = std::fs::read_to_string(dir.join("learner.log")).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("error: 1 local actor(s) failed"), "{log}");
    assert!(log.contains("training finished"), "{log}");
    let summary = run_summary(&dir);
    assert_eq!(summary["ended_by"], "error", "{summary}");
    assert_eq!(summary["error"], "1 local actor(s) failed", "{summary}");
    assert_eq!(summary["steps"], steps, "{summary}");
    assert_eq!(summary["failed_local_actors"], 1, "{summary}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner killed outright (no Drop, no signal handler runs) takes its
/// local actors along: they get a signal from the kernel (once per thread
/// of the learner) and take it as one stop, not as the second signal that
/// skips the graceful stop.
#[cfg(target_os = "linux")]
#[test]
fn local_actors_exit_when_their_learner_is_killed() {
    let (dir, config) = scratch_with_tiny_config("learner-killed");
    // An earlier run's summary: taken out of the way as the run starts, so
    // that a learner killed leaves none to be read as its own.
    std::fs::write(dir.join("metrics.summary.json"), "{}").unwrap();
    let (mut learner, actors) = learner_with_two_actors(&dir, &config, FAR_MORE_STEPS);
    // Should the test fail, the actors it left must not run on.
    let _cleanup = KillRemaining(actors.clone());
    let log = || std::fs::read_to_string(dir.join("learner.log")).unwrap();
    // Both listening for signals: connected.
    wait_until(
        30,
        || log().matches("connected to the learner").count() >= 2,
        log,
    );
    support::signal(learner.id(), "KILL");
    learner.0.wait().unwrap();
    wait_until(
        30,
        || !actors.iter().any(|&pid| running(pid)),
        || format!("actors outlived their learner: {actors:?}"),
    );
    let log = log();
    assert_eq!(
        log.matches("the parent process is gone: stopping").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("a second stop signal"), "{log}");
    assert!(!dir.join("metrics.summary.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On a terminal the learner keeps a live progress line at the bottom;
/// its local actors' log lines go above it, as its own do, not onto it.
#[cfg(target_os = "linux")]
#[test]
fn local_actors_log_above_the_live_line() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (dir, config) = scratch_with_tiny_config("live-line");
    let (mut controller, mut terminal) = (0, 0);
    // A terminal's size: without one the live line has no width.
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 200,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors through the first two
    // pointers and reads the size; the name and settings may be null.
    #[allow(unsafe_code)]
    let opened = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(opened, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both were just opened, and are owned here alone.
    #[allow(unsafe_code)]
    let (controller, terminal) = unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    };
    let mut learner = Command::new(learner())
        .args(["--listen", "127.0.0.1:0", "--local-actors", "--actors", "2"])
        .args(["--max-steps", "400", "--checkpoint-dir", "", "--config"])
        .arg(&config)
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(terminal))
        .spawn()
        .map(support::KillOnDrop)
        .unwrap();
    // Read as it comes (a terminal holds little), until every writer has
    // closed it (then the read fails).
    let screen = std::thread::spawn(move || {
        let mut from = std::fs::File::from(controller);
        let (mut seen, mut buffer) = (Vec::new(), [0u8; 4096]);
        while let Ok(read @ 1..) = from.read(&mut buffer) {
            seen.extend_from_slice(&buffer[..read]);
        }
        seen
    });
    assert!(exit_within(&mut learner, 120, "the learner did not finish").success());
    let screen = String::from_utf8_lossy(&screen.join().unwrap()).into_owned();
    assert!(screen.contains("transitions/s"), "no live line:\n{screen}");
    // What is left of a line once a carriage return has gone back over it
    // (the terminal ends each line with one, before its newline).
    let shown = |line: &str| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        line.rsplit('\r').next().unwrap_or_default().to_owned()
    };
    let actor_lines: Vec<String> = screen
        .split('\n')
        .filter(|line| line.contains("connected to the learner"))
        .map(shown)
        .collect();
    assert_eq!(actor_lines.len(), 2, "{screen}");
    for line in &actor_lines {
        assert!(
            !line.contains("transitions/s"),
            "onto the live line: {line:?}"
        );
        // In colour, as the learner's own lines on a terminal (green
        // INFO; not the code that clears the live line first).
        assert!(line.contains("\u{1b}[32m INFO"), "no colours: {line:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
