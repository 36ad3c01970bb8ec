//! `flgfn-experiment`: runs a named suite of training runs and writes
//! their metrics, tables and plots to one folder. See `--help` and
//! `learner/src/experiment/mod.rs` for the folder layout.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use flgfn_learner::experiment::{self, SUITES};

/// Runs a suite (every objective, task and seed it names) with real learner
/// and actor processes, then writes reports.csv, summary.csv, summary.md
/// and PNG/SVG plots.
#[derive(Debug, Parser)]
#[command(name = "flgfn-experiment", version = flgfn_learner::BUILD)]
struct Args {
    /// The suite to run (see --list) [default: paper-sets; with
    /// --plot-only, the folder's].
    #[arg(long)]
    suite: Option<String>,
    /// Seeds per configuration: run r of a configuration has seed
    /// r x 2^20, named `_seed<r>` [default: 3; with --plot-only, the
    /// folder's].
    #[arg(long)]
    seeds: Option<u64>,
    /// Training steps per run (default: the suite's; with --plot-only,
    /// the folder's).
    #[arg(long, value_name = "N")]
    steps: Option<u64>,
    /// A configuration key for every run, KEY=VALUE as in a job file
    /// (`--set actor.epsilon=1.0 --set learner.learning_rate=1e-3`: the
    /// paper's reference settings on small sets; one value holds for
    /// every curve), over the suite's own; repeatable.
    /// Each run's config.toml records it, so a run made without it is
    /// made again [default: none; with --plot-only, the folder's]. Not
    /// `seed`, `learner.max_steps` (--seeds, --steps),
    /// `learner.listen` or `learner.checkpoint_dir` (the runner's).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output folder (default: experiments/<suite>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Only redraw tables and plots from the runs already in the folder,
    /// the suite, seeds and steps it was last run with unless given
    /// (every run of those that did not finish counts as failed).
    #[arg(long, conflicts_with_all = ["stall_timeout_s", "keep_other_builds"])]
    plot_only: bool,
    /// A run that writes neither a report (to its metrics file) nor a
    /// checkpoint for this many seconds (a hung learner, actors that
    /// stopped sending) is killed and counted as failed, and the suite
    /// goes on; the next start resumes it from its last checkpoint. Keep
    /// it above `learner.checkpoint_every_s` (60 s by default) or the time
    /// between reports, whichever is shorter.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0, value_parser = positive_seconds)]
    stall_timeout_s: f64,
    /// Keep runs that another build of the learner made (finished ones as
    /// done, unfinished ones resumed), instead of starting them over; the
    /// tables list the builds behind them.
    #[arg(long)]
    keep_other_builds: bool,
    /// List the suites and exit.
    #[arg(long, conflicts_with_all = ["suite", "seeds", "steps", "set", "out", "plot_only", "stall_timeout_s", "keep_other_builds"])]
    list: bool,
    /// Instead of a suite: plot this metrics file (from `flgfn-learner
    /// --metrics FILE`) into --out (default: plots/), as <its
    /// stem>-steps and -seconds; several files, as curves of one figure
    /// (compared-steps, compared-seconds), each named by what tells its
    /// path from the others'.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["suite", "plot_only", "list", "seeds", "steps", "set", "stall_timeout_s", "keep_other_builds"])]
    plot_metrics: Vec<PathBuf>,
}

/// The folders beside `out` that a suite ran in, as a hint for a redraw
/// that found no `out` (`--plot-only` alone looks in
/// `experiments/paper-sets`): `; suites ran in: --out ...`. Empty where
/// there are none.
fn suite_folders_beside(out: &std::path::Path) -> String {
    let parent = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => std::path::Path::new("."),
    };
    let mut folders: Vec<String> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|folder| folder.join(experiment::SUITE_RECORD).is_file())
        .map(|folder| format!("--out {}", folder.display()))
        .collect();
    folders.sort();
    /// More would bury the message (a folder such as /tmp may hold many).
    const MOST_NAMED: usize = 5;
    let more = folders.len().saturating_sub(MOST_NAMED);
    folders.truncate(MOST_NAMED);
    match (folders.is_empty(), more) {
        (true, _) => String::new(),
        (false, 0) => format!("; suites ran in: {}", folders.join(", ")),
        (false, more) => format!("; suites ran in: {} and {more} more", folders.join(", ")),
    }
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds < 1e9 => Ok(seconds),
        Ok(seconds) if seconds >= 1e9 => Err(format!("`{text}` seconds: at most 1e9")),
        _ => Err(format!("`{text}` is not a number of seconds above 0")),
    }
}

