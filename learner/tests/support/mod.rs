//! Pieces shared by the learner's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use flgfn_actor::{ActorError, ActorReport};
use flgfn_common::config::Config;
use flgfn_learner::{LearnerError, TrainingOutcome};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
pub use tonic_health::pb::health_check_response::ServingStatus;

/// Sends `signal` (a `kill` name: INT, TERM, USR1, KILL, STOP, CONT) to
/// process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The learner's `training finished` line in `log` (none fails the test,
/// showing the log).
pub fn finished_line(log: &str) -> &str {
    log.lines()
        .find(|line| line.contains("training finished"))
        .unwrap_or_else(|| panic!("no `training finished` line:\n{log}"))
}

/// A set task of 70 terminal sets (4 of 8 elements, 163 states): small
/// enough to compute the sampler's exact terminal distribution, and quick
/// to learn. Kept as TOML so a learner process can read it from a file.
pub const TINY_TOML: &str = r#"
[task]
name = "set_generation"
universe = 8
set_size = 4
levels = [-0.8, -0.1, 0.4, 1.2]

[model]
hidden = [64, 64]

[learner]
checkpoint_dir = ""
batch_transitions = 64
eval_samples = 256
first_report_s = 1.0
report_every_s = 1.0

[actor]
envs = 8
epsilon = 0.1
"#;

/// The reports in a metrics file so far (none if it does not exist yet).
/// Every whole line must be a report: only a last line without its newline
/// (mid-write, or torn by a kill) is left out.
pub fn reports(path: &std::path::Path) -> Vec<flgfn_learner::report::Report> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole_lines = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    whole_lines
        .lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).unwrap_or_else(|error| {
                panic!("{}, line {}: {error}: {line}", path.display(), i + 1)
            })
        })
        .collect()
}

/// [`TINY_TOML`] parsed.
pub fn tiny_config() -> Config {
    Config::from_toml(TINY_TOML, "tests/support/mod.rs").unwrap()
}

/// Warnings (or what `RUST_LOG` asks for) go to the test's captured
/// output, shown when it fails.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The learner's outcome once training ends. Fails at once, with the
/// actor's own error, if an actor stops first: a learner left without
/// actors would only wait. Warnings (or what `RUST_LOG` asks for) logged
/// meanwhile go to the test's captured output, shown when it fails.
pub async fn training_outcome(
    mut learner: JoinHandle<Result<TrainingOutcome, LearnerError>>,
    actors: &mut Vec<JoinHandle<Result<ActorReport, ActorError>>>,
) -> TrainingOutcome {
    init_logs();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        tokio::select! {
            outcome = &mut learner => return outcome.unwrap().unwrap(),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        // (An actor told that training is over ends a moment before the
        // learner's outcome resolves, which drains its connections.)
        if let Some(i) = actors.iter().position(JoinHandle::is_finished) {
            let grace = tokio::time::timeout(Duration::from_secs(30), &mut learner).await;
            if let Ok(outcome) = grace {
                return outcome.unwrap().unwrap();
            }
            let result = actors.remove(i).await;
            panic!("actor {i} ended while training went on: {result:?}");
        }
        // (No actor stopped: the learner and its actors are stuck.)
        assert!(
            tokio::time::Instant::now() < deadline,
            "training did not finish in 300 s"
        );
    }
}

/// A learner on `127.0.0.1:0` in this process: its URL, its outcome, and
/// the sender that stops it.
pub async fn stoppable_learner(
    config: &Config,
    options: flgfn_learner::RunOptions,
) -> (
    String,
    JoinHandle<Result<TrainingOutcome, LearnerError>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    (url, learner, stop)
}

/// The learner's health over `url` (the probe shows no token), asked
/// until it says SERVING (it starts serving once ready) or 60 s pass (a
/// learner process loads libtorch first, slowly on a loaded machine); the
/// last answer.
pub async fn health(
    url: &str,
    tls: &flgfn_common::auth::TlsConfig,
) -> Result<ServingStatus, flgfn_actor::health::HealthError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = flgfn_actor::health::check(url, "", tls).await;
        if matches!(answer, Ok(ServingStatus::Serving)) || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The error of a learner on `config` that must refuse to start, bound to
