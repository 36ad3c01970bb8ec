//! Scale figures: a learner against 1 to 64 generated actors, against real
//! actor processes, with and without added network delay, and with a tiny
//! network to expose the trainer's fixed cost per step. Figures, never
//! pass/fail: every scenario prints one row of one table.
//!
//! ```text
//! deploy/bench.sh                               # everything, default sizes
//! deploy/bench.sh --generated 1,16 --real 2 --delay-ms 25 --steps 300
//! ```
//!
//! Columns: trained transitions per second of training time (from the
//! first step to the last, evaluations left out); ingested transitions per
//! second of the same time, less what arrived but was never trained at the
//! stop (so: trained + stale); trajectory and weight bytes per trained
//! transition (counted by the learner per session); the fraction of
//! ingested data dropped as stale by the learner, and of chunks generated
//! actors rolled out but never sent; the times a session's credits were
//! paused for a while, its chunks arriving at `max_policy_lag` or older;
//! mean and max policy lag (steps); mean
//! batch; the trainer's data-wait fraction; busy milliseconds per step
//! (waiting left out; with the tiny network, its compute and the other
//! threads' contention included: an upper bound of the fixed cost, which
//! the `step` bench gives as an intercept, without the batcher, publishing
//! or other threads: a lower bound; the tiny network has as many layers as
//! the configured one, 8 wide, so compare with `step -- --hidden 8,8` for
//! the default two, on the device the table's first line names; `step`'s
//! own defaults are one layer, on the CPU); the peak resident memory of the
//! benchmark process during the scenario (the learner plus any generated
//! actors, which hold no libtorch, and the proxy; real actor processes are
//! not in it), beside what was resident at its start (what the allocator
//! and libtorch kept from the scenarios before: the peak is not the
//! scenario's alone); publish-to-use latency,
//! the mean milliseconds from a version's publication to its grant being
//! queued (learner), plus the added one-way delay, plus from its arrival
//! to the rollout that loads it (generated actors' mean; real actor
//! processes log theirs as `received_to_use_ms`): a lower bound, without
//! the time queued behind other grants or the transfer itself; the
//! seconds from the trainer's start to its first step (connecting, the
//! first weights, the first rollout), which training time leaves out; and
//! time to quality, in training time and with that start-up added (still
//! leaving evaluations out).
//! Generated actors draw uniform actions: their rows' time to quality is
//! off-policy (marked `*`), not comparable with real actors'. They and
//! the delay proxy run on threads of their own (`actor.threads`, at least 2), not on
//! the learner's async workers; on a machine of few cores they still
//! share its cores.
//!
//! The delayed scenarios each follow their baseline, the same actors
//! through the same proxy with no delay, and a row of the pair's ratios
//! follows each.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use flgfn_actor::ActorReport;
use flgfn_common::config::{Config, DeviceConfig, WeightEncoding};
use flgfn_learner::delay_proxy::DelayProxy;
use flgfn_learner::launcher::LocalActors;
use flgfn_learner::{RunOptions, TrainingOutcome};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
struct Args {
    /// Base configuration (TOML) for every scenario; defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Generated-actor counts to run (loopback).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64", value_parser = actor_count)]
    generated: Vec<usize>,
    /// Real actor process counts to run (loopback).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4", value_parser = actor_count)]
    real: Vec<usize>,
    /// One-way delay added by a proxy for the delayed scenarios (ms).
    #[arg(long, default_value_t = 25)]
    delay_ms: u64,
    /// Training steps per scenario (0 would train until interrupted).
    #[arg(long, default_value_t = 600, value_parser = positive::<u64>)]
    steps: u64,
    /// Weight encoding for every scenario: bf16 or f32 (default: the
    /// configuration's).
    #[arg(long, value_parser = ["bf16", "f32"])]
    encoding: Option<String>,
    /// Learner device: auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// Trajectories per chunk of generated actors (defaults to actor.envs).
    #[arg(long, value_parser = positive::<usize>)]
    generated_envs: Option<usize>,
    /// Only these scenario groups: fixed, generated, real, delay.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fixed,generated,real,delay",
        value_parser = ["fixed", "generated", "real", "delay"]
    )]
    only: Vec<String>,
    /// Log the learner's reports (and everything else at RUST_LOG's
    /// level) to stderr, to see how a scenario evolves.
    #[arg(long)]
    log: bool,
    /// cargo bench passes this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A count of at least 1.