fn main() -> std::process::ExitCode {
    flgfn_common::telemetry::init();
    flgfn_common::telemetry::exit_status(
        "flgfn-experiment",
        run(flgfn_common::telemetry::parse_args()),
    )
}

fn run(args: Args) -> anyhow::Result<()> {
    if !args.plot_metrics.is_empty() {
        let out = args.out.unwrap_or_else(|| PathBuf::from("plots"));
        let files = experiment::plot_metrics_files(&args.plot_metrics, &out)?;
        for file in files {
            flgfn_common::outln!("{}", file.display());
        }
        return Ok(());
    }
    if args.list {
        for suite in SUITES {
            flgfn_common::outln!(
                "{:<12} {} ({} steps per run by default)",
                suite.name,
                suite.description,
                suite.default_steps
            );
        }
        return Ok(());
    }
    const DEFAULT_SUITE: &str = "paper-sets";
    const DEFAULT_SEEDS: u64 = 3;
    /// Most seeds per configuration.
    const MAX_SEEDS: u64 = 10_000;
    let out = args.out.clone().unwrap_or_else(|| {
        let name = args.suite.as_deref().unwrap_or(DEFAULT_SUITE);
        PathBuf::from("experiments").join(name)
    });
    // Each run's configuration names its checkpoint folder as text.
    anyhow::ensure!(
        out.to_str().is_some(),
        "--out {} is not valid UTF-8: give another folder",
        out.display()
    );
    // Redrawing: what the folder was run with, where not given.
    // (Not another suite's: several may share one folder, and the record
    // is the last one's.)
    let recorded = if args.plot_only {
        experiment::SuiteRecord::load(&out)?.filter(|record| {
            args.suite
                .as_ref()
                .is_none_or(|suite| *suite == record.suite)
        })
    } else {
        None
    };
    let asked = experiment::SuiteRecord {
        suite: args
            .suite
            .clone()
            .or_else(|| recorded.as_ref().map(|r| r.suite.clone()))
            .unwrap_or_else(|| DEFAULT_SUITE.to_owned()),
        seeds: args
            .seeds
            .or_else(|| recorded.as_ref().map(|r| r.seeds))
            .unwrap_or(DEFAULT_SEEDS),
        steps: args
            .steps
            .or_else(|| recorded.as_ref().and_then(|r| r.steps)),
        set: if args.set.is_empty() {
            recorded.as_ref().map(|r| r.set.clone()).unwrap_or_default()
        } else {
            args.set.clone()
        },
    };
    let settings = asked
        .set
        .iter()
        .map(|setting| flgfn_common::config::setting_override(setting).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let suite = experiment::suite(&asked.suite).with_context(|| {
        let names: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
        format!(
            "no suite `{}`; there are: {}",
            asked.suite,
            names.join(", ")
        )
    })?;
    // Named as the user gave it: a flag, or the folder's record.
    let source = |flag: &str, given: bool| {
        if given {
            flag.to_owned()
        } else {
            format!(
                "{flag} (from {})",
                out.join(experiment::SUITE_RECORD).display()
            )
        }
    };
    // Each seed is a training run per configuration: more is a typo, and
    // its list alone would not fit in memory.
    anyhow::ensure!(
        (1..=MAX_SEEDS).contains(&asked.seeds),
        "{} must be 1 to {MAX_SEEDS}, not {}",
        source("--seeds", args.seeds.is_some()),
        asked.seeds
    );
    // (0 would be a learner that never stops.)
    anyhow::ensure!(
        asked.steps != Some(0),
        "{} must be at least 1",
        source("--steps", args.steps.is_some())
    );
    let specs = suite.runs(asked.seeds, asked.steps);
    // Before anything runs or is moved aside: a configuration the learner
    // would refuse fails every run, with the cause only in their logs.
    // (The suite's own first, so that a --steps at fault is named as such;
    // then with the settings.)
    for spec in &specs {
        spec.config.validate().with_context(|| match asked.steps {
            Some(steps) => format!(
                "run {} cannot start with --steps {steps} (its learner.max_steps)",
                spec.name()
            ),
            None => format!("run {} of suite {} cannot start", spec.name(), suite.name),
        })?;
    }
    let specs = if settings.is_empty() {
        specs
    } else {
        suite
            .runs_with(asked.seeds, asked.steps, &settings)
            .with_context(|| format!("suite {}", suite.name))?
    };
    // (Not made for a redraw: a mistyped --out is an error, not a folder.)
    anyhow::ensure!(
        !args.plot_only || out.is_dir(),
        "--plot-only: no folder {} (--out names the folder a suite ran in){}",
        out.display(),
        suite_folders_beside(&out)
    );
    // One runner per folder: a second one would move aside runs the first
    // is training, and both would rewrite the tables.
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let lock_path = out.join("runner.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another flgfn-experiment is writing to {} (it holds {}): wait for it, or give another --out",
            out.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    }
    let experiment::SuiteOutcome { results, failed } = if args.plot_only {
        flgfn_common::outln!(
            "redrawing suite {} ({} seeds, {} steps per run) from {}",
            suite.name,
            asked.seeds,
            asked.steps.unwrap_or(suite.default_steps),
            out.display()
        );
        experiment::load_results(&specs, &out)?
    } else {
        let learner = std::env::current_exe()?
            .with_file_name(format!("flgfn-learner{}", std::env::consts::EXE_SUFFIX));
        anyhow::ensure!(
            learner.exists(),
            "{} not found: build every binary (cargo build --release)",
            learner.display()
        );
        flgfn_common::outln!(
            "suite {}: {} runs into {}",
            suite.name,
            specs.len(),
            out.display()
        );
        let options = experiment::SuiteOptions {
            build: experiment::suite_build(&learner)?,
            learner,
            stall_timeout: std::time::Duration::from_secs_f64(args.stall_timeout_s),
            keep_other_builds: args.keep_other_builds,
        };
        flgfn_common::outln!("build: {}", options.build);
        asked.save(&out)?;
        // The tables before the first run and after every run: a suite
        // stopped midway leaves tables of what it did (marked partial, the
        // runs not done in rows of their own), never an earlier
        // invocation's beside this one's suite.json. A failure to write
        // them is said, and the suite goes on.
        let partial = |so_far: &experiment::SuiteOutcome, pending: &[experiment::RunSpec]| {
            if pending.is_empty() {
                return;
            }
            let failed: Vec<experiment::RunSpec> =
                so_far.failed.iter().map(|(s, _)| s.clone()).collect();
            if let Err(error) = experiment::write_outputs(&so_far.results, &failed, pending, &out) {
                flgfn_common::errln!("warning: cannot write the partial tables: {error:#}");
            }
        };
        partial(&experiment::SuiteOutcome::default(), &specs);
        experiment::run_all(&specs, &out, &options, partial)
    };
    let failed_specs: Vec<experiment::RunSpec> = failed.iter().map(|(s, _)| s.clone()).collect();
    let plots = experiment::write_outputs(&results, &failed_specs, &[], &out)?;
    flgfn_common::outln!(
        "wrote {}/reports.csv, summary.csv, summary.md and {} plot files under {}/plots",
        out.display(),
        plots.len(),
        out.display()
    );
    flgfn_common::out!("{}", experiment::summary_markdown(&results, &failed_specs));
    // The tables count the failed runs (as not reaching quality) and plot
    // the finished ones; the failed ones are named here, and the exit
    // status says the suite is incomplete.
    if !failed.is_empty() {
        for (run, why) in &failed {
            flgfn_common::errln!("failed: {}: {why}", run.name());
        }
        anyhow::bail!(
            "{} of {} runs failed (counted in summary.md, not plotted; run the suite again to retry them)",
            failed.len(),
            specs.len()
        );
    }
    Ok(())
}
