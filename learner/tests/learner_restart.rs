//! An actor outlives a learner that is killed and restarted from scratch.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use flgfn_actor::ActorOptions;
use flgfn_common::config::Config;
use flgfn_learner::RunOptions;
use tokio::net::TcpListener;

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
            std::future::pending(),
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