fn positive<T>(text: &str) -> Result<T, String>
where
    T: std::str::FromStr + Default + PartialEq,
    T::Err: std::fmt::Display,
{
    match text.parse::<T>() {
        Ok(count) if count == T::default() => Err("at least 1".to_owned()),
        Ok(count) => Ok(count),
        Err(error) => Err(error.to_string()),
    }
}

/// An actor count of at least 1: a learner without actors would wait for
/// ever (leave a group out with `--only`).
fn actor_count(text: &str) -> Result<usize, String> {
    positive::<usize>(text).map_err(|error| format!("{error} (leave a group out with --only)"))
}

#[derive(Clone)]
struct Scenario {
    name: String,
    config: Config,
    generated: usize,
    real: usize,
    delay: Duration,
    /// Through the delay proxy even with no delay: a delayed scenario's
    /// baseline, under the same conditions but the delay.
    proxied: bool,
}

fn actor_executable() -> PathBuf {
    if let Some(path) = std::env::var_os("FLGFN_ACTOR_BIN") {
        return PathBuf::from(path);
    }
    // target/release/deps/scale-* -> target/release/flgfn-actor
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .unwrap()
        .join("flgfn-actor")
}

/// How long a learner gets to finish by itself once every actor has
/// exited: they exit when told training is done, and the learner then
/// drains and closes its accounts.
const FLEET_GONE_GRACE: Duration = Duration::from_secs(20);

/// How long generated actors get to end once the learner has stopped.
const GENERATED_EXIT_GRACE: Duration = Duration::from_secs(30);

/// What a scenario's run gave.
struct Ran {
    outcome: TrainingOutcome,
    /// What its generated actors did, summed (the counts the bench reads)
    /// into one report, failed ones' included; none where every one
    /// failed having sent nothing.
    generated: Option<ActorReport>,
    /// Every actor exited (refused, failed) before training finished, and
    /// the bench stopped the learner: its figures are partial.
    cut_short: bool,
}

/// Resolves once every actor of a scenario has exited (checked 4 times a
/// second).
async fn fleet_gone(
    generated: Option<&tokio::task::JoinHandle<Vec<flgfn_actor::loadgen::GeneratedActor>>>,
    real: Option<&LocalActors>,
) {
    let mut ticks = tokio::time::interval(Duration::from_millis(250));
    loop {
        ticks.tick().await;
        if generated.is_none_or(|handle| handle.is_finished())
            && real.is_none_or(|actors| actors.exits().1)
        {
            return;
        }
    }
}

