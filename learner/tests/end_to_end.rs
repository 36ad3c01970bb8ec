//! A learner on `127.0.0.1:0` and real actors over gRPC, in one process.
#![allow(clippy::unwrap_used)]

mod support;

use flgfn_actor::{ActorError, ActorOptions, ActorReport};
use flgfn_common::config::{BackwardPolicy, Config, ObjectiveName, TaskConfig, WeightEncoding};
use flgfn_common::tasks;
use flgfn_common::tasks::lattice::LatticeConfig;
use flgfn_learner::{RunOptions, TrainingOutcome};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn tiny_config() -> Config {
    let mut config = support::tiny_config();
    config.learner.max_steps = 600;
    config
}

struct Learner {
    url: String,
    outcome: tokio::task::JoinHandle<Result<TrainingOutcome, flgfn_learner::LearnerError>>,
    stop: oneshot::Sender<()>,
}

async fn start_learner(config: Config) -> Learner {
    start_learner_with(config, RunOptions::default()).await
}

async fn start_learner_with(config: Config, options: RunOptions) -> Learner {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let outcome = tokio::spawn(flgfn_learner::serve(
        config,
        listener,
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    Learner { url, outcome, stop }
}

/// A learner of the tiny task that trains until stopped and reports every
/// 50 ms into a fresh metrics file named for `name`: its configuration,
/// the learner and that file.
async fn learner_reporting_often(name: &str) -> (Config, Learner, std::path::PathBuf) {
    let mut config = tiny_config();
    config.learner.max_steps = 0;
    config.learner.first_report_s = 0.05;
    config.learner.report_every_s = 0.05;
    let metrics = std::env::temp_dir().join(format!("flgfn-{name}-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let options = RunOptions {
        metrics_path: Some(metrics.clone()),
        ..RunOptions::default()
    };
    let learner = start_learner_with(config.clone(), options).await;
    (config, learner, metrics)
}

fn actor_options(i: u64) -> ActorOptions {
    ActorOptions {
        name: format!("test-actor-{i}"),
        seed_offset: Some(i),
    }
}

/// Trains `config` with `actors` in-process actors until `max_steps`, and
/// checks what every run must show: the step count, and actors that applied
/// several versions and stopped when training ended.
async fn train(config: &Config, actors: u64) -> (TrainingOutcome, Vec<ActorReport>) {
    train_with(config, actors, RunOptions::default()).await
}

/// [`train`] with these run options.
async fn train_with(
    config: &Config,
    actors: u64,
    options: RunOptions,
) -> (TrainingOutcome, Vec<ActorReport>) {
    let learner = start_learner_with(config.clone(), options).await;
    let mut actors = spawn_actors(config, &learner.url, actors);

    let outcome = support::training_outcome(learner.outcome, &mut actors).await;
    drop(learner.stop);
    assert_eq!(outcome.steps, config.learner.max_steps);
    assert_eq!(outcome.version, config.learner.max_steps);
    assert_eq!(
        outcome.final_report.lost_chunks, 0,
        "actors that never lost their connection lost no chunk"
    );
    let report = &outcome.final_report;
    assert_eq!(
        report.ingested_transitions,
        report.trained_transitions
            + report.stale_transitions
            + outcome.untrained_at_stop_transitions,
        "every accepted transition was trained, dropped as stale, or left when training ended: {report:?}, {} untrained",
        outcome.untrained_at_stop_transitions
    );
    let mut reports = Vec::new();
    for actor in actors {
        let report = support::finished_actor(actor).await;
        assert!(report.chunks_sent > 0);
        // Also when training ends with chunks still queued.
        assert_eq!(
            report.rollouts,
            report.chunks_sent + report.stale_chunks_dropped,
            "every chunk rolled out is sent or counted as dropped: {report:?}"
        );
        assert!(
            report.versions_applied.len() >= 2,
            "applied {:?}",
            report.versions_applied
        );
        assert!(report.versions_applied.windows(2).all(|w| w[0] < w[1]));
        reports.push(report);
    }
    assert_every_chunk_sent_was_received(&outcome, &reports);
    (outcome, reports)
}

/// Every chunk the actors sent reached the learner: in time, or late (on
/// its way when training ended: the learner reads those, never trained,
/// before it ends each session). The late ones, counted.
fn assert_every_chunk_sent_was_received(outcome: &TrainingOutcome, reports: &[ActorReport]) -> u64 {
    let received: u64 = outcome.sessions.iter().map(|s| s.chunks_received).sum();
    let late: u64 = outcome.sessions.iter().map(|s| s.late_chunks).sum();
    let sent: u64 = reports.iter().map(|r| r.chunks_sent).sum();
    assert_eq!(
        received + late,
        sent,
        "every chunk an actor sent was received, in time or late: {:?}",
        outcome.sessions
    );
    late
}

/// `count` in-process actors of `config` for the learner at `url`, each
/// with its own seed, running until training ends.
fn spawn_actors(
    config: &Config,
    url: &str,
    count: u64,
) -> Vec<tokio::task::JoinHandle<Result<ActorReport, ActorError>>> {
    let mut actor_config = config.clone();
    actor_config.actor.learner = url.to_owned();
    (0..count)
        .map(|i| {
            tokio::spawn(flgfn_actor::run(
                actor_config.clone(),
                actor_options(i),
                std::future::pending(),
            ))
        })
        .collect()
}

/// Total variation between the exact terminal distribution of the learned
/// sampler and the target: no sampling noise in this check.
fn exact_total_variation(config: &Config, weights: &[u8]) -> f64 {
    let (tv, terminal_states) = support::exact_total_variation(config, weights);
    assert_eq!(terminal_states, 70);
    tv
}

fn log_z_error(outcome: &TrainingOutcome) -> f64 {
    let report = &outcome.final_report;
    (report.logz_est - report.logz_exact.unwrap()).abs()
}

/// The same weights rounded to bf16, as actors receive them by default.
fn as_bf16(weights: &[u8]) -> Vec<u8> {
    let decoded = flgfn_common::weights::decode(weights).unwrap();
    flgfn_common::weights::encode(&decoded.arrays, WeightEncoding::Bf16, &decoded.metadata).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_actors_train_the_learner_to_the_exact_target() {
    let config = tiny_config();
    assert_eq!(config.learner.weight_encoding, WeightEncoding::Bf16);
    let (outcome, _) = train(&config, 2).await;
    // The run's final weights are exact, whatever actors received.
    let decoded = flgfn_common::weights::decode(&outcome.weights).unwrap();
    assert_eq!(decoded.metadata["encoding"], "f32");
    let tv = exact_total_variation(&config, &outcome.weights);
    let log_z_error = log_z_error(&outcome);
    // The sampler actors run: the same weights in bf16. Rounding moves
    // the exact distribution far less than training noise does.
    let tv_bf16 = exact_total_variation(&config, &as_bf16(&outcome.weights));
    eprintln!(
        "bf16 on the wire: exact TV {tv:.4} (the same weights in bf16: {tv_bf16:.4}), log Z error {log_z_error:.4}"
    );
    assert!(tv <= 0.05, "total variation to the target is {tv}");
    assert!(
        (tv_bf16 - tv).abs() <= 0.005,
        "bf16 rounding moved TV {tv} to {tv_bf16}"
    );
    // log Z too: the distribution alone does not pin it down.
    assert!(log_z_error < 0.1, "log Z error {log_z_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_to_quality_is_found_between_reports_on_the_weights_kept_meanwhile() {
    let metrics = std::env::temp_dir().join(format!("flgfn-quality-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let mut config = tiny_config();
    // Reports 4 s apart, and enough samples that sampling noise rarely
    // hides quality: the tiny task reaches it long before the first (by
    // 0.4 s here; copies are kept every 0.8 s), and only the weights kept
    // meanwhile can tell when. If training ends first (about 2 s here),
    // its final report is the first, with copies before it all the same.
    config.learner.first_report_s = 4.0;
    config.learner.report_every_s = 4.0;
    config.learner.eval_samples = 2048;
    config.learner.max_steps = 3000;
    let options = RunOptions {
        metrics_path: Some(metrics.clone()),
        ..RunOptions::default()
    };
    let (outcome, _) = train_with(&config, 2, options).await;
    let reports = support::reports(&metrics);
    let _ = std::fs::remove_file(&metrics);
    let summary = metrics.with_extension("summary.json");
    // The run's summary has the time to quality its outcome has.
    let summarised: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let _ = std::fs::remove_file(&summary);
    assert_eq!(
        summarised["time_to_quality_s"].as_f64(),
        outcome.time_to_quality_s,
        "{summarised}"
    );
    // And the machine its seconds were measured on: the trainer's device
    // and thread count (the test's configuration's).
    let machine = &summarised["machine"];
    let device = if tch::Cuda::is_available() {
        "cuda:0"
    } else {
        "cpu"
    };
    assert_eq!(machine["device"], device, "{summarised}");
    assert_eq!(
        machine["torch_threads"].as_u64(),
        Some(config.learner.threads as u64),
        "{summarised}"
    );
    assert!(
        machine["cpus"].as_u64().is_some_and(|n| n >= 1),
        "{summarised}"
    );
    let first = reports
        .iter()
        .position(|r| r.at_quality == Some(true))
        .expect("the tiny task reaches quality");
    let found_by = reports[first].wall_s;
    let below = first.checked_sub(1).map_or(0.0, |i| reports[i].wall_s);
    let time_to_quality = outcome.time_to_quality_s.unwrap();
    eprintln!(
        "reports: last below quality at {below:.2} s, first at quality at {found_by:.2} s; time to quality {time_to_quality:.2} s"
    );
    assert!(
        below < time_to_quality && time_to_quality < found_by,
        "time to quality {time_to_quality} is not between {below} and {found_by}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_weights_on_the_wire_train_the_sampler_as_well_as_bf16() {
    let mut config = tiny_config();
    config.learner.weight_encoding = WeightEncoding::F32;
    let (outcome, _) = train(&config, 2).await;
    let tv = exact_total_variation(&config, &outcome.weights);
    let log_z_error = log_z_error(&outcome);
    eprintln!("f32 on the wire: exact TV {tv:.4}, log Z error {log_z_error:.4}");
    assert!(tv <= 0.05, "total variation to the target is {tv}");
    assert!(log_z_error < 0.1, "log Z error {log_z_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mostly_truncated_trajectories_still_train_the_sampler() {
    let mut config = tiny_config();
    config.actor.truncate_fraction = 0.9;
    // One report at the end, so its truncated fraction covers the whole run
    // (~19,000 trajectories) rather than the last few steps.
    config.learner.first_report_s = 1e6;
    config.learner.report_every_s = 1e6;
    let (outcome, _) = train(&config, 2).await;
    let tv = exact_total_variation(&config, &outcome.weights);
    let log_z_error = log_z_error(&outcome);
    eprintln!("90% truncated: exact TV {tv:.4}, log Z error {log_z_error:.4}");
    assert!(tv <= 0.05, "total variation to the target is {tv}");
    assert!(log_z_error < 0.1, "log Z error {log_z_error}");
    // Prefixes were trained on, not dropped.
    let truncated = outcome.final_report.truncated_fraction;
    assert!((0.8..0.97).contains(&truncated), "{truncated}");
}

/// Trains the tiny task with `name`, 30 % of its trajectories cut short,
/// and checks the exact terminal distribution of the result, and that the
/// prefixes were trained on (TB, which cannot use them, drops them).
async fn objective_trains_the_sampler(name: ObjectiveName, backward: BackwardPolicy) {
    let mut config = tiny_config();
    config.objective.name = name;
    config.objective.backward_policy = backward;
    config.actor.truncate_fraction = 0.3;
    // One report at the end, so its truncated fraction covers the run.
    config.learner.first_report_s = 1e6;
    config.learner.report_every_s = 1e6;
    let (outcome, _) = train(&config, 2).await;
    let tv = exact_total_variation(&config, &outcome.weights);
    let log_z_error = log_z_error(&outcome);
    eprintln!("{name:?}, {backward:?} P_B: exact TV {tv:.4}, log Z error {log_z_error:.4}");
    assert!(
        tv <= 0.05,
        "{name:?}: total variation to the target is {tv}"
    );
    assert!(log_z_error < 0.3, "{name:?}: log Z error {log_z_error}");
    let report = &outcome.final_report;
    let (truncated, unusable) = (
        report.truncated_fraction,
        report.unusable_truncated_transitions,
    );
    if name == ObjectiveName::Tb {
        assert!(truncated == 0.0 && unusable > 0, "{truncated}, {unusable}");
    } else {
        assert!(
            (0.2..0.4).contains(&truncated) && unusable == 0,
            "{name:?}: {truncated} of trained trajectories truncated, {unusable} unusable transitions"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fl_sub_tb_trains_the_sampler() {
    objective_trains_the_sampler(ObjectiveName::FlSubTb, BackwardPolicy::Learned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_trains_the_sampler() {
    objective_trains_the_sampler(ObjectiveName::Db, BackwardPolicy::Learned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_tb_trains_the_sampler() {
    objective_trains_the_sampler(ObjectiveName::SubTb, BackwardPolicy::Learned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tb_trains_the_sampler_and_its_own_log_z() {
    objective_trains_the_sampler(ObjectiveName::Tb, BackwardPolicy::Learned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fl_db_with_a_uniform_backward_policy_trains_the_sampler() {
    objective_trains_the_sampler(ObjectiveName::FlDb, BackwardPolicy::Uniform).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fl_db_trains_a_lattice_and_the_learner_reports_its_exact_tv() {
    let mut config = tiny_config();
    config.task = TaskConfig::Lattice(LatticeConfig {
        side: 3,
        ..LatticeConfig::default()
    });
    config.learner.batch_transitions = 144;
    config.learner.max_steps = 800;
    // The recomputation below runs on the CPU: a learner on a GPU would
    // score the same weights with other rounding.
    config.learner.device = flgfn_common::config::DeviceConfig::Cpu;
    let (outcome, _) = train(&config, 2).await;
    let (tv, objects) = support::exact_total_variation(&config, &outcome.weights);
    assert_eq!(objects, 512);
    let report = &outcome.final_report;
    let reported = report.exact_tv.unwrap();
    eprintln!(
        "3x3 lattice: exact TV {tv:.4} (reported {reported:.4}), log Z error {:.4}",
        log_z_error(&outcome)
    );
    // The learner's own figure is the same computation on the same weights.
    assert!(
        (reported - tv).abs() < 1e-6,
        "reported {reported}, recomputed {tv}"
    );
    assert!(tv <= 0.1, "exact TV {tv}");
    assert!(log_z_error(&outcome) < 0.3);
    // KL(target || sampler) is positive (the sampler is not exact),
    // small where the TV is, and the learner's figure is the one
    // recomputed here from both distributions.
    let kl = report.exact_kl.unwrap();
    assert!(kl > 0.0 && kl < 0.5, "exact KL {kl}");
    let (learned, target) = support::exact_distributions(&config, &outcome.weights);
    let recomputed: f64 = target
        .iter()
        .filter(|(_, p)| **p > 0.0)
        .map(|(state, p)| p * (p / learned[state]).ln())
        .sum();
    assert!(
        (kl - recomputed).abs() < 1e-6,
        "reported KL {kl}, recomputed {recomputed}"
    );
    // Importance-sampled log Z is close once the sampler is.
    let sampled = report.sampled_logz_error().unwrap();
    assert!(sampled < 0.3, "sampled log Z off by {sampled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// (Their quality thresholds are checked in the task's tests:
/// `every_set_size_is_judged_by_its_own_thresholds`.)
async fn medium_and_large_sets_train_end_to_end_and_report_every_metric() {
    use flgfn_common::tasks::set_generation::{SetGenerationConfig, SetSize};
    for (size, log_z) in [(SetSize::Medium, 45.379), (SetSize::Large, 48.392)] {
        let mut config = tiny_config();
        config.task = TaskConfig::SetGeneration(SetGenerationConfig {
            size,
            ..SetGenerationConfig::default()
        });
        config.learner.batch_transitions = 16 * 80;
        config.learner.max_steps = 30;
        // Credits for two batches at a time: with the default 48, the
        // actor could roll out all 30 steps' data before the first step
        // ends (it did, once, with 15 other tests sharing 2 cores), and
        // `train` asserts that it applied a newer version.
        config.learner.max_in_flight_batches = 2;
        let (outcome, _) = train(&config, 1).await;
        let report = &outcome.final_report;
        assert!((report.logz_exact.unwrap() - log_z).abs() < 1e-3);
        assert!(report.marginal_tv.unwrap().is_finite() && report.energy_w1.unwrap().is_finite());
        assert!(report.logz_sampled.is_finite() && report.logz_sampled_ess >= 1.0);
        // 30 steps are far from quality, and the report says so.
        assert_eq!(report.at_quality, Some(false));
        assert!(report.top100_mean_reward >= report.top100_mean_reward_eval);
        assert_eq!(
            report.top100_samples % config.learner.eval_samples as u64,
            0
        );
    }
}

/// TB drops truncated prefixes and counts them; DB trains on them, unless
/// `objective.drop_truncated` makes it drop them too (the paper's DB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_prefixes_are_dropped_and_counted_where_the_objective_cannot_use_them() {
    for (objective, drop_truncated, dropped) in [
        (ObjectiveName::Tb, false, true),
        (ObjectiveName::Db, false, false),
        (ObjectiveName::Db, true, true),
    ] {
        let mut config = tiny_config();
        config.objective.name = objective;
        config.objective.drop_truncated = drop_truncated;
        config.actor.truncate_fraction = 0.5;
        config.learner.max_steps = 100;
        let (outcome, _) = train(&config, 1).await;
        let report = &outcome.final_report;
        let case = format!(
            "{objective:?}, drop_truncated = {drop_truncated}: {} unusable, truncated fraction {}",
            report.unusable_truncated_transitions, report.truncated_fraction
        );
        assert_eq!(report.unusable_truncated_transitions > 0, dropped, "{case}");
        assert_eq!(report.truncated_fraction == 0.0, dropped, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_of_another_task_or_model_is_refused() {
    let config = tiny_config();
    let learner = start_learner(config.clone()).await;

    let mut other_task = config.clone();
    other_task.actor.learner = learner.url.clone();
    let TaskConfig::SetGeneration(set) = &mut other_task.task else {
        panic!("the tiny task is a set task")
    };
    set.set_size = Some(3);
    let error = flgfn_actor::run(other_task, actor_options(0), std::future::pending())
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ActorError::Refused(_)), "{error:?}");
    assert!(message.contains("task mismatch"), "{message}");
    // Only the parameter that differs.
    assert!(
        message.contains("(set_size=3; the rest alike)")
            && message.contains("(set_size=4; the rest alike)"),
        "{message}"
    );

    let mut other_model = config.clone();
    other_model.actor.learner = learner.url.clone();
    other_model.model.hidden = vec![32];
    let error = flgfn_actor::run(other_model, actor_options(1), std::future::pending())
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("model mismatch"), "{message}");
    assert!(
        message.contains("[32]") && message.contains("[64, 64]"),
        "{message}"
    );

    learner.stop.send(()).unwrap();
    let outcome = learner.outcome.await.unwrap().unwrap();
    assert_eq!(outcome.steps, 0, "refused actors sent nothing to train on");
}

/// Weights over the actor's own `learner.max_message_bytes` (its file may
/// be another than the learner's) but within the learner's, which it is
/// told at the handshake, are taken: refusing them would stop the actor
/// for good at its first grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_takes_weights_up_to_the_learners_limit_whatever_its_own() {
    let mut config = tiny_config();
    config.learner.max_steps = 5;
    // About 4.3 MB of f32 weights.
    config.model.hidden = vec![1024, 1024];
    config.learner.weight_encoding = WeightEncoding::F32;
    config.learner.max_message_bytes = 8 << 20;
    let learner = start_learner(config.clone()).await;
    let mut actor_config = config.clone();
    actor_config.actor.learner = learner.url.clone();
    actor_config.learner.max_message_bytes = 1 << 20;
    let mut actors = vec![tokio::spawn(flgfn_actor::run(
        actor_config,
        actor_options(0),
        std::future::pending(),
    ))];
    let outcome = support::training_outcome(learner.outcome, &mut actors).await;
    drop(learner.stop);
    assert_eq!(outcome.steps, 5);
    let report = support::finished_actor(actors.remove(0)).await;
    assert!(!report.versions_applied.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_learner_makes_the_actor_give_up_after_its_attempts() {
    let mut config = tiny_config();
    let port = support::free_port().await;
    config.actor.learner = format!("http://127.0.0.1:{port}");
    config.actor.reconnect_attempts = 3;
    config.actor.reconnect_initial_s = 0.01;
    config.actor.reconnect_max_s = 0.02;
    let error = flgfn_actor::run(config, actor_options(0), std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ActorError::GaveUp { attempts: 3, .. }),
        "{error:?}"
    );
}

#[test]
fn the_tiny_task_is_what_the_tests_assume() {
    let env = tasks::build(&tiny_config().task).unwrap();
    assert_eq!(env.forward_actions(), 8);
    assert_eq!(env.max_trajectory_len(), 4);
}

/// An actor asked to stop sends every chunk it rolled out, the one in
/// progress included, before it leaves: it sent all it rolled out, and the
/// learner received all it sent. Three actors in turn, each stopped while
/// it rolls out flat out (once the learner took a chunk of its).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_actor_sends_every_chunk_it_rolled_out() {
    let (config, learner, metrics) = learner_reporting_often("stopping").await;
    let mut actor_config = config.clone();
    actor_config.actor.learner = learner.url.clone();
    let accepted = || {
        support::reports(&metrics)
            .last()
            .map_or(0, |report| report.accepted_chunks)
    };
    let mut reports = Vec::new();
    for i in 0..3 {
        // What the earlier actors sent, all received (checked below): not
        // the last report's count, which may still lack the last chunks
        // the previous actor drained.
        let before: u64 = reports.iter().map(|r: &ActorReport| r.chunks_sent).sum();
        let (stop, stopped) = oneshot::channel::<()>();
        let actor = tokio::spawn(flgfn_actor::run(
            actor_config.clone(),
            actor_options(i),
            async move {
                let _ = stopped.await;
            },
        ));
        // Stopped once it is under way (a fixed wait could stop an actor
        // still connecting, on a loaded machine).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while accepted() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "actor {i} sent nothing in 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.send(()).unwrap();
        // Under the drain's own 10 s timeouts: it ended because every
        // chunk was out and the learner had them, not by giving up.
        let report = tokio::time::timeout(std::time::Duration::from_secs(8), actor)
            .await
            .expect("a stopped actor leaves once its chunks are taken")
            .unwrap()
            .unwrap();
        assert!(report.chunks_sent > 0, "{report:?}");
        // One session, never broken: nothing is stale, so a chunk not
        // sent would show here (the report counts those as dropped).
        assert_eq!(
            (report.rollouts, report.stale_chunks_dropped),
            (report.chunks_sent, 0),
            "every chunk rolled out was sent: {report:?}"
        );
        assert_eq!(
            report.abandoned_rollouts, 0,
            "the rollout in progress was finished: {report:?}"
        );
        assert!(!report.stop_unconfirmed, "{report:?}");
        reports.push(report);
    }
    learner.stop.send(()).unwrap();
    let outcome = learner.outcome.await.unwrap().unwrap();
    for report in &reports {
        let received: u64 = outcome
            .sessions
            .iter()
            .filter(|s| s.actor_id == report.actor_id)
            .map(|s| s.chunks_received)
            .sum();
        assert_eq!(received, report.chunks_sent, "{report:?}");
    }
    let _ = std::fs::remove_file(&metrics);
    let _ = std::fs::remove_file(metrics.with_extension("summary.json"));
}

/// A stopping actor whose connection breaks before the learner ended its
/// session (a learner crashed, a link cut) cannot know its last chunks
/// arrived: it still leaves cleanly, but says so, not as a clean drain.
/// The link here is a proxy adding 1 s each way, cut 300 ms into the
/// drain, long before the learner's answer could come back (2 s at least).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_connection_breaks_while_draining_says_so() {
    let mut config = tiny_config();
    config.learner.max_steps = 0;
    let dir = std::env::temp_dir().join(format!("flgfn-unconfirmed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = dir.join("metrics.jsonl");
    let learner = start_learner_with(
        config.clone(),
        RunOptions {
            metrics_path: Some(metrics.clone()),
            ..RunOptions::default()
        },
    )
    .await;
    let address = learner.url.trim_start_matches("http://").parse().unwrap();
    let proxy =
        flgfn_learner::delay_proxy::DelayProxy::start(address, std::time::Duration::from_secs(1))
            .await
            .unwrap();
    let mut actor_config = config.clone();
    actor_config.actor.learner = format!("http://{}", proxy.address);
    let (stop, stopped) = oneshot::channel::<()>();
    let actor = tokio::spawn(flgfn_actor::run(
        actor_config,
        actor_options(0),
        async move {
            let _ = stopped.await;
        },
    ));
    // Stopped once its chunks train (a handshake, a session and its first
    // grants take a few round trips): its session is serving.
    let trained = || {
        std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .any(|report| report["trained_transitions"].as_u64() > Some(0))
    };
    let started = std::time::Instant::now();
    while !trained() {
        assert!(started.elapsed().as_secs() < 60, "no chunk trained");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.send(()).unwrap();
    // Cut while it drains: the learner's answer to the drain comes 2 s
    // after it starts at the soonest (1 s each way), and the actor starts
    // draining within moments of the stop (1.2 s leaves a loaded machine
    // time to start it).
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    drop(proxy);
    let report = tokio::time::timeout(std::time::Duration::from_secs(8), actor)
        .await
        .expect("the broken drain ends at once")
        .unwrap()
        .unwrap();
    assert!(report.chunks_sent > 0, "the session served: {report:?}");
    assert!(report.stop_unconfirmed, "{report:?}");
    learner.stop.send(()).unwrap();
    learner.outcome.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learner stopped in the middle of training (Ctrl-C), its actors busy:
/// the chunks they had sent when it stopped are read and counted, late, so
/// that what each actor says it sent is what the learner counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_learner_counts_every_chunk_its_actors_sent() {
    let (config, learner, metrics) = learner_reporting_often("stopped").await;
    let actors = spawn_actors(&config, &learner.url, 2);
    // Stopped once both actors are connected and training is under way (a
    // fixed wait could stop actors still connecting, on a loaded machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !support::reports(&metrics)
        .last()
        .is_some_and(|report| report.actors_connected == 2 && report.step > 0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "two actors did not connect and train in 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    learner.stop.send(()).unwrap();
    let outcome = learner.outcome.await.unwrap().unwrap();
    assert!(outcome.steps > 0, "{outcome:?}");
    let mut reports = Vec::new();
    for actor in actors {
        let report = support::finished_actor(actor).await;
        assert!(report.training_done, "{report:?}");
        reports.push(report);
    }
    let late = assert_every_chunk_sent_was_received(&outcome, &reports);
    assert_eq!(
        outcome
            .final_report
            .rejections
            .get("shutting_down")
            .copied()
            .unwrap_or(0),
        late,
        "late chunks are counted as arrived after training ended"
    );
    let _ = std::fs::remove_file(&metrics);
    let _ = std::fs::remove_file(metrics.with_extension("summary.json"));
}
