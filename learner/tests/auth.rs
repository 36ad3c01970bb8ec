//! The bearer token: missing and wrong tokens are refused, the right one
//! trains, the secret never reaches a log, health probes need none, and a
//! learner stopped mid-training ends its actors; a learner will not listen
//! beyond loopback without one unless told to.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use flgfn_actor::{ActorError, ActorOptions};
use flgfn_common::config::Config;
use flgfn_common::wire::PROTOCOL_VERSION;
use flgfn_common::wire::proto::{self, learner_client::LearnerClient};
use flgfn_learner::RunOptions;
use tokio::net::TcpListener;
use tonic::Code;

const SECRET: &str = "correct-horse-battery-staple-42";

fn config_with_token(dir: &std::path::Path, token: &str) -> Config {
    let path = dir.join(format!("token-{}", token.len()));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    let mut config = support::tiny_config();
    config.auth.token_file = path.display().to_string();
    config
}

fn options(name: &str) -> ActorOptions {
    ActorOptions {
        name: name.to_owned(),
        seed_offset: None,
    }
}

/// These tests give each side its own token file; `FLGFN_TOKEN` would
/// override every one of them (`deploy/test.sh` unsets it).
fn no_token_in_the_environment() {
    assert!(
        std::env::var_os(flgfn_common::auth::TOKEN_ENV).is_none(),
        "unset {} to run this test: it overrides the token files the test sets",
        flgfn_common::auth::TOKEN_ENV
    );
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flgfn-auth-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_right_token_gets_in() {
    no_token_in_the_environment();
    let dir = scratch("tokens");
    let mut config = config_with_token(&dir, SECRET);
    config.learner.max_steps = 30;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        RunOptions::default(),
        std::future::pending::<()>(),
    ));

    // A raw client: no token, then a wrong one.
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let handshake = || proto::HandshakeRequest {
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    };
    let status = client.handshake(handshake()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Wrong, though it holds the secret: a refusal that echoed the token
    // shown would give the secret away.
    let mut wrong = tonic::Request::new(handshake());
    wrong.metadata_mut().insert(
        "authorization",
        format!("Bearer {SECRET}-and-more").parse().unwrap(),
    );
    let status = client.handshake(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains(SECRET), "{status:?}");

    // An actor refused for its token is refused for good, not retried:
    // its error, as the actor's binary prints it.
    let refusal = |mut actor: Config, name: &'static str| {
        actor.actor.learner = url.clone();
        async move {
            let error = tokio::time::timeout(
                Duration::from_secs(30),
                flgfn_actor::run(actor, options(name), std::future::pending()),
            )
            .await
            .unwrap()
            .unwrap_err();
            assert!(matches!(error, ActorError::Refused(_)), "{error:?}");
            error.to_string()
        }
    };
    let error = refusal(
        config_with_token(&dir, "0123456789-wrong-token"),
        "impostor",
    )
    .await;
    assert!(
        error.contains("FLGFN_TOKEN or auth.token_file")
            && !error.contains("(this actor has no token)"),
        "{error}"
    );
    // ...saying where its token came from (a stale FLGFN_TOKEN may hide
    // the file's).
    assert!(
        error.contains("(this actor's token is from auth.token_file ("),
        "{error}"
    );
    // An actor with no token at all is told so.
    let error = refusal(support::tiny_config(), "tokenless").await;
    assert!(error.ends_with("(this actor has no token)"), "{error}");

    // The right token trains.
    let mut actor = config.clone();
    actor.actor.learner = url;
    let actor = tokio::spawn(flgfn_actor::run(
        actor,
        options("member"),
        std::future::pending(),
    ));
    let outcome = support::finished_learner(learner).await;
    assert_eq!(outcome.steps, 30);
    support::finished_actor(actor).await;
    let refused = outcome
        .final_report
        .rejections
        .get("unauthenticated")
        .copied();
    assert!(
        refused.unwrap_or(0) >= 4,
        "{:?}",
        outcome.final_report.rejections
    );
    assert_eq!(
        outcome.final_report.rejected_chunks, 0,
        "no chunk was refused"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner with a token, stopped in the middle of training while its
/// actors are connected: health probes are answered without the token
/// (as Docker's and Kubernetes' are sent), the final weights are the last
/// version, and every actor ends by itself, told that training is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_stopped_mid_training_ends_its_actors_and_answers_probes_without_a_token() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = scratch("stopped");
    let mut config = config_with_token(&dir, SECRET);
    // No step limit: only the stop ends this run.
    config.learner.max_steps = 0;
    let metrics = dir.join("metrics.jsonl");
    let run = RunOptions {
        metrics_path: Some(metrics.clone()),
        ..RunOptions::default()
    };
    let (url, learner, stop) = support::stoppable_learner(&config, run).await;
    // The probe has no token: it is not an actor.
    let plain = Default::default();
    assert!(matches!(
        support::health(&url, &plain).await,
        Ok(ServingStatus::Serving)
    ));
    // Open to anyone, it decodes no more than a service name: a stranger
    // cannot make it hold megabytes per stream.
    let long_name = "x".repeat(flgfn_learner::HEALTH_REQUEST_BYTES * 2);
    match flgfn_actor::health::check(&url, &long_name, &plain).await {
        Err(flgfn_actor::health::HealthError::Refused(status)) => {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        }
        other => panic!("a long health request: {other:?}"),
    }
    let mut actor = config.clone();
    actor.actor.learner = url.clone();
    let actors: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(flgfn_actor::run(
                actor.clone(),
                options(&format!("stopped-{i}")),
                std::future::pending(),
            ))
        })
        .collect();
    // Both actors take part once a report sees them connected while
    // training runs, and the next one a second of training later (a
    // session is granted credits as it opens): not at the first report
    // with steps, which one actor late on a loaded machine could miss.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut both_at_step = None;
    loop {
        let last = support::reports(&metrics).pop();
        match (both_at_step, last) {
            (None, Some(last)) if last.actors_connected == 2 && last.step > 0 => {
                both_at_step = Some(last.step);
            }
            (Some(step), Some(last)) if last.step > step => break,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "two actors training"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        flgfn_actor::health::check(&url, "", &plain).await,
        Ok(ServingStatus::Serving)
    ));
    stop.send(()).unwrap();
    let outcome = support::finished_learner(learner).await;
    assert!(outcome.steps > 0);
    // The final weights are the last version, published (to any later
    // reader of the publisher; actors get weights only with credits, and
    // no credit follows the end).
    assert_eq!(outcome.version, outcome.steps);
    let final_weights = flgfn_common::weights::decode(&outcome.weights).unwrap();
    assert_eq!(
        final_weights.metadata["version"],
        outcome.version.to_string()
    );
    for actor in actors {
        // Told that training is done (checked there), with no version
        // after the final one.
        let report = support::finished_actor(actor).await;
        assert!(report.versions_applied.last() <= Some(&outcome.version));
        assert!(
            report.chunks_sent > 0,
            "actor {} took part",
            report.actor_id
        );
    }
    // Gone: the port no longer answers.
    assert!(flgfn_actor::health::check(&url, "", &plain).await.is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_beyond_loopback_unless_allowed() {
    no_token_in_the_environment();
    let mut config = support::tiny_config();
    let error = support::learner_refusal(config.clone(), "0.0.0.0:0").await;
    assert!(
        error.contains("auth.token_file") && error.contains("beyond loopback"),
        "{error}"
    );

    config.auth.allow_unauthenticated = true;
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let outcome = flgfn_learner::serve(config, listener, RunOptions::default(), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await
    .unwrap();
    assert_eq!(outcome.steps, 0);
    // No step, no report (no `at_quality`): still a run whose task
    // judges quality, which did not reach it (the summary's
    // `quality_reached`, not null).
    assert_eq!(outcome.final_report.at_quality, None);
    assert_eq!(outcome.quality_reached(), Some(false));
}

#[test]
fn the_secret_never_reaches_a_log() {
    // Processes, with the token in the environment as a container would
    // pass it: a learner and its local actors train, and neither log
    // shows the token.
    let dir = scratch("logs");
    let config = dir.join("tiny.toml");
    std::fs::write(&config, support::TINY_TOML).unwrap();
    // Beyond loopback (its local actors still come through loopback).
    let output = Command::new(env!("CARGO_BIN_EXE_flgfn-learner"))
        .args(["--listen", "0.0.0.0:0", "--local-actors", "--actors", "1"])
        .args(["--max-steps", "20", "--config"])
        .arg(&config)
        .env("FLGFN_TOKEN", SECRET)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(log.contains("training finished"), "{log}");
    assert!(!log.contains(SECRET), "the token appears in the logs");
    // Without TLS there, the token travels in clear: said once, at start.
    assert_eq!(
        log.matches("plain text beyond loopback").count(),
        1,
        "{log}"
    );
    let printed = Command::new(env!("CARGO_BIN_EXE_flgfn-learner"))
        .args(["--print-config", "--config"])
        .arg(&config)
        .env("FLGFN_TOKEN", SECRET)
        .output()
        .unwrap();
    // (A failed command would print nothing, the secret included.)
    let (out, err) = (
        String::from_utf8_lossy(&printed.stdout),
        String::from_utf8_lossy(&printed.stderr),
    );
    assert!(printed.status.success(), "{err}");
    assert!(out.contains("[learner]"), "{out}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--print-config` on either binary reads the token and TLS files as a
/// start would: it says where the token came from (never the token), and
/// a file that would stop the binary at start stops it too, naming the
/// key.
#[test]
fn print_config_reads_the_secrets_as_a_start_would() {
    let dir = scratch("print-config");
    let token_file = dir.join("token");
    std::fs::write(&token_file, SECRET).unwrap();
    let token_file = token_file.display().to_string();
    let missing = dir.join("missing").display().to_string();
    let learner = std::path::PathBuf::from(env!("CARGO_BIN_EXE_flgfn-learner"));
    let actor = learner.with_file_name("flgfn-actor");
    let print = |binary: &std::path::Path, args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(binary)
            .arg("--print-config")
            .args(args)
            .env_remove("FLGFN_TOKEN")
            .env_remove("FLGFN_CONFIG")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
        (output.status.success(), stdout, stderr)
    };
    for binary in [&learner, &actor] {
        let name = binary.display();
        let (ok, stdout, _) = print(binary, &[], &[]);
        assert!(ok && stdout.contains("# Token: none"), "{name}: {stdout}");
        let (ok, stdout, stderr) = print(binary, &[], &[("FLGFN_AUTH__TOKEN_FILE", &token_file)]);
        assert!(
            ok && stdout.contains(&format!(
                "# Token: from auth.token_file ({token_file}) (not shown), read"
            )),
            "{name}: {stdout}{stderr}"
        );
        let (ok, _, stderr) = print(binary, &[], &[("FLGFN_AUTH__TOKEN_FILE", &missing)]);
        assert!(
            !ok && stderr.contains("auth.token_file") && stderr.contains(&missing),
            "{name}: {stderr}"
        );
    }
    // A TLS file that is no PEM certificate: the learner reads it to
    // serve, an actor to reach an https:// learner.
    let (ok, _, stderr) = print(
        &learner,
        &[],
        &[
            ("FLGFN_TLS__CERT_FILE", &token_file),
            ("FLGFN_TLS__KEY_FILE", &token_file),
        ],
    );
    assert!(!ok && stderr.contains("tls.cert_file"), "{stderr}");
    let (ok, _, stderr) = print(
        &actor,
        &["--learner", "https://127.0.0.1:50051"],
        &[("FLGFN_TLS__CA_FILE", &token_file)],
    );
    assert!(!ok && stderr.contains("tls.ca_file"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--print-config` refuses what a start refuses before it trains, by the
/// same message (the Slurm script reads a job's configuration so before
/// it starts anything): a network too large for one message, a session
/// that cannot hold one trajectory, more local actors than the learner
/// serves, local actors with TLS, listening beyond loopback with no token.
#[test]
fn print_config_refuses_what_a_start_would() {
    let print = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_flgfn-learner"))
            .arg("--print-config")
            .args(args)
            .env_remove("FLGFN_CONFIG")
            .env_remove("FLGFN_TOKEN")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for (args, env, named) in [
        (
            &[][..],
            &[("FLGFN_MODEL__HIDDEN", "[4096, 4096, 4096]")][..],
            "learner.max_message_bytes",
        ),
        (
            &[],
            &[("FLGFN_LEARNER__MAX_SESSION_BYTES", "10")],
            "learner.max_session_bytes",
        ),
        (
            &["--local-actors", "--actors", "3"],
            &[("FLGFN_LEARNER__MAX_SESSIONS", "2")],
            "launch.actors",
        ),
        (
            &["--local-actors"],
            &[
                ("FLGFN_TLS__CERT_FILE", "cert.pem"),
                ("FLGFN_TLS__KEY_FILE", "key.pem"),
            ],
            "--local-actors does not work with TLS",
        ),
        // Refused at a start only once it listens (before, --print-config
        // passed it).
        (
            &["--listen", "0.0.0.0:50051"],
            &[],
            "beyond loopback, with no token",
        ),
        // (Not read, the run would go on with 600 steps, not 5.)
        (
            &[],
            &[("FLGFN_LEARNER_MAX_STEPS", "5")],
            "FLGFN_LEARNER__MAX_STEPS",
        ),
    ] {
        let (status, stderr) = print(args, env);
        assert!(
            status == Some(1) && stderr.contains(named),
            "{args:?} {env:?}: {status:?} {stderr}"
        );
    }
    let (status, stderr) = print(&["--local-actors", "--actors", "2"], &[]);
    assert_eq!(status, Some(0), "{stderr}");
    // Allowed, as at a start: a name that resolves to loopback, or no
    // token by choice.
    for (args, env) in [
        (&["--listen", "localhost:50051"][..], &[][..]),
        (
            &["--listen", "0.0.0.0:50051"],
            &[("FLGFN_AUTH__ALLOW_UNAUTHENTICATED", "true")],
        ),
    ] {
        let (status, stderr) = print(args, env);
        assert_eq!(status, Some(0), "{args:?} {env:?}: {stderr}");
    }
}