/// Runs one scenario. The generated actors and the proxy run on
/// `network`'s threads, not on the learner's async workers, which a real
/// learner does not share with them. An error says why it gave no
/// figures (the learner refused its configuration, say).
async fn run(
    scenario: &Scenario,
    actor_exe: &Path,
    network: &tokio::runtime::Handle,
) -> Result<Ran, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let proxy = if scenario.delay.is_zero() && !scenario.proxied {
        None
    } else {
        let delay = scenario.delay;
        Some(
            network
                .spawn(async move { DelayProxy::start(address, delay).await })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("the delay proxy: {e}"))?,
        )
    };
    let target = proxy.as_ref().map_or(address, |p| p.address);
    let mut actor_config = scenario.config.clone();
    actor_config.actor.learner = format!("http://{target}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut learner = tokio::spawn(flgfn_learner::serve(
        scenario.config.clone(),
        listener,
        RunOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let generated = (scenario.generated > 0).then(|| {
        network.spawn(flgfn_actor::loadgen::run(
            actor_config.clone(),
            scenario.generated,
            std::future::pending(),
        ))
    });
    let real = match (scenario.real > 0)
        .then(|| LocalActors::spawn(scenario.real, target, &actor_config, actor_exe))
        .transpose()
    {
        Ok(real) => real,
        Err(error) => {
            let _ = stop.send(());
            let _ = learner.await;
            if let Some(generated) = generated {
                generated.abort();
            }
            return Err(format!("cannot start {}: {error}", actor_exe.display()));
        }
    };
    // Actors that were all refused or failed would leave the learner
    // waiting for data for ever: it is stopped, and the row says so.
    let mut cut_short = false;
    let outcome = tokio::select! {
        outcome = &mut learner => outcome,
        () = fleet_gone(generated.as_ref(), real.as_ref()) => {
            match tokio::time::timeout(FLEET_GONE_GRACE, &mut learner).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    eprintln!(
                        "{}: every actor exited before training finished: the learner was stopped and the row's figures are partial (--log shows the actors' errors)",
                        scenario.name
                    );
                    cut_short = true;
                    let _ = stop.send(());
                    learner.await
                }
            }
        }
    };
    let outcome = match outcome
        .map_err(|e| format!("the learner's task: {e}"))
        .and_then(|served| served.map_err(|e| format!("the learner: {e}")))
    {
        Ok(outcome) => outcome,
        Err(error) => {
            // Generated actors retry a learner that refused them (for ever,
            // by default): they must not run on into the next scenario.
            if let Some(generated) = generated {
                generated.abort();
            }
            return Err(error);
        }
    };
    let mut totals = None;
    if let Some(mut generated) = generated {
        // Its connections must not linger into the next scenario.
        match tokio::time::timeout(GENERATED_EXIT_GRACE, &mut generated).await {
            Ok(Ok(generated)) => {
                // A failed actor's counts too: what it sent reached the
                // learner.
                let mut sum = ActorReport::default();
                for actor in &generated {
                    sum.add_totals(&actor.report);
                }
                let failed: Vec<_> = generated
                    .iter()
                    .filter_map(|a| a.ended.as_ref().err())
                    .collect();
                if let Some(first) = failed.first() {
                    eprintln!(
                        "{}: {} of {} generated actors failed (first: {first})",
                        scenario.name,
                        failed.len(),
                        generated.len()
                    );
                }
                // Every one failed with nothing sent (refused, say): no
                // actor figures, not zeros that read as measured.
                let nothing = failed.len() == generated.len() && sum.chunks_sent == 0;
                totals = (!nothing).then_some(sum);
            }
            Ok(Err(error)) => eprintln!(
                "{}: the load generator's task failed ({error}): no generated actor figures",
                scenario.name
            ),
            Err(_) => {
                eprintln!(
                    "{}: generated actors still running {} s after the learner stopped: aborted, no generated actor figures",
                    scenario.name,
                    GENERATED_EXIT_GRACE.as_secs()
                );
                generated.abort();
            }
        }
    }
    if let Some(real) = real {
        let failed = real.finish();
        if failed > 0 {
            eprintln!(
                "{}: {failed} of {} real actors failed: the row counts what the learner received (--log shows their errors)",
                scenario.name, scenario.real
            );
        }
    }
    Ok(Ran {
        outcome,
        generated: totals,
        cut_short,
    })
}

/// The figures of a scenario that its delayed twin is compared on.
struct Compared {
    trained_per_s: f64,
    /// In training time, and from the trainer's start.
    time_to_quality: Option<(f64, f64)>,
}

fn compared(outcome: &TrainingOutcome) -> Compared {
    let t = &outcome.totals;
    Compared {
        trained_per_s: t.trained_transitions as f64 / t.wall_s.max(1e-9),
        time_to_quality: outcome
            .time_to_quality_s
            .map(|s| (s, s + t.first_step_after_s)),
    }
}

/// Resets the process's peak resident memory (Linux: `VmHWM`), so that
/// each scenario reads its own peak; false where it cannot.
fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory since the last reset, in MB (10^6
/// bytes, as [`flgfn_learner::report::resident_mb`] gives the resident
/// size now).
fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / 1e6)
}

/// The ratios of a delayed scenario's figures to its baseline's, as a
/// table row under the delayed one (`x0.96` in the trained/s column, the
/// time to quality ratios in theirs).
fn ratio_row(base_name: &str, base: &Compared, delayed: &Compared) -> String {
    let ratio = |delayed: f64, loopback: f64| format!("x{:.2}", delayed / loopback.max(1e-9));
    let quality = match (delayed.time_to_quality, base.time_to_quality) {
        (Some((d, ds)), Some((b, bs))) => format!("{} / {}", ratio(d, b), ratio(ds, bs)),
        _ => "-".to_owned(),
    };
    format!(
        "| (delayed / {base_name}) | | | {} | | | | | | | | | | | | | | {quality} |",
        ratio(delayed.trained_per_s, base.trained_per_s)
    )
}

