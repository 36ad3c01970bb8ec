//! What an operator sees: configuration from the environment and its
//! precedence, JSON and plain-text logs, the health probe. Real processes.
#![allow(clippy::unwrap_used)]

mod support;

use support::signal;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn learner_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flgfn-learner"))
}

/// A binary of the actor crate, built next to the learner (deploy/test.sh
/// builds every binary first).
fn sibling(name: &str) -> PathBuf {
    learner_binary().with_file_name(name)
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flgfn-ops-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny task, `max_steps` steps, no checkpoints.
fn tiny_config_file(dir: &Path, max_steps: u64) -> PathBuf {
    let path = dir.join("config.toml");
    let text = support::TINY_TOML.replace(
        "[learner]\n",
        &format!("[learner]\nmax_steps = {max_steps}\n"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A clean environment for a child: no FLGFN_ or RUST_LOG variables of
/// the test's own.
fn command(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    for (name, _) in std::env::vars_os() {
        if flgfn_common::config::is_flgfn_variable(&name)
            || name == "RUST_LOG"
            || name == "NO_COLOR"
            || name == "CLICOLOR_FORCE"
        {
            command.env_remove(name);
        }
    }
    command
}

fn print_config(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> (String, toml::Table) {
    let output = command(binary)
        .args(args)
        .arg("--print-config")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = toml::from_str(&text).unwrap();
    (text, table)
}

/// `--resume-changed` is also `FLGFN_RESUME_CHANGED` (containers pass
/// no flags), where 0 (or nothing) means off: only a true one contradicts
/// `--fresh`, and a value that is neither is refused, not taken as on.
#[test]
fn resume_changed_contradicts_fresh_only_when_on() {
    for off in ["0", "", "false"] {
        print_config(
            &learner_binary(),
            &["--fresh"],
            &[("FLGFN_RESUME_CHANGED", off)],
        );
    }
    let output = command(&learner_binary())
        .arg("--print-config")
        .env("FLGFN_RESUME_CHANGED", "ture")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("FLGFN_RESUME_CHANGED takes"), "{stderr}");
    print_config(&learner_binary(), &[], &[("FLGFN_RESUME_CHANGED", "1")]);
    for (args, env) in [
        (&["--fresh", "--resume-changed"][..], &[][..]),
        (&["--fresh"][..], &[("FLGFN_RESUME_CHANGED", "1")][..]),
    ] {
        let output = command(&learner_binary())
            .args(args)
            .arg("--print-config")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} {env:?}");
        assert!(stderr.contains("--fresh and --resume-changed"), "{stderr}");
    }
}

/// `--fresh` with checkpoints off deletes nothing and says so; the run
/// goes on.
#[test]
fn fresh_without_checkpoints_says_it_has_nothing_to_delete() {
    let dir = scratch("fresh-without-checkpoints");
    let log = String::from_utf8(training_log(&dir, &[], &["--fresh"])).unwrap();
    assert!(
        log.contains("--fresh has nothing to delete: checkpoints are off"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--fresh` over a run's checkpoints deletes them with a warning that
/// says how far that run got, and whether its final weights went too.
#[test]
fn fresh_over_a_run_warns_what_it_deleted() {
    let dir = scratch("fresh-over-a-run");
    let checkpoints = dir.join("checkpoints");
    let folder = ["--checkpoint-dir", checkpoints.to_str().unwrap()];
    let first = String::from_utf8(training_log(&dir, &[], &folder)).unwrap();
    assert!(!first.contains("started fresh"), "{first}");
    assert!(checkpoints.join("final.safetensors").exists());
    let mut fresh = folder.to_vec();
    fresh.push("--fresh");
    let log = String::from_utf8(training_log(&dir, &[], &fresh)).unwrap();
    let line = log
        .lines()
        .find(|line| line.contains("started fresh: deleting the earlier run's checkpoints"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(" WARN ")
            && line.contains("deleted_checkpoints=1")
            && line.contains("newest_step=40")
            && line.contains("final_weights=true"),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bad value from a variable is blamed on the variable, which the user
/// set, not on the flag it stands for, which clap alone would name; one
/// typed on the command line is still clap's to report.
#[test]
fn a_bad_value_from_a_variable_names_the_variable() {
    let refused = |args: &[&str], env: &[(&str, &str)]| {
        let output = command(&learner_binary())
            .args(args)
            .arg("--print-config")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let said = refused(&[], &[("FLGFN_LOG_FORMAT", "xml")]);
    assert!(
        said.contains("FLGFN_LOG_FORMAT=xml") && said.contains("possible values: text, json"),
        "{said}"
    );
    let said = refused(&[], &[("FLGFN_CONFIG", "")]);
    assert!(said.contains("FLGFN_CONFIG is set but empty"), "{said}");
    let said = refused(&[], &[("FLGFN_RESUME_CHANGED", "maybe")]);
    assert!(
        said.contains("FLGFN_RESUME_CHANGED=maybe")
            && said.contains("takes 1, true, yes, on, y or t"),
        "{said}"
    );
    let said = refused(&["--log-format", "xml"], &[("FLGFN_LOG_FORMAT", "json")]);
    assert!(
        said.contains("'--log-format <LOG_FORMAT>'") && !said.contains("FLGFN_LOG_FORMAT="),
        "{said}"
    );
}

/// A variable that is not UTF-8 stops nothing unless it is an `FLGFN_`
/// configuration key (`FLGFN_SEED`, `FLGFN_<SECTION>__<KEY>`), which is an
/// error naming it (`std::env::vars()` would panic on either); a path in
/// `FLGFN_CONFIG` may be in any encoding.
#[cfg(unix)]
#[test]
fn only_flgfn_variables_must_be_utf8() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let latin1 = OsString::from_vec(b"caf\xe9".to_vec());
    for name in ["flgfn-learner", "flgfn-actor"] {
        // `--print-config` with one variable set: stdout, or stderr and
        // the exit code.
        let print_config = |variable: &str, value: &OsString| {
            let output = command(&sibling(name))
                .arg("--print-config")
                .env(variable, value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            match output.status.code() {
                Some(0) => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
                code => Err((code, stderr)),
            }
        };
        print_config("LC_FOREIGN_NAME", &latin1).unwrap();
        let (code, stderr) = print_config("FLGFN_SEED", &latin1).unwrap_err();
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(stderr.contains("FLGFN_SEED"), "{name}: {stderr}");
        assert!(stderr.contains("not UTF-8"), "{name}: {stderr}");

        // FLGFN_CONFIG is a path, which may be in any encoding.
        let folder = scratch(&format!("latin1-config-{name}"));
        let mut path = folder.as_os_str().to_owned();
        path.push("/");
        path.push(&latin1);
        std::fs::write(&path, "seed = 5\n").unwrap();
        let stdout = print_config("FLGFN_CONFIG", &path).unwrap();
        assert!(stdout.contains("seed = 5"), "{name}: {stdout}");
        std::fs::remove_dir_all(&folder).unwrap();
    }
}

// The build scripts' own git calls, so that this test reads the commit as
// they do.
include!("../../common/build_support/git.rs");

/// This checkout's commit as the build script abbreviates it, and whether
/// any file differs from it; `None` where the build did not take it from
/// git (`FLGFN_BUILD_COMMIT`, no checkout of its own).
fn checkout_commit() -> Option<(String, bool)> {
    if std::env::var_os("FLGFN_BUILD_COMMIT").is_some_and(|commit| !commit.is_empty()) {
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let commit = own_commit(&root)?;
    let changes = git_in(
        &root,
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=normal",
        ],
    )?;
    Some((commit, !changes.is_empty()))
}

#[test]
fn every_binary_names_itself_and_its_build_in_its_version_and_usage() {
    let commit = checkout_commit();
    for name in [
        "flgfn-learner",
        "flgfn-actor",
        "flgfn-loadgen",
        "flgfn-health",
        "flgfn-sample",
        "flgfn-experiment",
    ] {
        let binary = sibling(name);
        let version = command(&binary).arg("--version").output().unwrap();
        assert!(version.status.success(), "{name} --version");
        let version = String::from_utf8(version.stdout).unwrap();
        let version = version.trim();
        let prefix = format!("{name} {} (commit ", env!("CARGO_PKG_VERSION"));
        assert!(version.starts_with(&prefix), "{name} --version: {version}");
        match &commit {
            // A clean checkout (CI's): exactly its commit, unmarked.
            Some((commit, false)) => assert_eq!(version, format!("{prefix}{commit})")),
            // Changed files: the commit the changes are on (marked
            // "modified" where they touch this binary's own code).
            Some((commit, true)) => assert!(
                version.starts_with(&format!("{prefix}{commit}")),
                "{name} --version: {version}"
            ),
            None => {}
        }
        let help = command(&binary).arg("--help").output().unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        assert!(
            help.contains(&format!("Usage: {name} ")),
            "{name} --help: {help}"
        );
    }
}

/// A load generator of no actors would run for ever doing nothing.
#[test]
fn a_load_generator_needs_an_actor() {
    let output = command(&sibling("flgfn-loadgen"))
        .args(["--actors", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--actors"), "{stderr}");

    // One that cannot reach its learner fails, and its closing summary
    // shows at the default log levels (it was filtered out).
    let output = command(&sibling("flgfn-loadgen"))
        .args(["--learner", "http://127.0.0.1:1", "--actors", "1"])
        .env("FLGFN_ACTOR__RECONNECT_ATTEMPTS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("load generator stopped"), "{stderr}");
}

fn key<'a>(table: &'a toml::Table, section: &str, name: &str) -> &'a toml::Value {
    &table[section].as_table().unwrap()[name]
}

#[test]
fn the_environment_overrides_the_file_and_flags_override_both() {
    let dir = scratch("precedence");
    let config = tiny_config_file(&dir, 40);
    let config_arg = config.to_str().unwrap();
    let env = [
        ("FLGFN_LEARNER__MAX_STEPS", "50"),
        ("FLGFN_LEARNER__LISTEN", "127.0.0.1:6123"),
        ("FLGFN_MODEL__HIDDEN", "[16, 8]"),
        ("FLGFN_ACTOR__LEARNER", "http://learner.internal:6123"),
    ];
    let (text, table) = print_config(
        &learner_binary(),
        &["--config", config_arg, "--max-steps", "60"],
        &env,
    );
    assert_eq!(
        key(&table, "learner", "max_steps").as_integer(),
        Some(60),
        "flag over environment"
    );
    assert_eq!(
        key(&table, "learner", "listen").as_str(),
        Some("127.0.0.1:6123")
    );
    assert_eq!(
        key(&table, "model", "hidden").as_array().unwrap(),
        &vec![toml::Value::Integer(16), toml::Value::Integer(8)],
        "environment over file"
    );
    assert_eq!(
        key(&table, "actor", "envs").as_integer(),
        Some(8),
        "the file's keys stay"
    );
    for named in [
        config_arg,
        "FLGFN_LEARNER__MAX_STEPS",
        "FLGFN_MODEL__HIDDEN",
        "--max-steps",
    ] {
        assert!(
            text.contains(named),
            "the layers are printed: {named} missing from\n{text}"
        );
    }

    // The actor reads the same variables, and FLGFN_CONFIG names the file.
    let mut actor_env = env.to_vec();
    actor_env.push(("FLGFN_CONFIG", config_arg));
    let (_, table) = print_config(&sibling("flgfn-actor"), &["--envs", "4"], &actor_env);
    assert_eq!(
        key(&table, "actor", "learner").as_str(),
        Some("http://learner.internal:6123")
    );
    assert_eq!(key(&table, "actor", "envs").as_integer(), Some(4));
    assert_eq!(key(&table, "learner", "max_steps").as_integer(), Some(50));

    // A misspelt variable is an error that names it.
    let output = command(&learner_binary())
        .args(["--config", config_arg, "--print-config"])
        .env("FLGFN_LEARNER__MAX_STEP", "5")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("FLGFN_LEARNER__MAX_STEP"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner with one local actor on `config`, its stderr written to
/// `log`.
fn one_actor_job(config: &Path, log: &Path) -> Command {
    let mut job = command(&learner_binary());
    job.args([
        "--listen",
        "127.0.0.1:0",
        "--local-actors",
        "--actors",
        "1",
        "--config",
    ])
    .arg(config)
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(log).unwrap());
    job
}

/// An actor process on `config` for the learner on `port`, its stderr
/// written to `log`, once it has connected.
fn connected_actor(port: u16, config: &Path, log: &Path) -> support::KillOnDrop {
    let url = format!("http://127.0.0.1:{port}");
    let actor = spawn_logging(
        &sibling("flgfn-actor"),
        &["--learner", &url],
        config,
        &[],
        log,
    );
    wait_for_log(log, "connected to the learner");
    actor
}

/// `binary` with `args`, `--config config` and `env` in a clean
/// environment ([`command`]), its log (stderr) in `log`; killed when
/// dropped.
fn spawn_logging(
    binary: &Path,
    args: &[&str],
    config: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> support::KillOnDrop {
    support::KillOnDrop(
        command(binary)
            .args(args)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// In `dir`: a learner process on a free port training the tiny task until
/// stopped, and an actor process for it with `actor_env`, logging to the
/// returned path; both killed when dropped.
fn learner_and_actor(
    dir: &Path,
    actor_env: &[(&str, &str)],
) -> (support::KillOnDrop, support::KillOnDrop, PathBuf) {
    let config = tiny_config_file(dir, 0);
    let port = free_port();
    let metrics = dir.join("metrics.jsonl");
    let learner = support::learner_process(&format!("127.0.0.1:{port}"), &config, &metrics, &[]);
    let actor_log = dir.join("actor.log");
    let actor = spawn_logging(
        &sibling("flgfn-actor"),
        &["--learner", &format!("http://127.0.0.1:{port}")],
        &config,
        actor_env,
        &actor_log,
    );
    (learner, actor, actor_log)
}

/// Waits up to a minute for `text` to appear in the file `log` (which
/// may not exist yet).
fn wait_for_log(log: &Path, text: &str) {
    wait_for_more_in_log(log, text, 0);
}

/// How many times `text` appears in `log` now (0 while it does not exist).
fn count_in_log(log: &Path, text: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(text)
        .count()
}

/// Waits (at most a minute) until `text` appears in `log` more than `seen`
/// times; returns how many times it does.
fn wait_for_more_in_log(log: &Path, text: &str, seen: usize) -> usize {
    let started = Instant::now();
    loop {
        let count = count_in_log(log, text);
        if count > seen {
            return count;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`{text}` in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a short training job (learner and one local actor) with `env`,
/// its stderr written to a file, and returns that file's bytes.
fn training_log(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Vec<u8> {
    let config = tiny_config_file(dir, 40);
    let log = dir.join("stderr.log");
    let status = one_actor_job(&config, &log)
        .envs(env.iter().copied())
        .args(args)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(&log).unwrap()
}

#[test]
fn json_logs_carry_span_fields_and_a_log_file_has_no_colour_codes() {
    let dir = scratch("logs");
    // A filter that does not parse: the defaults, and a warning saying so.
    let text = training_log(&dir, &[("RUST_LOG", "flgfn_learner=loud")], &[]);
    assert!(text.len() > 200, "the job logged");
    assert!(
        String::from_utf8_lossy(&text).contains("RUST_LOG is not a valid filter"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    assert!(!text.contains(&0x1b), "no escape codes in a file");
    let plain = String::from_utf8_lossy(&text);
    assert!(
        !plain.contains("transitions/s in"),
        "no live progress line in a file"
    );
    assert!(
        plain.contains("step="),
        "the periodic report lines are there"
    );

    // By flag: the local actors log in the learner's format too (every
    // line below is JSON, theirs among them).
    let metrics = dir.join("run.jsonl");
    let metrics = metrics.to_str().unwrap();
    let json = training_log(
        &dir,
        &[("RUST_LOG", "info,flgfn_learner::session=debug")],
        &["--log-format", "json", "--metrics", metrics],
    );
    let text = String::from_utf8(json).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    // The span fields as the events carry them: the innermost span in
    // "span", all of them in "spans".
    let spans_of = |event: &serde_json::Value, name: &str| -> Option<serde_json::Value> {
        event["spans"]
            .as_array()?
            .iter()
            .find(|span| span["name"] == name)
            .cloned()
    };
    let actor_events: Vec<_> = lines.iter().filter_map(|e| spans_of(e, "actor")).collect();
    assert!(
        actor_events
            .iter()
            .any(|span| span["actor_id"].is_u64() && span["policy_version"].is_u64()),
        "an actor event with its actor id and policy version: {actor_events:?}"
    );
    let session_events: Vec<_> = lines
        .iter()
        .filter_map(|e| spans_of(e, "session"))
        .collect();
    assert!(
        session_events.iter().any(|span| span["actor_id"].is_u64()
            && span["peer"].is_string()
            && span["actor"] == "local-0"),
        "a learner session event with actor id, name and peer: {session_events:?}"
    );
    let message_is =
        |event: &&serde_json::Value, message: &str| event["fields"]["message"] == message;
    let ended = lines
        .iter()
        .find(|e| message_is(e, "session ended"))
        .unwrap_or_else(|| panic!("a `session ended` line: {text}"));
    assert!(ended["fields"]["ended_by"].is_string(), "{ended}");
    assert!(ended["fields"]["chunks"].as_u64() > Some(0), "{ended}");
    // What an operator checks first: how actors reach it.
    let listening = lines
        .iter()
        .find(|e| message_is(e, "learner listening"))
        .unwrap_or_else(|| panic!("a `learner listening` line: {text}"));
    assert_eq!(
        listening["fields"]["transport"], "plain text",
        "{listening}"
    );
    assert_eq!(listening["fields"]["auth"], "none", "{listening}");
    // (The job file says checkpoint_dir = "".)
    assert_eq!(listening["fields"]["checkpoints"], "off", "{listening}");
    // Where the figures go, and how long the run is.
    assert_eq!(listening["fields"]["metrics"], metrics, "{listening}");
    let summary = std::fs::canonicalize(&dir)
        .unwrap()
        .join("run.summary.json");
    assert_eq!(
        listening["fields"]["summary"],
        summary.to_str().unwrap(),
        "{listening}"
    );
    assert!(summary.exists(), "{listening}");
    assert_eq!(listening["fields"]["max_steps"], 40, "{listening}");
    // One key per field: a field named `message` beside the event's own
    // (the actor's reconnect warning had one) would make two.
    for line in text.lines() {
        assert!(
            line.matches("\"message\":").count() <= 1,
            "two messages: {line}"
        );
    }
    // The summary's values known or not: numbers, or left out.
    let finished = lines
        .iter()
        .find(|e| message_is(e, "training finished"))
        .unwrap_or_else(|| panic!("a `training finished` line: {text}"));
    let fields = &finished["fields"];
    assert!(fields["logz_error"].is_f64(), "{finished}");
    for optional in ["time_to_quality_s", "marginal_tv", "energy_w1"] {
        assert!(
            fields[optional].is_null() || fields[optional].is_f64(),
            "{optional}: {finished}"
        );
    }
    assert!(fields["skipped_batches"].is_u64(), "{finished}");
    assert!(fields["at_quality"].is_boolean(), "{finished}");
    assert_eq!(fields["refused_calls"], 0, "{finished}");
    assert_eq!(fields["ended_by"], "max_steps", "{finished}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With JSON logs, the error a binary exits with is a JSON line too.
#[test]
fn json_logs_end_with_the_error_as_json() {
    // A learner that fails at once (no such configuration file): stderr.
    let failing = |env: &[(&str, &str)]| {
        let output = command(&learner_binary())
            .args(["--config", "/nonexistent/flgfn.toml"])
            .env("FLGFN_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8(output.stderr).unwrap()
    };
    let stderr = failing(&[]);
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    let error = last["fields"]["error"].as_str().unwrap();
    assert!(error.contains("/nonexistent/flgfn.toml"), "{error}");
    // Logs filtered to nothing still show why the binary failed.
    let stderr = failing(&[("RUST_LOG", "off")]);
    assert!(
        stderr.contains("flgfn-learner: error:") && stderr.contains("/nonexistent/flgfn.toml"),
        "{stderr}"
    );
}

/// A learner nobody feeds says so, and names what it refused: an actor
/// with a wrong token is refused (logged, without either token), and after
/// 10 s without a batch the learner warns, with the refusals by reason.
#[test]
fn a_learner_nobody_feeds_says_so_and_names_its_refusals() {
    const LEARNER_SECRET: &str = "the-learner-secret-0123456789";
    const ACTOR_SECRET: &str = "an-actor-with-another-secret";
    let dir = scratch("unfed");
    let config = tiny_config_file(&dir, 0);
    let port = free_port();
    let learner_log = dir.join("learner.log");
    let _learner = spawn_logging(
        &learner_binary(),
        &["--listen", &format!("127.0.0.1:{port}")],
        &config,
        &[("FLGFN_TOKEN", LEARNER_SECRET)],
        &learner_log,
    );
    wait_for_log(&learner_log, "learner listening");
    let refused = command(&sibling("flgfn-actor"))
        .args(["--learner", &format!("http://127.0.0.1:{port}")])
        .arg("--config")
        .arg(&config)
        .env("FLGFN_TOKEN", ACTOR_SECRET)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a wrong token is refused for good"
    );
    // The actor is told where the token comes from, not only the wire form.
    let actor_error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        actor_error.contains("missing or wrong token")
            && actor_error.contains("FLGFN_TOKEN or auth.token_file")
            && !actor_error.contains(ACTOR_SECRET),
        "{actor_error}"
    );
    wait_for_log(&learner_log, "refused a call with a wrong token");
    // The first warning comes 10 s after the start, the next 20 s after
    // it: on a loaded machine the refusal may come after the first.
    const WAITING: &str = "waiting for training data";
    let mut seen = wait_for_more_in_log(&learner_log, WAITING, 0);
    let last_warning = || {
        let log = std::fs::read_to_string(&learner_log).unwrap();
        let last = log.lines().rev().find(|line| line.contains(WAITING));
        last.unwrap().to_owned()
    };
    if !last_warning().contains("\"unauthenticated\"") {
        seen = wait_for_more_in_log(&learner_log, WAITING, seen);
    }
    let warning = last_warning();
    assert!(
        warning.contains("WARN")
            && warning.contains("actors_connected=0")
            && warning.contains("\"unauthenticated\""),
        "warning {seen}: {warning}"
    );
    let log = std::fs::read_to_string(&learner_log).unwrap();
    assert!(
        !log.contains(LEARNER_SECRET) && !log.contains(ACTOR_SECRET),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An actor logs every `actor.progress_log_s` that it is rolling out, its
/// chunks sent growing while it trains.
#[test]
fn an_actor_logs_its_progress_while_it_rolls_out() {
    let dir = scratch("progress");
    let (_learner, _actor, log) = learner_and_actor(&dir, &[("FLGFN_ACTOR__PROGRESS_LOG_S", "1")]);
    // Each line's chunks sent. The clock starts with the actor and skips
    // the ticks it missed, so where the learner took a while to come up,
    // a line may come just after the connection, before any chunk, and
    // the next one moments later: the lines compared are the first with
    // chunks sent and the one after it.
    let chunks_sent = |text: &str| -> Vec<u64> {
        text.lines()
            .filter(|line| line.contains("rolling out"))
            .map(|line| {
                let value = line
                    .split("chunks_sent=")
                    .nth(1)
                    .unwrap_or_else(|| panic!("{line}"));
                value.split(' ').next().unwrap().parse().unwrap()
            })
            .collect()
    };
    let mut seen = 0;
    let (text, counts) = loop {
        seen = wait_for_more_in_log(&log, "rolling out", seen);
        let text = std::fs::read_to_string(&log).unwrap();
        let counts = chunks_sent(&text);
        let first_with_chunks = counts.iter().position(|&sent| sent > 0);
        if first_with_chunks.is_some_and(|first| counts.len() > first + 1) {
            break (text, counts);
        }
    };
    let first = counts.iter().position(|&sent| sent > 0).unwrap();
    assert!(counts[first + 1] > counts[first], "{counts:?}: {text}");
    assert!(text.contains("policy_version="), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A loopback port nobody listens on right now (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the probe said healthy, and what it printed (stdout, or
/// stderr when it failed). It exits 0 or 1, never anything else (a crash
/// is not an answer).
fn probe(address: &str) -> (bool, String) {
    let output = command(&sibling("flgfn-health"))
        .args(["--address", address, "--timeout-s", "5"])
        .output()
        .unwrap();
    let code = output.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "{code:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = if code == Some(0) || !output.stdout.is_empty() {
        &output.stdout
    } else {
        &output.stderr
    };
    (
        code == Some(0),
        String::from_utf8_lossy(said).trim().to_owned(),
    )
}

#[test]
fn the_health_probe_says_serving_only_while_a_learner_serves() {
    let dir = scratch("health");
    let config = tiny_config_file(&dir, 0);
    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    let (up, said) = probe(&address);
    assert!(!up, "nothing listens yet");
    // Why, once: transport errors repeat their cause's text.
    assert!(said.contains("Connection refused"), "{said}");
    assert_eq!(said.matches("tcp connect error").count(), 1, "{said}");
    let learner = support::learner_process(
        &format!("127.0.0.1:{port}"),
        &config,
        &dir.join("metrics.jsonl"),
        &[],
    );
    let started = Instant::now();
    loop {
        let (up, said) = probe(&address);
        if up {
            assert_eq!(said, "SERVING");
            // A bare HOST:PORT is http://.
            assert_eq!(
                probe(&format!("127.0.0.1:{port}")),
                (true, "SERVING".to_owned())
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the learner came up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(learner);
    let (up, _) = probe(&address);
    assert!(!up, "a killed learner is not healthy");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `flgfn-sample` with `args`; its output and status.
fn sample(args: &[&str]) -> std::process::Output {
    command(&PathBuf::from(env!("CARGO_BIN_EXE_flgfn-sample")))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `flgfn-sample` with `args`, which it must refuse; what it said.
fn sample_refused(args: &[&str]) -> String {
    let output = sample(args);
    assert!(!output.status.success(), "{output:?}");
    String::from_utf8(output.stderr).unwrap()
}

#[test]
fn samples_from_final_weights_or_a_checkpoint_carry_their_true_energies() {
    let dir = scratch("samples");
    let config = tiny_config_file(&dir, 40);
    let checkpoints = dir.join("checkpoints");
    let status = command(&learner_binary())
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--local-actors", "--actors", "1"])
        .args(["--checkpoint-dir", checkpoints.to_str().unwrap()])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let config = config.to_str().unwrap();
    // `n` samples of the weights file `weights`, under the run's config.
    let sample_weights = |weights: &Path, n: &str| {
        sample(&[
            "--config",
            config,
            "--weights",
            weights.to_str().unwrap(),
            "-n",
            n,
        ])
    };

    // From the final weights, as JSON lines: more than one batch of
    // 1,024, numbered on across batches.
    let final_weights = checkpoints.join("final.safetensors");
    let output = sample_weights(&final_weights, "2500");
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2500);
    // The tiny task: 4 of 8 elements, element u at level u % 4. Energies
    // recomputed here, from the actions.
    let levels = [-0.8, -0.1, 0.4, 1.2];
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        let actions: Vec<usize> = serde_json::from_value(line["actions"].clone()).unwrap();
        let state: Vec<i8> = serde_json::from_value(line["state"].clone()).unwrap();
        assert_eq!(actions.len(), 4, "a finished set has 4 elements");
        for (u, &member) in state.iter().enumerate() {
            assert_eq!(member != 0, actions.contains(&u), "{line}");
        }
        let energy: f64 = actions.iter().map(|&u| levels[u % 4]).sum();
        let written = line["energy"].as_f64().unwrap();
        assert!((written - energy).abs() < 1e-9, "{written} vs {energy}");
        assert_eq!(line["log_reward"].as_f64().unwrap(), -written);
    }

    // Every read of the checkpoint folder below starts so.
    let from_checkpoints = [
        "--config",
        config,
        "--checkpoint",
        checkpoints.to_str().unwrap(),
    ];
    // From the checkpoint directory, as CSV (by the file's extension,
    // in either case), into a folder made for it.
    let csv = dir.join("made").join("samples.CSV");
    let output = sample(
        &[
            &from_checkpoints[..],
            &["-n", "50", "--out", csv.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(output.status.success(), "{output:?}");
    // Which checkpoint it read, since the newest may not read back.
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("sampling from a checkpoint") && said.contains("ckpt-"),
        "{said}"
    );
    // And where they went.
    assert!(
        said.contains("samples written") && said.contains("samples.CSV"),
        "{said}"
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "index,energy,log_reward,state,actions");
    assert_eq!(rows.len(), 51);
    assert_eq!(rows[1].split(',').count(), 5);
    // A checkpoint folder that is not there is named as such.
    let missing = dir.join("no-such-folder");
    let message = sample_refused(&[
        "--config",
        config,
        "--checkpoint",
        missing.to_str().unwrap(),
    ]);
    assert!(message.contains("no such folder"), "{message}");
    // An extension that names neither format is refused, before anything
    // is written, not written as JSON lines under its name; nor .json
    // (JSON lines are no JSON document).
    for (name, said) in [
        ("samples.parquet", ".parquet names neither format"),
        ("samples.json", "name it .jsonl"),
    ] {
        let out = dir.join(name);
        let message =
            sample_refused(&[&from_checkpoints[..], &["--out", out.to_str().unwrap()]].concat());
        assert!(
            message.contains(said) && message.contains("--format"),
            "{message}"
        );
        assert!(!out.exists());
    }
    // A --format that the name contradicts is refused too; one the name
    // does not speak to (no extension, or one of neither format) stands.
    let out = dir.join("samples.jsonl");
    let message = sample_refused(
        &[
            &from_checkpoints[..],
            &["--format", "csv", "--out", out.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(
        message.contains("--format csv") && message.contains("names jsonl"),
        "{message}"
    );
    assert!(!out.exists());
    for (name, format, first_line) in [
        ("samples", "csv", "index,energy"),
        ("samples.txt", "jsonl", "{"),
    ] {
        let out = dir.join(name);
        let output = sample(
            &[
                &from_checkpoints[..],
                &[
                    "-n",
                    "3",
                    "--format",
                    format,
                    "--out",
                    out.to_str().unwrap(),
                ],
            ]
            .concat(),
        );
        assert!(output.status.success(), "{output:?}");
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with(first_line), "{name}: {text}");
    }

    // Weights of another model: refused, naming both.
    let other = dir.join("other.toml");
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(&other, text.replace("hidden = [64, 64]", "hidden = [32]")).unwrap();
    let message = sample_refused(&[
        "--config",
        other.to_str().unwrap(),
        "--weights",
        final_weights.to_str().unwrap(),
    ]);
    assert!(
        message.contains("hidden=[64, 64]") && message.contains("hidden=[32]"),
        "{message}"
    );

    // A checkpoint file given as weights: the error says what to pass.
    let (_, checkpoint) = flgfn_learner::checkpoint::list(&checkpoints)
        .unwrap()
        .pop()
        .unwrap();
    let message = sample_refused(&[
        "--config",
        config,
        "--weights",
        checkpoint.to_str().unwrap(),
    ]);
    assert!(message.contains("--checkpoint DIR"), "{message}");

    // Weights written elsewhere, naming no task or model: sampled, with a
    // warning that only their tensors were checked (the learner's own
    // carry no such warning).
    let learners_own = sample_weights(&final_weights, "3");
    let warning = "do not name their task or model";
    assert!(
        !String::from_utf8_lossy(&learners_own.stderr).contains(warning),
        "{learners_own:?}"
    );
    let decoded = flgfn_common::weights::decode(&std::fs::read(&final_weights).unwrap()).unwrap();
    // `arrays` as a weights file of no metadata.
    let written = |name: &str, arrays: &[flgfn_common::weights::NamedArray]| {
        let path = dir.join(name);
        let bytes = flgfn_common::weights::encode(
            arrays,
            flgfn_common::config::WeightEncoding::F32,
            &Default::default(),
        )
        .unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let unnamed = written("unnamed.safetensors", &decoded.arrays);
    let output = sample_weights(&unnamed, "3");
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(warning),
        "{output:?}"
    );

    // A diverged model (output beyond f32): refused, and no file of
    // fewer samples than asked for left under --out.
    let mut huge = decoded.arrays.clone();
    for array in &mut huge {
        for value in &mut array.values {
            *value = if *value >= 0.0 { 1e30 } else { -1e30 };
        }
    }
    let diverged = written("diverged.safetensors", &huge);
    let out = dir.join("diverged.csv");
    let message = sample_refused(&[
        "--config",
        config,
        "--weights",
        diverged.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        message.contains("not finite") && message.contains("was removed"),
        "{message}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the shell command `line` on a pseudo-terminal: what it drew
/// there. (`script`, of util-linux, in every Debian, copies it to stdout.)
fn on_a_terminal(line: &str) -> std::process::Output {
    command(Path::new("script"))
        .args(["-qec", line, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("util-linux `script`")
}

#[test]
fn a_terminal_gets_a_live_progress_line_above_which_logs_print() {
    let dir = scratch("live");
    let config = tiny_config_file(&dir, 300);
    let line = format!(
        "{} --listen 127.0.0.1:0 --local-actors --actors 1 --config {}",
        learner_binary().display(),
        config.display()
    );
    let output = on_a_terminal(&line);
    assert!(output.status.success(), "{output:?}");
    let drawn = String::from_utf8_lossy(&output.stdout);
    assert!(drawn.contains("/300 · 1 actor · "), "{drawn}");
    assert!(drawn.contains("k transitions/s in"), "{drawn}");
    // Redrawn in place (carriage return, erase line), and the log lines
    // still there, the summary last.
    assert!(drawn.contains("\r\u{1b}[2K"), "{drawn}");
    // (A terminal's field names are styled: colour codes between name,
    // `=` and value.)
    let plain = drawn
        .replace("\u{1b}[3m", "")
        .replace("\u{1b}[0m", "")
        .replace("\u{1b}[2m", "");
    assert!(plain.contains("report step="), "{plain}");
    let summary = drawn.rfind("training finished").expect("the summary");
    assert!(
        drawn[summary..].find("transitions/s in").is_none(),
        "the live line is gone before the summary"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner that fails on a terminal clears its live line before it
/// says why: the error is its last line, not written after the spinner.
#[test]
fn a_terminal_gets_the_error_on_a_line_of_its_own() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let line = format!(
        "{} --listen {} --checkpoint-dir ''",
        learner_binary().display(),
        taken.local_addr().unwrap()
    );
    let output = on_a_terminal(&line);
    let drawn = String::from_utf8_lossy(&output.stdout);
    let error = drawn
        .find("flgfn-learner: error: cannot listen on")
        .unwrap_or_else(|| panic!("{drawn:?}"));
    // (Nothing before it where the error came before the line's first
    // drawing, on a busy machine.)
    let before = &drawn[..error];
    assert!(
        before.is_empty() || before.ends_with("\r\u{1b}[2K"),
        "the live line is erased just before the error: {drawn:?}"
    );
}

#[test]
fn the_health_probe_says_not_serving_while_a_checkpoint_loads() {
    let dir = scratch("loading");
    let config = tiny_config_file(&dir, 0);
    // A checkpoint that takes as long to read as the test likes: a named
    // pipe, read until the test writes to it.
    let checkpoints = dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let pipe = checkpoints.join("ckpt-000000000100.safetensors");
    support::make_fifo(&pipe);
    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    // Killed if the test fails before the learner exits by itself.
    let mut learner = support::KillOnDrop(
        command(&learner_binary())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&config)
            .arg("--checkpoint-dir")
            .arg(&checkpoints)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    loop {
        let (up, said) = probe(&address);
        assert!(!up, "SERVING before its checkpoint was read");
        if said == "NOT_SERVING" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the learner answered probes while loading: {said}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Still loading a second later: still NOT_SERVING.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(probe(&address), (false, "NOT_SERVING".to_owned()));
    // The "checkpoint" turns out to be garbage: the only one, so the learner
    // refuses to start rather than silently start over.
    std::fs::write(&pipe, b"not a checkpoint").unwrap();
    // (Read to the end first: the pipe closes when the learner exits.)
    let mut stderr = String::new();
    std::io::Read::read_to_string(learner.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!learner.0.wait().unwrap().success());
    assert!(stderr.contains("ckpt-000000000100"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stop asked for while the learner loads its checkpoint ends the run
/// as soon as it has loaded, without starting its local actors (started,
/// they could never connect, and were killed after their grace period).
#[test]
fn a_stop_while_loading_starts_no_local_actor() {
    let dir = scratch("stop-loading");
    let config = tiny_config_file(&dir, 20);
    let checkpoints = dir.join("checkpoints");
    let run = |extra: &[&str]| {
        command(&learner_binary())
            .args(["--config", config.to_str().unwrap()])
            .args(["--local-actors", "--actors", "1"])
            .args(["--checkpoint-dir", checkpoints.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    assert!(run(&["--listen", "127.0.0.1:0"]).wait().unwrap().success());
    // The newest checkpoint, then a pipe in its place that gives its
    // bytes only once the learner is told to stop.
    let mut written: Vec<PathBuf> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("ckpt-")
        })
        .collect();
    written.sort();
    let newest = written.pop().expect("a checkpoint");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::remove_file(&newest).unwrap();
    support::make_fifo(&newest);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut learner = support::KillOnDrop(run(&["--listen", &listen, "--max-steps", "40"]));
    // Health answers NOT_SERVING while it loads: the stop comes mid-load.
    let started = Instant::now();
    while probe(&format!("http://{listen}")) != (false, "NOT_SERVING".to_owned()) {
        assert!(started.elapsed() < Duration::from_secs(60), "never loading");
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(learner.0.id(), "INT");
    std::fs::write(&newest, bytes).unwrap();
    let mut said = String::new();
    std::io::Read::read_to_string(learner.0.stderr.as_mut().unwrap(), &mut said).unwrap();
    let status = learner.0.wait().unwrap();
    // A stop, not a failure (an unfinished run exits 0 by default).
    assert!(status.success(), "{status}: {said}");
    assert!(
        said.contains("its local actors are not started"),
        "{status}: {said}"
    );
    assert!(
        !said.contains("local actor started") && !said.contains("killing it"),
        "{said}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Stops process `pid` (SIGSTOP) and waits until every one of its threads
/// has stopped. `kill` returns before they all have: on a loaded machine a
/// learner "frozen" this way still answered its actor's end of stream
/// several milliseconds later (seen in 6 of 40 tries here), which is how
/// the second-Ctrl-C test failed in CI.
fn freeze(pid: u32) {
    signal(pid, "STOP");
    let started = Instant::now();
    let all_stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .all(|task| {
                let stat =
                    std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
                // "tid (name) S ...": the state follows the name's last ')'.
                let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
                state.is_none_or(|rest| rest.starts_with('T'))
            })
    };
    while !all_stopped() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "process {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits up to `within` for `child` to exit; its status if it did.
fn exited_within(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_second_ctrl_c_ends_an_actor_that_waits_on_a_frozen_learner() {
    let dir = scratch("second-signal");
    let config = tiny_config_file(&dir, 0);
    let port = free_port();
    let metrics = dir.join("metrics.jsonl");
    let mut learner =
        support::learner_process(&format!("127.0.0.1:{port}"), &config, &metrics, &[]);
    let log = dir.join("actor.log");
    let mut actor = connected_actor(port, &config, &log);
    // Rolling out and sending (the learner has trained on its chunks: its
    // first report); then the learner freezes (a hung host), every thread
    // of it before the actor is signalled (see `freeze`).
    wait_for_log(&metrics, "accepted_chunks");
    let logs = || {
        format!(
            "actor:\n{}\nlearner:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(support::learner_log(&metrics)).unwrap_or_default()
        )
    };
    if let Some(status) = learner.0.try_wait().unwrap() {
        panic!(
            "the learner ended ({status}) before the test froze it:\n{}",
            logs()
        );
    }
    freeze(learner.id());

    // The first signal starts the drain, which waits for the learner to
    // take what was sent: here, up to its own timeout of several seconds.
    signal(actor.id(), "INT");
    if let Some(status) = exited_within(&mut actor.0, Duration::from_secs(1)) {
        panic!(
            "draining towards a frozen learner takes longer than a second, but the actor left ({status}):\n{}",
            logs()
        );
    }
    // The second one ends it now.
    signal(actor.id(), "INT");
    // Its drain would wait 10 s; a loaded machine may take a while to
    // run the exit (the status below says which path it took).
    let status = exited_within(&mut actor.0, Duration::from_secs(5))
        .expect("a second Ctrl-C ends the actor at once");
    assert_eq!(
        status.code(),
        Some(flgfn_common::signals::FORCED_EXIT_STATUS),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("a second stop signal")
    );
    signal(learner.id(), "CONT");
    drop(learner);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kills process `pid` when dropped, if it still runs: for a process the
/// test did not start itself (a learner's local actor), so that a failing
/// test leaves none behind.
struct KillPidOnDrop(u32);

impl Drop for KillPidOnDrop {
    fn drop(&mut self) {
        if Path::new(&format!("/proc/{}", self.0)).exists() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Processes whose parent is `pid` (any of its threads).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let list =
            std::fs::read_to_string(task.unwrap().path().join("children")).unwrap_or_default();
        children.extend(list.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    children
}

#[test]
fn a_second_signal_ends_a_learner_at_once_and_its_local_actors_with_it() {
    let dir = scratch("second-signal-learner");
    let config = tiny_config_file(&dir, 0);
    let log = dir.join("learner.log");
    let mut learner = support::KillOnDrop(
        one_actor_job(&config, &log)
            .env("NO_COLOR", "1")
            .spawn()
            .unwrap(),
    );
    wait_for_log(&log, "step=");
    let actors = children_of(learner.id());
    assert_eq!(actors.len(), 1, "one local actor: {actors:?}");
    let actor = actors[0];
    let _actor_guard = KillPidOnDrop(actor);
    // A frozen actor: the learner's graceful stop waits for its connection
    // and then for it to exit, several seconds each.
    freeze(actor);
    signal(learner.id(), "TERM");
    assert!(
        exited_within(&mut learner.0, Duration::from_secs(1)).is_none(),
        "the graceful stop waits on the frozen actor"
    );
    signal(learner.id(), "TERM");
    let status = exited_within(&mut learner.0, Duration::from_secs(2));
    let actor_alive = Path::new(&format!("/proc/{actor}")).exists();
    let status = status.expect("a second signal ends the learner at once");
    assert_eq!(
        status.code(),
        Some(flgfn_common::signals::FORCED_EXIT_STATUS),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!actor_alive, "the local actor did not outlive the learner");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GNU `timeout` signals the learner, then its process group: one
/// request, delivered twice at once. It must not force the exit, which
/// would skip the final checkpoint.
#[test]
fn a_signal_delivered_twice_at_once_is_one_graceful_stop() {
    let dir = scratch("signal-twice-at-once");
    let config = tiny_config_file(&dir, 0);
    let log = dir.join("learner.log");
    let checkpoints = dir.join("ck");
    let mut learner = support::KillOnDrop(
        one_actor_job(&config, &log)
            .arg("--checkpoint-dir")
            .arg(&checkpoints)
            .env("NO_COLOR", "1")
            .spawn()
            .unwrap(),
    );
    wait_for_log(&log, "step=");
    // 20 ms apart: the first is surely handled before the second comes
    // (tokio would merge two that both arrive before it). The shell says
    // how far apart they were at most.
    let pid = learner.id().to_string();
    let timed = Command::new("sh")
        .args([
            "-c",
            "t0=$(date +%s%N); kill -TERM \"$0\"; sleep 0.02; kill -TERM \"$0\"; echo $(( $(date +%s%N) - t0 ))",
            &pid,
        ])
        .output()
        .unwrap();
    assert!(timed.status.success());
    let apart_ns: u64 = String::from_utf8_lossy(&timed.stdout)
        .trim()
        .parse()
        .unwrap();
    let status = exited_within(&mut learner.0, Duration::from_secs(30))
        .expect("the learner stops gracefully");
    let said = std::fs::read_to_string(&log).unwrap();
    if Duration::from_nanos(apart_ns) >= flgfn_common::signals::SAME_REQUEST_WITHIN {
        // A machine too loaded to send them close together: two requests.
        eprintln!("inconclusive: the signals were up to {apart_ns} ns apart");
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    assert!(status.success(), "{status}\n{said}");
    assert!(!said.contains("a second stop signal"), "{said}");
    assert!(said.contains("final weights saved"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner that stops answering (frozen: its kernel still holds the
/// connection open, so nothing fails on the actor's side) is noticed by
/// the actor's HTTP/2 keepalive (no answer to a ping within twice
/// `actor.keepalive_s`): it reconnects, and once the learner answers again
/// it is served again.
#[test]
fn an_actor_reconnects_when_the_learner_stops_answering_its_pings() {
    let dir = scratch("keepalive");
    let (learner, _actor, actor_log) =
        learner_and_actor(&dir, &[("FLGFN_ACTOR__KEEPALIVE_S", "1")]);
    let wait_for_more = |text: &str, seen: usize| wait_for_more_in_log(&actor_log, text, seen);
    const CONNECTED: &str = "connected to the learner";
    // (A served connection lost: said apart from a learner not reached.)
    const RECONNECTING: &str = "connection to the learner lost; reconnecting";
    let connected = wait_for_more(CONNECTED, 0);
    // Trained on: the session has sent chunks, so that its loss reads as
    // a served connection lost (one that sent nothing is a failure).
    let learner_log = support::learner_log(&dir.join("metrics.jsonl"));
    wait_for_log(&learner_log, "trained_per_s=");
    // (The actor may have started before the learner listened.)
    let reconnecting = count_in_log(&actor_log, RECONNECTING);
    freeze(learner.id());
    let frozen = Instant::now();
    wait_for_more(RECONNECTING, reconnecting);
    let noticed = frozen.elapsed();
    // With what that session sent, to match with the learner's count.
    let said = std::fs::read_to_string(&actor_log).unwrap();
    let lost = said
        .lines()
        .find(|line| line.contains(RECONNECTING))
        .unwrap();
    let sent: Option<u64> = lost
        .split("session_chunks_sent=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok());
    assert!(sent.is_some_and(|sent| sent > 0), "{lost}");
    eprintln!("noticed {noticed:?} after the learner froze");
    // Within about 2 s with the 1 s keepalive; the default (10 s) would
    // take up to 30 s.
    assert!(
        noticed < Duration::from_secs(15),
        "noticed {noticed:?} after the freeze: is actor.keepalive_s used?"
    );
    signal(learner.id(), "CONT");
    wait_for_more(CONNECTED, connected);
    drop(learner);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An actor refused at its handshake is named in the learner's line (a
/// node runs several actors, all at one address), and of a task with
/// other parameters only those that differ are shown.
#[test]
fn a_refused_actor_is_named_in_the_learners_line() {
    let dir = scratch("refused-named");
    let config = tiny_config_file(&dir, 0);
    let (learner, port, learner_log) = learner_on_a_free_port(&dir, &config);
    let url = format!("http://127.0.0.1:{port}");
    let _actor = spawn_logging(
        &sibling("flgfn-actor"),
        &["--learner", &url, "--name", "node7-a3"],
        &config,
        &[("FLGFN_TASK__SET_SIZE", "3")],
        &dir.join("actor.log"),
    );
    wait_for_log(&learner_log, "refused an actor");
    let log = std::fs::read_to_string(&learner_log).unwrap();
    let line = log
        .lines()
        .find(|line| line.contains("refused an actor"))
        .unwrap();
    assert!(line.contains("actor=node7-a3"), "{line}");
    assert!(line.contains("set_size=3; the rest alike"), "{line}");
    drop(learner);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner process on a free port with `config`, its metrics in `dir`:
/// the process (killed when dropped), its port and its log.
fn learner_on_a_free_port(dir: &Path, config: &Path) -> (support::KillOnDrop, u16, PathBuf) {
    let port = free_port();
    let metrics = dir.join("metrics.jsonl");
    let learner = support::learner_process(&format!("127.0.0.1:{port}"), config, &metrics, &[]);
    (learner, port, support::learner_log(&metrics))
}

/// A learner paused (SIGSTOP) for longer than `learner.stall_timeout_s`
/// does not end its healthy actor's session when it resumes: what the actor
/// sent meanwhile, waiting in the connection, is read first.
#[test]
fn a_paused_learner_does_not_blame_its_actor_for_the_pause() {
    let dir = scratch("paused-learner");
    let config = tiny_config_file(&dir, 0);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[learner]\n", "[learner]\nstall_timeout_s = 2.0\n"),
    )
    .unwrap();
    let (learner, port, learner_log) = learner_on_a_free_port(&dir, &config);
    let _actor = connected_actor(port, &config, &dir.join("actor.log"));
    wait_for_log(&learner_log, "trained_per_s=");
    // Twice: the session holds an unused credit at the pause only when
    // the pause finds it so (without the grace, 1 pause in 3 ended it).
    for _ in 0..2 {
        freeze(learner.id());
        std::thread::sleep(Duration::from_secs(3));
        signal(learner.id(), "CONT");
        // Two reports later, past the grace the stall clock gives.
        let reports = count_in_log(&learner_log, "trained_per_s=");
        wait_for_more_in_log(&learner_log, "trained_per_s=", reports + 1);
    }
    let log = std::fs::read_to_string(&learner_log).unwrap();
    assert!(!log.contains("stalled"), "{log}");
    drop(learner);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An actor killed mid-session: its session ends, said as a lost
/// connection (tonic's status for it is only "Unknown: h2 protocol error").
#[test]
fn a_killed_actor_ends_its_session_as_a_lost_connection() {
    let dir = scratch("killed-actor");
    let config = tiny_config_file(&dir, 0);
    let (learner, port, learner_log) = learner_on_a_free_port(&dir, &config);
    let actor = connected_actor(port, &config, &dir.join("actor.log"));
    wait_for_log(&learner_log, "trained_per_s=");
    drop(actor);
    wait_for_log(&learner_log, "session ended");
    let log = std::fs::read_to_string(&learner_log).unwrap();
    let ended = log
        .lines()
        .find(|line| line.contains("session ended"))
        .unwrap();
    assert!(
        ended.contains("ended_by=\"the connection was lost"),
        "{ended}"
    );
    drop(learner);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An actor that stops answering (frozen) loses its connection to the
/// learner's keepalive, whatever `learner.stall_timeout_s` is, and that is
/// said as a lost connection, a warning; an actor that leaves (SIGTERM)
/// is said to have left, at info.
#[test]
fn a_frozen_actor_is_a_lost_connection_and_a_leaving_one_left() {
    let dir = scratch("frozen-actor");
    let config = tiny_config_file(&dir, 0);
    let text = std::fs::read_to_string(&config).unwrap();
    let settings = "[learner]\nkeepalive_s = 1.0\nstall_timeout_s = 600.0\n";
    std::fs::write(&config, text.replace("[learner]\n", settings)).unwrap();
    let (learner, port, learner_log) = learner_on_a_free_port(&dir, &config);
    let frozen = connected_actor(port, &config, &dir.join("frozen.log"));
    let leaving = connected_actor(port, &config, &dir.join("leaving.log"));
    wait_for_log(&learner_log, "trained_per_s=");
    freeze(frozen.id());
    let frozen_at = Instant::now();
    wait_for_log(&learner_log, "session ended");
    // Two pings' worth and some (20 to 30 s at the default 10 s).
    let noticed_after = frozen_at.elapsed();
    assert!(noticed_after < Duration::from_secs(15), "{noticed_after:?}");
    signal(leaving.id(), "TERM");
    wait_for_more_in_log(&learner_log, "session ended", 1);
    let log = std::fs::read_to_string(&learner_log).unwrap();
    let ended: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("session ended"))
        .collect();
    assert!(
        ended[0].contains(" WARN ")
            && ended[0].contains("ended_by=\"the connection was lost (closed under the session"),
        "{}",
        ended[0]
    );
    assert!(
        ended[1].contains(" INFO ") && ended[1].contains("ended_by=\"the actor left\""),
        "{}",
        ended[1]
    );
    drop((frozen, leaving, learner));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stop_while_the_learner_drains_its_connections_closes_them_at_once() {
    let dir = scratch("stop-while-draining");
    let config = tiny_config_file(&dir, 100);
    // The learner's HTTP/2 keepalive would drop the frozen actor's
    // connection after three times this (pings, then twice as long for an
    // answer): at the default 10 s, a run slowed by a loaded suite (35 s
    // for 400 steps once) left nothing to drain. Here past any wait below.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[learner]\n", "[learner]\nkeepalive_s = 100.0\n", 1),
    )
    .unwrap();
    let (mut learner, port, learner_log) = learner_on_a_free_port(&dir, &config);
    let actor = |name: &str| connected_actor(port, &config, &dir.join(format!("{name}.log")));
    // A frozen actor keeps its connection open once training is over: the
    // learner would wait its whole drain timeout (5 s) for it.
    let frozen = actor("frozen");
    freeze(frozen.id());
    let _live = actor("live");
    // Training is over, and the learner waits for the frozen actor's
    // connection. (A stop before that point is a stop of training,
    // which drains for the whole timeout.)
    let notice = "waiting (up to 5s) for the open connections to close";
    let started = Instant::now();
    while count_in_log(&learner_log, notice) == 0 {
        // (Logged after the drain: read first, then the notice again.)
        let training_over = count_in_log(&learner_log, "training finished") > 0;
        assert!(
            !training_over || count_in_log(&learner_log, notice) > 0,
            "training ended without the drain notice: {}",
            learner_log.display()
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "`{notice}` in {}",
            learner_log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(learner.id(), "INT");
    let status = exited_within(&mut learner.0, Duration::from_secs(3))
        .expect("a stop during the drain closes the connections at once");
    assert!(status.success(), "{status}");
    // It was the stop that ended the drain, not an empty drain; and every
    // session's end is logged, the one cut short at shutdown too.
    let log = std::fs::read_to_string(&learner_log).unwrap();
    assert!(
        log.contains("shutdown requested: closing the open connections now"),
        "{log}"
    );
    assert_eq!(log.matches("session ended").count(), 2, "{log}");
    signal(frozen.id(), "CONT");
    drop(frozen);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An actor (or load generator) that gives up on an unreachable learner
/// exits with EX_TEMPFAIL (75), which a job system can retry, and one
/// with a bad setting with 1.
#[test]
fn an_actor_that_gives_up_on_the_learner_exits_75_and_a_bad_setting_1() {
    let dir = scratch("exit-statuses");
    let config = tiny_config_file(&dir, 0);
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let run = |attempts: &str| {
        command(&sibling("flgfn-actor"))
            .args(["--learner", &url, "--config"])
            .arg(&config)
            .envs([
                ("FLGFN_ACTOR__RECONNECT_ATTEMPTS", attempts),
                ("FLGFN_ACTOR__RECONNECT_INITIAL_S", "0.01"),
                ("FLGFN_ACTOR__RECONNECT_MAX_S", "0.02"),
            ])
            .output()
            .unwrap()
    };
    let gave_up = run("2");
    let stderr = String::from_utf8_lossy(&gave_up.stderr);
    assert_eq!(gave_up.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("gave up after 2 attempts in a row without a working session"),
        "{stderr}"
    );
    // The load generator too, when every actor it lost gave up.
    let loadgen = command(&sibling("flgfn-loadgen"))
        .args(["--actors", "2", "--learner", &url, "--config"])
        .arg(&config)
        .envs([
            ("FLGFN_ACTOR__RECONNECT_ATTEMPTS", "2"),
            ("FLGFN_ACTOR__RECONNECT_INITIAL_S", "0.01"),
            ("FLGFN_ACTOR__RECONNECT_MAX_S", "0.02"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&loadgen.stderr);
    assert_eq!(loadgen.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("2 generated actor(s) gave up"), "{stderr}");
    let bad = run("-1");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("reconnect_attempts"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A key a checkpoint refuses names the layer that set it: a container
/// sets it by a variable, and its way on is FLGFN_RESUME_CHANGED.
#[test]
fn a_refused_resume_names_the_variable_that_changed_the_key() {
    let dir = scratch("resume-layer");
    let config = tiny_config_file(&dir, 20);
    let checkpoints = dir.join("checkpoints").display().to_string();
    let run = |env: &[(&str, &str)]| {
        command(&learner_binary())
            .args(["--listen", "127.0.0.1:0", "--local-actors", "--actors", "1"])
            .args(["--checkpoint-dir", &checkpoints, "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let refused = run(&[("FLGFN_LEARNER__LEARNING_RATE", "0.0001")]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("learner.learning_rate")
            && stderr.contains("(set by FLGFN_LEARNER__LEARNING_RATE)")
            && stderr.contains("FLGFN_RESUME_CHANGED=1"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