/// `address` (a loopback port, or "0.0.0.0:0" for beyond loopback).
pub async fn learner_refusal(config: Config, address: &str) -> String {
    let listener = TcpListener::bind(address).await.unwrap();
    flgfn_learner::serve(
        config,
        listener,
        flgfn_learner::RunOptions::default(),
        std::future::pending::<()>(),
    )
    .await
    .expect_err("the learner refuses to start")
    .to_string()
}

/// Makes a named pipe at `path`: a file whose reads and writes wait for
/// the other side, which a test controls.
pub fn make_fifo(path: &std::path::Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

/// A loopback port nobody listens on right now (bound, read, released).
pub async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// The report of an actor task, which must end by itself, told that
/// training is over, once the learner has finished.
pub async fn finished_actor(actor: JoinHandle<Result<ActorReport, ActorError>>) -> ActorReport {
    let report = tokio::time::timeout(Duration::from_secs(30), actor)
        .await
        .expect("actors stop when training ends")
        .unwrap()
        .unwrap();
    assert!(report.training_done);
    report
}

/// Total variation between the exact terminal distribution of the sampler
/// whose weights are `weights` and the target of `config`'s task (which must
/// enumerate in 10,000 states), and the number of terminal states: no
/// sampling noise in this check.
pub fn exact_total_variation(config: &Config, weights: &[u8]) -> (f64, usize) {
    let (learned, target) = exact_distributions(config, weights);
    (
        flgfn_common::exact::total_variation(&learned, &target),
        target.len(),
    )
}

/// The exact terminal distribution of the sampler whose weights are
/// `weights`, and the target of `config`'s task (see
/// [`exact_total_variation`]).
pub fn exact_distributions(
    config: &Config,
    weights: &[u8],
) -> (
    std::collections::HashMap<flgfn_common::env::State, f64>,
    std::collections::HashMap<flgfn_common::env::State, f64>,
) {
    use flgfn_common::exact::{policy_terminal_distribution, target_distribution};
    use flgfn_common::policy::{ModelSpec, Policy};
    use flgfn_common::rollout::forward_probabilities;

    let env = flgfn_common::tasks::build(&config.task).unwrap();
    let mut policy = Policy::new(
        &ModelSpec::new(env.as_ref(), &config.model),
        tch::Device::Cpu,
    );
    policy.load_bytes(weights).unwrap();
    let mut non_finite_states = 0;
    let learned = policy_terminal_distribution(env.as_ref(), 10_000, &mut |states| {
        forward_probabilities(env.as_ref(), &policy, states, &mut non_finite_states)
    })
    .unwrap();
    assert_eq!(non_finite_states, 0, "a diverged model: no distribution");
    let target = target_distribution(env.as_ref(), 10_000).unwrap();
    (learned, target)
}

/// A child process that is killed when this guard is dropped, so a test
/// that fails midway leaves no learner running.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `flgfn-learner` process listening on `address` with the configuration
/// file `config` and the metrics file `metrics`, plus `extra` flags; its
/// output discarded, killed when dropped.
pub fn learner_process(
    address: &str,
    config: &std::path::Path,
    metrics: &std::path::Path,
    extra: &[&str],
) -> KillOnDrop {
    std::process::Command::new(env!("CARGO_BIN_EXE_flgfn-learner"))
        .args(["--listen", address, "--config"])
        .arg(config)
        .arg("--metrics")
        .arg(metrics)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(learner_log(metrics))
                .unwrap(),
        )
        .spawn()
        .map(KillOnDrop)
        .unwrap()
}

/// Where [`learner_process`] logs, beside its metrics file (appended to by
/// every learner started with that file), for a failing test to show.
pub fn learner_log(metrics: &std::path::Path) -> std::path::PathBuf {
    metrics.with_extension("log")
}

/// The outcome of an in-process learner that must finish training by
/// itself within two minutes.
pub async fn finished_learner(
    learner: JoinHandle<Result<flgfn_learner::TrainingOutcome, flgfn_learner::LearnerError>>,
) -> flgfn_learner::TrainingOutcome {
    init_logs();
    tokio::time::timeout(Duration::from_secs(120), learner)
        .await
        .expect("training finishes")
        .unwrap()
        .unwrap()
}