fn row(scenario: &Scenario, ran: &Ran, figures: &Compared, peak_mb: Option<(f64, f64)>) -> String {
    let outcome = &ran.outcome;
    let generated = ran.generated.as_ref();
    let t = &outcome.totals;
    let r = &outcome.final_report;
    let delay_ms = scenario.delay.as_secs_f64() * 1e3;
    let unsent = generated.map_or("-".to_owned(), |g| {
        let produced = (g.chunks_sent + g.stale_chunks_dropped).max(1) as f64;
        format!("{:.2}", 100.0 * g.stale_chunks_dropped as f64 / produced)
    });
    let publish_to_use = match generated {
        Some(g) => format!(
            "{:.1}",
            r.publish_to_send_ms + delay_ms + g.received_to_use_ms()
        ),
        None => format!(">= {:.1}", r.publish_to_send_ms + delay_ms),
    };
    // Generated actors' uniform actions: off-policy.
    let mark = if scenario.generated > 0 { "*" } else { "" };
    let ttq = figures
        .time_to_quality
        .map_or("-".to_owned(), |(training, launched)| {
            format!("{training:.2}{mark} / {launched:.2}{mark}")
        });
    let delay = match (scenario.delay.is_zero(), scenario.proxied) {
        (true, false) => "0".to_owned(),
        (true, true) => "0 (proxy)".to_owned(),
        (false, _) => format!("{}", scenario.delay.as_millis()),
    };
    // Trained and dropped as stale: what was ingested but for the data
    // waiting when the run stopped (arrived after the last step).
    let used = r
        .ingested_transitions
        .saturating_sub(outcome.untrained_at_stop_transitions);
    let memory = peak_mb.map_or_else(
        || format!("{:.0} (end)", r.resident_mb),
        |(peak, start)| format!("{peak:.0} (from {start:.0})"),
    );
    format!(
        "| {}{} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {} | {} | {:.2} / {} | {:.0} | {:.0} | {:.3} | {} | {} | {:.2} | {} |",
        scenario.name,
        if ran.cut_short {
            " (cut short: every actor exited)"
        } else {
            ""
        },
        scenario.generated + scenario.real,
        delay,
        figures.trained_per_s,
        used as f64 / t.wall_s.max(1e-9),
        r.trajectory_bytes_per_trained_transition,
        r.weight_bytes_per_trained_transition,
        100.0 * r.stale_fraction,
        unsent,
        r.session_pauses,
        t.mean_policy_lag,
        t.max_policy_lag,
        t.mean_batch_transitions,
        100.0 * t.data_wait_fraction,
        t.busy_ms_per_step,
        memory,
        publish_to_use,
        t.first_step_after_s,
        ttq,
    )
}

fn main() {
    let args = Args::parse();
    if args.log {
        flgfn_common::telemetry::init();
    }
    let mut base = Config::load(args.config.as_deref()).unwrap();
    // Sized as the learner binary sizes its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(base.learner.async_threads)
        .max_blocking_threads(base.learner.ingest_threads + 2)
        .enable_all()
        .build()
        .unwrap();
    // The load generator and the delay proxy on threads of their own (at
    // least 2: 64 generated actors and the proxy's pumps share them): the
    // learner's async workers carry only what a real learner's do.
    let network = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(base.actor.threads.max(2))
        .thread_name("bench-network")
        .enable_all()
        .build()
        .unwrap();
    // Benchmarks measure; they keep nothing.
    base.learner.checkpoint_dir = String::new();
    base.learner.max_steps = args.steps;
    base.learner.device = match args.device.as_str() {
        "cpu" => DeviceConfig::Cpu,
        "cuda" => DeviceConfig::Cuda,
        _ => DeviceConfig::Auto,
    };
    match args.encoding.as_deref() {
        Some("bf16") => base.learner.weight_encoding = WeightEncoding::Bf16,
        Some("f32") => base.learner.weight_encoding = WeightEncoding::F32,
        _ => {}
    }
    let mut generated_config = base.clone();
    if let Some(envs) = args.generated_envs {
        generated_config.actor.envs = envs;
    }
    let delay = Duration::from_millis(args.delay_ms);
    let wants = |group: &str| args.only.iter().any(|g| g == group);

    let mut scenarios = Vec::new();
    if wants("fixed") {
        // Compute ~0: what is left per step is the trainer's fixed cost
        // (as many layers as the base network: each costs dispatches).
        let mut tiny = generated_config.clone();
        tiny.model.hidden = vec![8; base.model.hidden.len().max(1)];
        tiny.learner.max_steps = args.steps.max(2000);
        scenarios.push(Scenario {
            name: "8-wide net (busy ~ fixed cost)".to_owned(),
            config: tiny,
            generated: 8,
            real: 0,
            delay: Duration::ZERO,
            proxied: false,
        });
    }
    if wants("generated") {
        for &k in &args.generated {
            scenarios.push(Scenario {
                name: format!("generated x{k}"),
                config: generated_config.clone(),
                generated: k,
                real: 0,
                delay: Duration::ZERO,
                proxied: false,
            });
        }
    }
    if wants("real") {
        for &k in &args.real {
            scenarios.push(Scenario {
                name: format!("real x{k}"),
                config: base.clone(),
                generated: 0,
                real: k,
                delay: Duration::ZERO,
                proxied: false,
            });
        }
    }
    if wants("delay") && !delay.is_zero() {
        let k = args.generated.iter().copied().max().unwrap_or(16).min(16);
        // No more real actors than --real allows (a machine of few cores).
        let r = args.real.iter().copied().max().unwrap_or(2).min(2);
        // Each delayed scenario right after its baseline: the same actors
        // through the same proxy, no delay.
        for (name, config, generated, real) in [
            (format!("real x{r}"), &base, 0, r),
            (format!("generated x{k}"), &generated_config, k, 0),
        ] {
            for (suffix, delay) in [(", proxied", Duration::ZERO), (", delayed", delay)] {
                scenarios.push(Scenario {
                    name: format!("{name}{suffix}"),
                    config: config.clone(),
                    generated,
                    real,
                    delay,
                    proxied: true,
                });
            }
        }
    }

    let actor_exe = actor_executable();
    if scenarios.iter().any(|s| s.real > 0) && !actor_exe.is_file() {
        eprintln!(
            "no actor binary at {} (deploy/bench.sh builds it; or set FLGFN_ACTOR_BIN): the scenarios with real actors are left out",
            actor_exe.display()
        );
        scenarios.retain(|s| s.real == 0);
    }
    // One-time start-up costs (thread pools, allocator growth, page
    // faults, a device's context, each network shape's first kernels) go
    // to short untimed runs, one per network shape, not to a first row.
    let mut device = args.device.clone();
    let mut warmed: Vec<&[usize]> = Vec::new();
    for scenario in &scenarios {
        if warmed.contains(&scenario.config.model.hidden.as_slice()) {
            continue;
        }
        warmed.push(&scenario.config.model.hidden);
        let mut warm_up = scenario.clone();
        // (Named so in what it says on stderr.)
        warm_up.name = format!("warm-up run of {}", scenario.name);
        warm_up.config.learner.max_steps = 100;
        warm_up.delay = Duration::ZERO;
        match runtime.block_on(run(&warm_up, &actor_exe, network.handle())) {
            Ok(ran) => device = ran.outcome.machine.device,
            Err(error) => eprintln!("{}: {error}", warm_up.name),
        }
    }
    println!(
        "device {device}, weights {:?}, model.hidden {:?}, {} steps per scenario (the fixed-cost one at least 2,000)",
        base.learner.weight_encoding, base.model.hidden, args.steps
    );
    println!();
    println!(
        "| scenario | actors | one-way delay ms | trained/s | ingested/s (trained + stale) | traj B/trained | weight B/trained | stale % | unsent % | pauses | lag mean / max | batch | wait % | busy ms/step | peak RSS MB (bench process; from: at the scenario's start) | publish->use ms (lower bound) | first step after s | time to quality s (training / with start-up) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut baseline: Option<(String, Compared)> = None;
    for scenario in &scenarios {
        // The peak starts from what is resident now, which holds what the
        // allocator and libtorch kept from earlier scenarios: both said.
        let tracked = reset_peak_memory();
        let start = flgfn_learner::report::resident_mb();
        let ran = match runtime.block_on(run(scenario, &actor_exe, network.handle())) {
            Ok(ran) => ran,
            Err(error) => {
                println!("| {} | failed: {error} |", scenario.name);
                baseline = None;
                continue;
            }
        };
        let outcome = &ran.outcome;
        let peak = if tracked {
            peak_memory_mb().map(|peak| (peak, start))
        } else {
            None
        };
        let figures = compared(outcome);
        println!("{}", row(scenario, &ran, &figures, peak));
        if ran.cut_short {
            // Partial figures are nobody's baseline, nor compared with
            // one.
            baseline = None;
            continue;
        }
        if !scenario.proxied {
            continue;
        }
        if scenario.delay.is_zero() {
            baseline = Some((scenario.name.clone(), figures));
        } else if let Some((base_name, base)) = baseline.take() {
            // A row of ratios under the delayed one, printed with it (a
            // timeout in a later row keeps it).
            println!("{}", ratio_row(&base_name, &base, &figures));
        }
    }
    if scenarios.iter().any(|s| s.generated > 0) {
        println!();
        println!(
            "* generated actors draw uniform actions: off-policy, not comparable with real actors' time to quality"
        );
    }
}
