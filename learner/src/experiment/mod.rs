//! The experiment runner behind `flgfn-experiment`: named suites of runs
//! (task x objective x truncation x seed), each a real `flgfn-learner
//! --local-actors` process with its actor processes, then tables and plots.
//!
//! Layout of an output folder:
//!
//! ```text
//! OUT/suite.json                the suite, seeds and steps last asked for
//!                               (what `--plot-only` redraws by default)
//! OUT/runner.lock               held by the runner writing to OUT
//! OUT/runs/<run>/config.toml    the exact configuration of the run
//! OUT/runs/<run>/run.json       the learner builds that trained it, and
//!                               whether its learner failed after its
//!                               last report
//! OUT/runs/<run>/metrics.jsonl  its reports (one JSON object each)
//! OUT/runs/<run>/metrics.summary.json  the learner's summary of its end
//! OUT/runs/<run>/learner.log    its learner's and actors' logs
//! OUT/runs/<run>/checkpoints/   its checkpoints and final.safetensors
//! OUT/reports.csv               every report on the evaluation grid of
//!                               every run, one row each
//! OUT/summary.csv               per run: steps and seconds to quality and
//!                               to the top-100 ceiling, final figures
//!                               (failed runs: a row flagged `failed`)
//! OUT/summary.md                the same, mean and range over seeds,
//!                               and the builds behind them (rewritten
//!                               after every run, marked partial until
//!                               the suite is done)
//! OUT/plots/<group>-{steps,seconds}.{png,svg}
//! ```
//!
//! Every run reports at a fixed step interval (`learner.eval_every_steps`),
//! so steps to a threshold are resolved to that grain and runs of different
//! seeds line up report by report.

pub mod plots;
mod suites;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flgfn_common::config::Config;
use flgfn_common::tasks;

use crate::durable_file::write_atomically;
use crate::report::Report;
pub use suites::{SUITES, Suite, suite};

/// Fraction of the exact top-100 ceiling a run must reach to count as
/// having found the best objects.
pub const TOP_K_FRACTION: f64 = 0.99;

/// One run of a suite.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Plots and tables group runs by this (e.g. the task size).
    pub group: String,
    /// One curve per distinct label within a group (e.g. the objective).
    pub curve: String,
    /// Repeat number, 0, 1, ... (the configuration's `seed` is this times
    /// [`suites::SEED_STRIDE`]).
    pub seed: u64,
    /// Local actor processes.
    pub actors: usize,
    /// Place of its configuration (group and curve) in the suite: tables
    /// list configurations in this order, those whose every seed failed
    /// included.
    pub position: usize,
    /// Everything the learner and actors read.
    pub config: Config,
}

impl RunSpec {
    /// Folder name: group, curve and seed.
    pub fn name(&self) -> String {
        let clean = |s: &str| {
            s.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect::<String>()
        };
        format!(
            "{}_{}_seed{}",
            clean(&self.group),
            clean(&self.curve),
            self.seed
        )
    }
}

/// What one run reached.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The run.
    pub spec: RunSpec,
    /// Its reports, in order.
    pub reports: Vec<Report>,
    /// (step, seconds) of the first report at quality.
    pub to_quality: Option<(u64, f64)>,
    /// (step, seconds) of the first report whose top-100 over every
    /// evaluation so far reached [`TOP_K_FRACTION`] of the exact ceiling
    /// (the paper's cumulative metric: one evaluation's 4,096 samples of
    /// an exact sampler hold few of the 100 best of 30 million sets, so
    /// the per-evaluation figure cannot reach it; within a suite every run
    /// evaluates the same number of samples at the same steps, so the
    /// cumulative figure compares runs fairly).
    pub to_top_k: Option<(u64, f64)>,
    /// The exact top-100 ceiling, where known.
    pub top_k_ceiling: Option<f64>,
    /// Which builds trained it, and whether its learner failed after its
    /// last report.
    pub record: RunRecord,
}

impl RunResult {
    /// Whether its last report is at quality: a run can pass once (the
    /// flow head's log Z wanders near the threshold) and leave again.
    pub fn at_quality_at_end(&self) -> bool {
        self.reports
            .last()
            .is_some_and(|r| r.at_quality == Some(true))
    }
}

/// What the runner knows of a run beyond its configuration and reports
/// (`runs/<run>/run.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// Every learner build (`flgfn-learner --version`) that trained part
    /// of the run, in order: a run is kept or resumed only by the build
    /// that made it (a rebuild after a fix must not reuse the old
    /// binary's figures), unless `--keep-other-builds`; then a resumed
    /// run lists both. Empty for a run of an older runner (unrecorded).
    pub builds: Vec<String>,
    /// Why its learner failed after its last report, where it did (a
    /// local actor that failed on the way: fewer actors, so its seconds
    /// are not a normal run's). Its reports are kept, and the tables say
    /// so.
    #[serde(default)]
    pub learner_failed: Option<String>,
}

/// A run's record file, in its folder.
const RUN_RECORD: &str = "run.json";

/// The build of a run an older runner made, which recorded none.
const UNRECORDED: &str = "unrecorded";

impl RunRecord {
    /// The record in run folder `dir`; None where there is none (a run
    /// of an older runner, or one never started) or it cannot be read.
    pub fn load(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(RUN_RECORD)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record into `dir` (made if missing), whole or not at all.
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        write_atomically(dir, RUN_RECORD, text.as_bytes())
            .with_context(|| format!("cannot write {}", dir.join(RUN_RECORD).display()))?;
        Ok(())
    }

    /// Whether every part of the run was trained by `build`.
    fn only_by(&self, build: &str) -> bool {
        !self.builds.is_empty() && self.builds.iter().all(|b| b == build)
    }

    /// Its builds for a message or a table: "unrecorded" for none.
    pub fn builds_text(&self) -> String {
        if self.builds.is_empty() {
            UNRECORDED.to_owned()
        } else {
            self.builds.join(" + ")
        }
    }
}

/// How [`run_all`] runs a suite.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `flgfn-learner` binary.
    pub learner: PathBuf,
    /// Its build, as `--version` prints it.
    pub build: String,
    /// A run that writes neither a report nor a checkpoint for this long
    /// is killed.
    pub stall_timeout: Duration,
    /// Keep (and resume) runs another build made, instead of starting
    /// them over.
    pub keep_other_builds: bool,
}

/// The build of the learner binary at `learner`: its `--version`, less the
/// program's name, and for a build of uncommitted changes (or of an
/// unknown state) a hash of the binary, since the version line alone is
/// the same before and after an uncommitted fix.
pub fn learner_build(learner: &Path) -> anyhow::Result<String> {
    let output = Command::new(learner)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", learner.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next().unwrap_or("").trim();
    if !output.status.success() || line.is_empty() {
        bail!(
            "{} --version failed ({}): {}",
            learner.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let version = line.strip_prefix("flgfn-learner ").unwrap_or(line);
    if !(version.contains(", modified") || version.contains("unknown")) {
        return Ok(version.to_owned());
    }
    let binary =
        std::fs::read(learner).with_context(|| format!("cannot read {}", learner.display()))?;
    Ok(format!("{version} binary {:016x}", fnv1a64(&binary)))
}

/// FNV-1a, 64 bits: tells two binaries apart (not a defence against
/// anyone), the same on every platform and Rust release.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What a suite did: the runs that finished, and those that failed (each
/// with why), which the suite went on past.
#[derive(Debug, Default)]
pub struct SuiteOutcome {
    /// Finished runs, in suite order.
    pub results: Vec<RunResult>,
    /// Runs that failed or stopped before their last step, and why (a
    /// diverged learner is a result: the tables count these runs).
    pub failed: Vec<(RunSpec, String)>,
}

/// Runs `specs` one after another with the learner of `options`,
/// writing everything under `out`, and calls `after_each` with what is
/// done so far and the runs not yet done after each run. A run whose folder
/// already holds a complete metrics file, made with the same configuration
/// by the same build, is not run again (a suite interrupted midway resumes
/// where it stopped); one made with another configuration (other steps,
/// another suite sharing the folder) or by another build (unless
/// `keep_other_builds`) starts over in a new folder, the old one moved to
/// `out/replaced/` (a mistyped `--steps` deletes nothing). A run that
/// fails, or writes neither a report nor a checkpoint for `stall_timeout`
/// (it is then killed), is recorded and the suite goes on; one whose
/// learner fails after its last report at `max_steps` (a local actor that
/// failed on the way, a final save that failed) is kept, with a warning
/// and a mark in its record, as a later start and `--plot-only` would
/// keep it.
pub fn run_all(
    specs: &[RunSpec],
    out: &Path,
    options: &RunOptions,
    mut after_each: impl FnMut(&SuiteOutcome, &[RunSpec]),
) -> SuiteOutcome {
    let started = Instant::now();
    let mut outcome = SuiteOutcome::default();
    for (i, spec) in specs.iter().enumerate() {
        let label = format!("[{}/{}] {}", i + 1, specs.len(), spec.name());
        match run_or_keep(spec, out, options, &label, started) {
            Ok(result) => outcome.results.push(result),
            Err(error) => {
                flgfn_common::outln!("{label}: FAILED: {error:#}");
                outcome.failed.push((spec.clone(), format!("{error:#}")));
            }
        }
        after_each(&outcome, &specs[i + 1..]);
    }
    outcome
}

/// Runs (or keeps) one run of a suite: its result, or why it failed.
fn run_or_keep(
    spec: &RunSpec,
    out: &Path,
    options: &RunOptions,
    label: &str,
    started: Instant,
) -> anyhow::Result<RunResult> {
    let dir = out.join("runs").join(spec.name());
    let metrics = dir.join("metrics.jsonl");
    let config = run_config(spec, &dir);
    let written = written_config_matches(spec, &dir);
    let record = RunRecord::load(&dir);
    // Reports with no configuration beside them are of an unknown one
    // (an older runner's): set aside too, never taken for this run's.
    let unknown_reports = written.is_none() && metrics.exists();
    let other_build = written == Some(true)
        && !options.keep_other_builds
        && !record.as_ref().is_some_and(|r| r.only_by(&options.build));
    let why_aside = if written == Some(false) || unknown_reports {
        Some("made with another configuration".to_owned())
    } else if other_build {
        Some(format!(
            "made by another build ({}; this learner is {}; --keep-other-builds keeps such runs)",
            record
                .as_ref()
                .map_or(UNRECORDED.to_owned(), RunRecord::builds_text),
            options.build
        ))
    } else {
        None
    };
    if let Some(why) = &why_aside {
        let aside = set_aside(out, &dir, &spec.name(), why)?;
        flgfn_common::outln!(
            "{label}: {why}; starting over (the old run is now {})",
            aside.display()
        );
    }
    let same_run = written == Some(true) && why_aside.is_none();
    let mut record = match record {
        Some(record) if same_run => record,
        // Kept with --keep-other-builds, from a runner that recorded no
        // build: what it trained is said to be of an unrecorded one.
        None if same_run && (metrics.exists() || dir.join("checkpoints").exists()) => RunRecord {
            builds: vec![UNRECORDED.to_owned()],
            learner_failed: None,
        },
        _ => RunRecord::default(),
    };
    let mut kept = "";
    let done = match read_reports(&metrics) {
        Ok(reports) if same_run && finished(spec, &reports) => {
            kept = "already done, kept: ";
            Ok(reports)
        }
        _ => {
            if record.builds.last() != Some(&options.build) {
                record.builds.push(options.build.clone());
            }
            record.learner_failed = None;
            // Before the learner starts: a run cut short is known to be
            // this build's when the suite is started again.
            let ran = record
                .save(&dir)
                .and_then(|()| run_one(spec, &config, options, &dir, label, !same_run));
            judge(spec, label, ran, read_reports(&metrics)).and_then(|(reports, failure)| {
                if failure.is_some() {
                    record.learner_failed = failure;
                    record.save(&dir)?;
                }
                Ok(reports)
            })
        }
    };
    let result = RunResult {
        record,
        ..summarise(spec.clone(), on_grid(spec, done?))?
    };
    flgfn_common::outln!(
        "{label}: {kept}{} reports, quality at {}{}, top-100 at {} ({:.0} s elapsed)",
        result.reports.len(),
        describe(result.to_quality),
        if result.to_quality.is_some() && !result.at_quality_at_end() {
            " (not at the end)"
        } else {
            ""
        },
        describe(result.to_top_k),
        started.elapsed().as_secs_f64()
    );
    Ok(result)
}

/// What a run that was started left: its reports where they reach
/// `max_steps`, whatever its learner's exit (a failure after the last
/// report, such as a local actor that failed on the way, is printed as a
/// warning and returned with them: a later start, or `--plot-only`, reads
/// the same reports as finished, and the run's record keeps the failure),
/// else why it did not finish.
fn judge(
    spec: &RunSpec,
    label: &str,
    ran: anyhow::Result<()>,
    reports: anyhow::Result<Vec<Report>>,
) -> anyhow::Result<(Vec<Report>, Option<String>)> {
    match (ran, reports) {
        (ran, Ok(reports)) if finished(spec, &reports) => {
            let failure = ran.err().map(|error| format!("{error:#}"));
            if let Some(failure) = &failure {
                flgfn_common::outln!(
                    "{label}: warning: its learner failed after its last report; its reports are kept (and marked in the tables): {failure}"
                );
            }
            Ok((reports, failure))
        }
        (Err(error), _) => Err(error),
        (Ok(()), Ok(reports)) => Err(anyhow::anyhow!(
            "{label} stopped at step {} of {}",
            reports.last().map_or(0, |r| r.step),
            spec.config.learner.max_steps
        )),
        (Ok(()), Err(error)) => Err(error),
    }
}

/// A run's configuration file, in its folder.
const CONFIG_FILE: &str = "config.toml";

/// Where run folders made with another configuration or by another build
/// go, under the suite's folder.
pub const REPLACED_DIR: &str = "replaced";

/// Moves run folder `dir` (named `name`; `why`: made with another
/// configuration, say) to `out/replaced/<name>-<unix seconds>`, so that
/// the run starting over in its place deletes nothing an earlier one
/// finished. Returns where it went.
fn set_aside(out: &Path, dir: &Path, name: &str, why: &str) -> anyhow::Result<PathBuf> {
    let replaced = out.join(REPLACED_DIR);
    std::fs::create_dir_all(&replaced)
        .with_context(|| format!("cannot create {}", replaced.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut target = replaced.join(format!("{name}-{stamp}"));
    let mut again = 1;
    while target.exists() {
        target = replaced.join(format!("{name}-{stamp}-{again}"));
        again += 1;
    }
    std::fs::rename(dir, &target).with_context(|| {
        format!(
            "cannot move {} ({why}) to {}",
            dir.display(),
            target.display()
        )
    })?;
    Ok(target)
}

/// What a run's learner and actors read: the spec's configuration with the
/// checkpoints in the run's own folder.
fn run_config(spec: &RunSpec, dir: &Path) -> Config {
    let mut config = spec.config.clone();
    config.learner.checkpoint_dir = dir.join("checkpoints").display().to_string();
    config
}

/// Whether the `config.toml` in run folder `dir` is `spec`'s
/// configuration, where its checkpoints are aside (the same folder spelt
/// another way, with `--out` relative or absolute, is the same run); None
/// where no configuration was written.
fn written_config_matches(spec: &RunSpec, dir: &Path) -> Option<bool> {
    let written = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok()?;
    let Ok(mut written) = Config::parse_toml(&written, CONFIG_FILE) else {
        return Some(false);
    };
    let mut wanted = spec.config.clone();
    written.learner.checkpoint_dir.clear();
    wanted.learner.checkpoint_dir.clear();
    Some(written.to_toml() == wanted.to_toml())
}

/// The reports on the suite's evaluation grid (every `eval_every_steps`,
/// and the last): a run stopped and resumed also reported where it
/// stopped, and plots line seeds up report by report.
fn on_grid(spec: &RunSpec, mut reports: Vec<Report>) -> Vec<Report> {
    let learner = &spec.config.learner;
    let every = learner.eval_every_steps;
    if every > 0 {
        reports.retain(|r| r.step % every == 0 || r.step == learner.max_steps);
    }
    reports
}

fn describe(point: Option<(u64, f64)>) -> String {
    point.map_or("never".to_owned(), |(step, s)| {
        format!("step {step} / {s:.2} s")
    })
}

/// Whether `reports` reach `max_steps` with a policy that samples: a run
/// whose final policy diverged (its learner failed) is a failed run, and
/// is run again at the next start.
fn finished(spec: &RunSpec, reports: &[Report]) -> bool {
    reports
        .last()
        .is_some_and(|r| r.step >= spec.config.learner.max_steps && r.non_finite_draws == 0)
}

/// Starts one learner with its local actors and waits for it, printing
/// its progress (the latest report) every few seconds. `fresh`: what the
/// folder holds was made with another configuration or by another build
/// (and is set aside); start over. A
/// learner that neither reports (its metrics file grows) nor checkpoints
/// for `stall_timeout` is killed.
fn run_one(
    spec: &RunSpec,
    config: &Config,
    options: &RunOptions,
    dir: &Path,
    label: &str,
    fresh: bool,
) -> anyhow::Result<()> {
    let (learner, stall_timeout) = (&options.learner, options.stall_timeout);
    let config_path = dir.join(CONFIG_FILE);
    // Each run keeps its checkpoints in its own folder: a run cut short
    // resumes from them when the suite is started again. The folder is
    // made durably (its entry synced in its parent) with the file, which is
    // written whole or not at all: a torn one reads as another
    // configuration, and the run would start over, deleting its
    // checkpoints.
    write_atomically(dir, CONFIG_FILE, config.to_toml().as_bytes())
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let metrics = dir.join("metrics.jsonl");
    // Appended to: the log of an earlier try stays for its post-mortem.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("learner.log"))?;
    let mut command = Command::new(learner);
    command
        .arg("--config")
        .arg(&config_path)
        .arg("--metrics")
        .arg(&metrics)
        .arg("--local-actors")
        .arg("--actors")
        .arg(spec.actors.to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if fresh {
        command.arg("--fresh");
    }
    // The run's configuration is its file, exactly: no FLGFN_ variable of
    // this shell changes it behind the file's back.
    for (name, _) in std::env::vars_os() {
        if flgfn_common::config::is_flgfn_variable(&name) {
            command.env_remove(name);
        }
    }
    // A runner killed outright takes its learner (and the learner its
    // actors) along.
    flgfn_common::signals::end_with_parent(&mut command);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", learner.display()))?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    // Progress is a report (the metrics file grows) or a checkpoint (a
    // newer one in the run's folder): a run with a long evaluation
    // interval that still checkpoints is not taken for a hung one.
    let checkpoints = PathBuf::from(&config.learner.checkpoint_dir);
    let progress = || {
        let reported = std::fs::metadata(&metrics).map_or(0, |m| m.len());
        let checkpointed = crate::checkpoint::list(&checkpoints)
            .ok()
            .and_then(|found| found.last().map(|(step, _)| *step));
        (reported, checkpointed)
    };
    let mut last_growth = (progress(), Instant::now());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(error) => {
                // Not left running beside the next run, skewing its
                // seconds.
                let _ = child.kill();
                let _ = child.wait();
                return Err(error).with_context(|| format!("{label}: cannot watch its learner"));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = progress();
        if now != last_growth.0 {
            last_growth = (now, Instant::now());
        } else if last_growth.1.elapsed() >= stall_timeout {
            // Its local actors end with it. What it trained since its last
            // checkpoint is lost; the next start resumes from that.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{label}: no report and no checkpoint for {:.0} s (--stall-timeout-s): killed; see {}",
                stall_timeout.as_secs_f64(),
                dir.join("learner.log").display()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            if let Some(report) = read_reports(&metrics).ok().and_then(|r| r.last().cloned()) {
                flgfn_common::outln!(
                    "{label}: step {}/{} wall {:.1} s loss {:.4} ({:.0} s)",
                    report.step,
                    spec.config.learner.max_steps,
                    report.wall_s,
                    report.loss,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    };
    if !status.success() {
        bail!(
            "{label} failed ({status}); see {}",
            dir.join("learner.log").display()
        );
    }
    Ok(())
}

/// Reads a metrics file (JSON lines of [`Report`]).
pub fn read_reports(path: &Path) -> anyhow::Result<Vec<Report>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut reports = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        // (A folder opens, and fails only here.)
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        reports.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a report", path.display(), i + 1))?,
        );
    }
    Ok(reports)
}

/// First report at quality and first at the top-100 ceiling.
pub fn summarise(spec: RunSpec, reports: Vec<Report>) -> anyhow::Result<RunResult> {
    let top_k_ceiling = top_k_ceiling(&spec.config)?;
    let to_quality = reports
        .iter()
        .find(|r| r.at_quality == Some(true))
        .map(|r| (r.step, r.wall_s));
    let to_top_k = top_k_ceiling.and_then(|ceiling| {
        reports
            .iter()
            .find(|r| r.top100_mean_reward >= TOP_K_FRACTION * ceiling)
            .map(|r| (r.step, r.wall_s))
    });
    Ok(RunResult {
        spec,
        reports,
        to_quality,
        to_top_k,
        top_k_ceiling,
        record: RunRecord::default(),
    })
}

/// The exact top-100 mean reward of `config`'s task, where known. Rewards
/// beyond f64 (a custom task's energies below -709) give an infinite
/// ceiling, which the saturated sampled figure could never reach: not
/// compared, as for a task without a reference.
fn top_k_ceiling(config: &Config) -> anyhow::Result<Option<f64>> {
    Ok(tasks::build(&config.task)?
        .reference()
        .and_then(|r| r.best_mean_reward(crate::evaluator::TOP_K))
        .filter(|ceiling| ceiling.is_finite()))
}

/// A CSV field, quoted where it must be (group names hold commas:
/// "small, 0% truncated").
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn opt(value: Option<f64>) -> String {
    value.map_or(String::new(), |v| format!("{v}"))
}

/// `reports.csv`: every report on the evaluation grid of every run (a
/// stop's report off the grid is left out, as in the tables).
pub fn reports_csv(results: &[RunResult]) -> String {
    let mut out = String::from(
        "run,group,curve,seed,step,wall_s,loss,logz_est,logz_sampled,logz_sampled_ess,logz_exact,marginal_tv,energy_w1,exact_tv,exact_kl,top100_mean_reward_eval,top100_mean_reward,at_quality,trained_transitions,trained_per_s,mean_policy_lag,truncated_fraction,skipped_batches\n",
    );
    for result in results {
        let s = &result.spec;
        for r in &result.reports {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                field(&s.name()),
                field(&s.group),
                field(&s.curve),
                s.seed,
                r.step,
                r.wall_s,
                r.loss,
                r.logz_est,
                r.logz_sampled,
                r.logz_sampled_ess,
                opt(r.logz_exact),
                opt(r.marginal_tv),
                opt(r.energy_w1),
                opt(r.exact_tv),
                opt(r.exact_kl),
                r.top100_mean_reward_eval,
                r.top100_mean_reward,
                r.at_quality.map_or(String::new(), |q| q.to_string()),
                r.trained_transitions,
                r.trained_per_s,
                r.mean_policy_lag,
                r.truncated_fraction,
                r.skipped_batches,
            );
        }
    }
    out
}

/// `summary.csv`: one row per run, the runs in `failed` (a learner that
/// diverged, a run cut short) too, with `failed` 1 and nothing else
/// measured: a table read from it never rests on fewer seeds unawares.
/// `final_at_quality`: the last report is at quality (1), or not (0);
/// `learner_failed`: the learner failed after its last report (1);
/// `builds`: the builds that trained the run. Runs in `pending` (tables
/// written while a suite runs, or of one stopped midway) have their rows
/// too, with `pending` 1 and nothing measured.
pub fn summary_csv(results: &[RunResult], failed: &[RunSpec], pending: &[RunSpec]) -> String {
    let mut out = String::from(
        "run,group,curve,seed,steps,wall_s,steps_to_quality,seconds_to_quality,steps_to_top100,seconds_to_top100,top100_ceiling,final_logz_error,final_marginal_tv,final_energy_w1,final_exact_tv,final_at_quality,learner_failed,builds,pending,failed\n",
    );
    for result in results {
        let s = &result.spec;
        let last = result.reports.last().cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},0,0",
            field(&s.name()),
            field(&s.group),
            field(&s.curve),
            s.seed,
            last.step,
            last.wall_s,
            opt(result.to_quality.map(|q| q.0 as f64)),
            opt(result.to_quality.map(|q| q.1)),
            opt(result.to_top_k.map(|q| q.0 as f64)),
            opt(result.to_top_k.map(|q| q.1)),
            opt(result.top_k_ceiling),
            opt(last.logz_exact.map(|e| (last.logz_est - e).abs())),
            opt(last.marginal_tv),
            opt(last.energy_w1),
            opt(last.exact_tv),
            u8::from(result.at_quality_at_end()),
            u8::from(result.record.learner_failed.is_some()),
            field(&result.record.builds_text()),
        );
    }
    for (s, flags) in failed
        .iter()
        .map(|s| (s, "0,1"))
        .chain(pending.iter().map(|s| (s, "1,0")))
    {
        let _ = writeln!(
            out,
            "{},{},{},{},,,,,,,,,,,,,,,{flags}",
            field(&s.name()),
            field(&s.group),
            field(&s.curve),
            s.seed,
        );
    }
    out
}

/// `summary.md`: per group and curve, over seeds: how many reached quality
/// (and how many were still there at their last report) and the top-100
/// ceiling, and the mean (range) of steps and seconds to each among those
/// that did. Runs in `failed` (a learner that diverged, a run cut short)
/// count among the seeds, as not reaching either, and in a column of their
/// own; the final values are the finished runs'. Below the table: the
/// builds that made the runs, and the runs whose learner failed after its
/// last report (their actors may have been fewer: their seconds are not a
/// normal run's).
pub fn summary_markdown(results: &[RunResult], failed: &[RunSpec]) -> String {
    let mut groups: BTreeMap<(&str, &str), Vec<&RunResult>> = BTreeMap::new();
    let mut failures: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    // Each configuration once, in suite order, with a spec of it.
    let mut order: Vec<((&str, &str), &RunSpec)> = Vec::new();
    for spec in results.iter().map(|r| &r.spec).chain(failed) {
        let key = (spec.group.as_str(), spec.curve.as_str());
        if !order.iter().any(|(k, _)| *k == key) {
            order.push((key, spec));
        }
    }
    order.sort_by_key(|(_, spec)| spec.position);
    for r in results {
        groups
            .entry((r.spec.group.as_str(), r.spec.curve.as_str()))
            .or_default()
            .push(r);
    }
    for spec in failed {
        *failures
            .entry((spec.group.as_str(), spec.curve.as_str()))
            .or_default() += 1;
    }
    let mut out = String::from(
        "| group | curve | seeds at quality | steps to quality | seconds to quality | at quality at the end | seeds at top-100 | steps to top-100 | seconds to top-100 | final log Z error | final marginal TV | final energy W1 | final exact TV | failed |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (key, spec) in order {
        let runs = groups.get(&key).map_or(&[][..], Vec::as_slice);
        let failed_here = failures.get(&key).copied().unwrap_or(0);
        let n = runs.len() + failed_here;
        let cell = |values: Vec<f64>, digits: usize| -> String {
            if values.is_empty() {
                return "-".to_owned();
            }
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if values.len() == 1 {
                format!("{mean:.digits$}")
            } else {
                format!("{mean:.digits$} ({lo:.digits$}-{hi:.digits$})")
            }
        };
        let reached = |values: Vec<f64>, digits: usize| -> String {
            if values.is_empty() {
                "never".to_owned()
            } else {
                cell(values, digits)
            }
        };
        let quality: Vec<(u64, f64)> = runs.iter().filter_map(|r| r.to_quality).collect();
        let top: Vec<(u64, f64)> = runs.iter().filter_map(|r| r.to_top_k).collect();
        // (A value a report wrote as null reads back as NaN: not a value.
        // Over fewer finished runs than there are, the cell says so.)
        let last = |f: &dyn Fn(&Report) -> Option<f64>, digits: usize| -> String {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.reports.last().and_then(f))
                .filter(|x| x.is_finite())
                .collect();
            let (k, of) = (values.len(), runs.len());
            let shown = cell(values, digits);
            if k > 0 && k < of {
                format!("{shown} ({k} of {of})")
            } else {
                shown
            }
        };
        // (Of the task, known without a finished run: a configuration
        // whose every seed failed reads 0/n, not "-".)
        let has_ceiling = match runs.first() {
            Some(run) => run.top_k_ceiling.is_some(),
            None => top_k_ceiling(&spec.config).is_ok_and(|c| c.is_some()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}/{n} | {} | {} | {}/{n} | {} | {} | {} | {} | {} | {} | {} | {failed_here} |",
            key.0,
            key.1,
            quality.len(),
            reached(quality.iter().map(|q| q.0 as f64).collect(), 0),
            reached(quality.iter().map(|q| q.1).collect(), 2),
            runs.iter().filter(|r| r.at_quality_at_end()).count(),
            if has_ceiling {
                format!("{}/{n}", top.len())
            } else {
                "-".to_owned()
            },
            reached(top.iter().map(|q| q.0 as f64).collect(), 0),
            reached(top.iter().map(|q| q.1).collect(), 2),
            last(&|r| r.logz_exact.map(|e| (r.logz_est - e).abs()), 3),
            last(&|r| r.marginal_tv, 4),
            last(&|r| r.energy_w1, 4),
            last(&|r| r.exact_tv, 4),
        );
    }
    out.push_str(
        "\nCells: mean (min-max) over seeds. Steps and seconds to quality or to top-100 are over the seeds that reached it (their count in the `seeds at ...` column); final values are each finished run's last report, over those with a finite value (`(k of n)` where fewer).\n",
    );
    let mut builds: Vec<(String, usize)> = Vec::new();
    for result in results {
        let text = result.record.builds_text();
        match builds.iter_mut().find(|(b, _)| *b == text) {
            Some((_, n)) => *n += 1,
            None => builds.push((text, 1)),
        }
    }
    if !builds.is_empty() {
        out.push_str("\nMade by:\n");
        for (build, n) in &builds {
            let _ = writeln!(out, "- {build}: {n} run{}", if *n == 1 { "" } else { "s" });
        }
    }
    let learner_failed: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.record.learner_failed.is_some())
        .collect();
    if !learner_failed.is_empty() {
        out.push_str(
            "\nLearner failed after its last report (its reports are counted above; its seconds may not be a normal run's):\n",
        );
        for r in learner_failed {
            let _ = writeln!(
                out,
                "- {}: {}",
                r.spec.name(),
                r.record.learner_failed.as_deref().unwrap_or_default()
            );
        }
    }
    out
}

/// Writes the tables and plots of `results` (and the count of `failed`
/// runs) under `out`; returns the plot files written. `pending`: runs of
/// the suite not yet done (the tables are rewritten after every run), said
/// at the top of `summary.md` and in rows of `summary.csv` while there are
/// any.
pub fn write_outputs(
    results: &[RunResult],
    failed: &[RunSpec],
    pending: &[RunSpec],
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let remaining = pending.len();
    let mut summary = summary_markdown(results, failed);
    if remaining > 0 {
        summary = format!(
            "**Partial:** {remaining} run{} of the suite not done yet (it is still running, or was stopped: start it again to finish).\n\n{summary}",
            if remaining == 1 { "" } else { "s" }
        );
    }
    // Each whole or not at all: a suite killed here keeps the last tables.
    write_atomically(out, "reports.csv", reports_csv(results).as_bytes())?;
    write_atomically(
        out,
        "summary.csv",
        summary_csv(results, failed, pending).as_bytes(),
    )?;
    write_atomically(out, "summary.md", summary.as_bytes())?;
    let dir = out.join("plots");
    let written = plots::render_groups(results, &dir)?;
    // Figures this drawing did not write (a group whose runs all failed
    // this time, or another suite's that shared the folder) would show
    // runs the tables no longer count.
    plots::remove_figures_except(&dir, &written)?;
    Ok(written)
}

/// Plots one metrics file (a run of `flgfn-learner --metrics FILE`) into
/// `dir`, as `<stem>-steps` and `<stem>-seconds`, PNG and SVG.
pub fn plot_metrics_file(path: &Path, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let reports = read_reports(path)?;
    if reports.is_empty() {
        bail!("{} holds no report", path.display());
    }
    let stem = path
        .file_stem()
        .map_or("run".to_owned(), |s| s.to_string_lossy().into_owned());
    let result = RunResult {
        spec: RunSpec {
            group: stem,
            curve: "run".to_owned(),
            seed: 0,
            actors: 0,
            position: 0,
            config: Config::default(),
        },
        reports,
        to_quality: None,
        to_top_k: None,
        top_k_ceiling: None,
        record: RunRecord::default(),
    };
    plots::render_groups(std::slice::from_ref(&result), dir)
}

/// What a suite's folder was last run with (`OUT/suite.json`), so that
/// `--plot-only` redraws the same runs without the arguments repeated.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SuiteRecord {
    /// The suite's name.
    pub suite: String,
    /// Seeds per configuration.
    pub seeds: u64,
    /// `--steps`, when given (else the suite's default).
    pub steps: Option<u64>,
}

/// Where the record of a suite's folder is kept.
pub const SUITE_RECORD: &str = "suite.json";

impl SuiteRecord {
    /// Writes the record into `out`.
    pub fn save(&self, out: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        write_atomically(out, SUITE_RECORD, text.as_bytes())?;
        Ok(())
    }

    /// The record in `out`, if the runner wrote one there (folders made
    /// before it did have none).
    pub fn load(out: &Path) -> anyhow::Result<Option<Self>> {
        let path = out.join(SUITE_RECORD);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("cannot read {}", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

/// Reads back every run of `specs` already present under `out` (for
/// re-rendering plots without running anything), and the runs of `specs`
/// that did not finish, with why: failed or interrupted, never started,
/// or made with another configuration. The summary counts them among
/// their curve's seeds, so that a table never silently rests on fewer
/// seeds than were asked for.
pub fn load_results(specs: &[RunSpec], out: &Path) -> anyhow::Result<SuiteOutcome> {
    let mut results = Vec::new();
    let mut unfinished = Vec::new();
    let mut any_started = false;
    for spec in specs {
        let dir = out.join("runs").join(spec.name());
        let why = match (
            written_config_matches(spec, &dir),
            read_reports(&dir.join("metrics.jsonl")),
        ) {
            (None, _) => Unfinished::NeverStarted,
            (Some(false), _) => Unfinished::OtherConfiguration,
            (Some(true), Err(_)) => Unfinished::NoReport,
            (Some(true), Ok(reports)) if !finished(spec, &reports) => Unfinished::NotFinished,
            (Some(true), Ok(reports)) => {
                let result = summarise(spec.clone(), on_grid(spec, reports))?;
                let record = RunRecord::load(&dir).unwrap_or_default();
                results.push(RunResult { record, ..result });
                continue;
            }
        };
        any_started |= why.started();
        unfinished.push((spec.clone(), why.to_string()));
    }
    if results.is_empty() && !any_started {
        bail!(
            "no run of these under {} (give the --suite, --seeds and --steps it was run with)",
            out.display()
        );
    }
    for (spec, why) in &unfinished {
        flgfn_common::outln!("{}: {why}; counted as failed", spec.name());
    }
    Ok(SuiteOutcome {
        results,
        failed: unfinished,
    })
}

/// Why a run asked for has no result in the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unfinished {
    /// No folder, or no configuration in it.
    NeverStarted,
    /// Its folder holds another configuration (another `--steps`, or
    /// another suite sharing the folder).
    OtherConfiguration,
    /// Started, but no report: it failed at once, as the runner counted it.
    NoReport,
    /// Failed or interrupted before its last step.
    NotFinished,
}

impl Unfinished {
    /// Whether the run was started with this configuration: with none
    /// such and nothing finished, the folder holds other runs altogether.
    fn started(self) -> bool {
        matches!(self, Unfinished::NoReport | Unfinished::NotFinished)
    }
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unfinished::NeverStarted => "never started",
            Unfinished::OtherConfiguration => "made with another configuration (other --steps?)",
            Unfinished::NoReport => "no report",
            Unfinished::NotFinished => "not finished",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: u64, at_quality: bool, top: f64) -> Report {
        Report {
            step,
            wall_s: step as f64 / 100.0,
            at_quality: Some(at_quality),
            top100_mean_reward: top,
            logz_exact: Some(1.0),
            ..Report::default()
        }
    }

    /// A run is finished by its reports, as a later start and
    /// `--plot-only` judge it, whatever its learner's exit.
    #[test]
    fn a_run_is_judged_by_its_reports() {
        let spec = suite("smoke").unwrap().runs(1, Some(300))[0].clone();
        let complete = || Ok(vec![report(100, false, 0.0), report(300, true, 0.0)]);
        let cut_short = || Ok(vec![report(100, false, 0.0)]);
        let failed = || Err(anyhow::anyhow!("exit status: 1"));
        assert_eq!(judge(&spec, "run", Ok(()), complete()).unwrap().0.len(), 2);
        assert_eq!(
            judge(&spec, "run", failed(), complete()).unwrap().0.len(),
            2
        );
        let error = judge(&spec, "run", Ok(()), cut_short()).unwrap_err();
        assert_eq!(error.to_string(), "run stopped at step 100 of 300");
        let error = judge(&spec, "run", failed(), cut_short()).unwrap_err();
        assert_eq!(error.to_string(), "exit status: 1");
        let none = Err(anyhow::anyhow!("cannot read metrics.jsonl"));
        assert!(judge(&spec, "run", failed(), none).is_err());
        // Reports that reach the end with a diverged final policy: the
        // learner's failure, not a finished run (nor at a later start).
        let mut last = report(300, false, 0.0);
        last.non_finite_draws = 7;
        let diverged = || Ok(vec![report(100, false, 0.0), last.clone()]);
        let error = judge(&spec, "run", failed(), diverged()).unwrap_err();
        assert_eq!(error.to_string(), "exit status: 1");
        assert!(!finished(&spec, &diverged().unwrap()));
    }

    /// A configuration whose every seed failed keeps its place in the
    /// suite, and its top-100 count reads 0 of its seeds: the ceiling is
    /// the task's, known without a finished run.
    #[test]
    fn a_configuration_that_only_failed_keeps_its_row() {
        let specs = suite("paper-sets").unwrap().runs(1, Some(300));
        let (first, second) = (specs[0].clone(), specs[1].clone());
        assert!(first.position < second.position);
        let finished = summarise(second.clone(), vec![report(300, true, 0.1)]).unwrap();
        let table = summary_markdown(&[finished], std::slice::from_ref(&first));
        let rows: Vec<&str> = table
            .lines()
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert!(
            rows[0].starts_with(&format!(
                "| {} | {} | 0/1 | never | never | 0/1 | 0/1 |",
                first.group, first.curve
            )),
            "{table}"
        );
        assert!(
            rows[1].contains(&format!("| {} |", second.curve)),
            "{table}"
        );
    }

    #[test]
    fn a_ceiling_beyond_f64_is_not_compared() {
        let mut spec = suite("lattice").unwrap().runs(1, Some(300))[0].clone();
        let flgfn_common::config::TaskConfig::Lattice(lattice) = &mut spec.config.task else {
            panic!("a lattice suite");
        };
        // Energies down to about -2,400: exp(2,400) overflows.
        lattice.coupling = 100.0;
        let result = summarise(spec, vec![report(100, true, f64::MAX)]).unwrap();
        assert_eq!(result.top_k_ceiling, None);
        assert_eq!(result.to_top_k, None);
        assert!(!summary_csv(&[result], &[], &[]).contains("inf"));
    }

    #[test]
    fn thresholds_are_the_first_report_that_meets_them() {
        let spec = suite("paper-sets").unwrap().runs(1, Some(300))[0].clone();
        let ceiling = 0.263281;
        let reports = vec![
            report(100, false, 0.2),
            report(200, true, 0.99 * ceiling - 1e-4),
            report(300, false, ceiling),
        ];
        let result = summarise(spec, reports).unwrap();
        assert_eq!(result.to_quality, Some((200, 2.0)));
        assert_eq!(result.to_top_k, Some((300, 3.0)));
        assert!((result.top_k_ceiling.unwrap() - ceiling).abs() < 1e-5);
        let table = summary_markdown(std::slice::from_ref(&result), &[]);
        // At quality at 200, not at the last report (300).
        assert!(table.contains("| 1/1 | 200 | 2.00 | 0/1 |"), "{table}");
        // A failed run of the same curve counts among its seeds, and a
        // value written as null (NaN here) is left out of the finals.
        let mut result = result;
        result.reports.last_mut().unwrap().marginal_tv = Some(0.05);
        let mut nan = result.clone();
        nan.spec.seed = 1;
        nan.reports.last_mut().unwrap().marginal_tv = Some(f64::NAN);
        let mut failed = result.spec.clone();
        failed.seed = 2;
        let table = summary_markdown(&[result, nan], &[failed]);
        assert!(
            table.contains("| 2/3 | 200 (200-200) | 2.00 (2.00-2.00) |"),
            "{table}"
        );
        assert!(table.contains("| 0.0500 (1 of 2) |"), "{table}");
        assert!(!table.contains("NaN"), "{table}");
        let last_row = table.lines().rfind(|l| l.starts_with('|')).unwrap();
        assert!(last_row.ends_with("| 1 |"), "{table}");
        let csv = reports_csv(std::slice::from_ref(
            &summarise(
                suite("paper-sets").unwrap().runs(1, Some(300))[0].clone(),
                vec![report(100, false, 0.2)],
            )
            .unwrap(),
        ));
        assert_eq!(csv.lines().count(), 2);
        let header = csv.lines().next().unwrap().split(',').count();
        assert_eq!(csv.lines().nth(1).unwrap().split(',').count(), header);
    }

    #[test]
    fn plot_only_counts_every_run_asked_for_that_did_not_finish() {
        let out = std::env::temp_dir().join(format!("flgfn-plot-only-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let specs = suite("paper-sets").unwrap().runs(2, Some(300));
        let (started, never) = (&specs[0], &specs[1]);
        let dir = out.join("runs").join(started.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), run_config(started, &dir).to_toml()).unwrap();
        let SuiteOutcome { results, failed } = load_results(&specs[..2], &out).unwrap();
        assert!(results.is_empty());
        let failed: Vec<(String, &str)> = failed
            .iter()
            .map(|(spec, why)| (spec.name(), why.as_str()))
            .collect();
        // The run never started is counted too: the table must not rest
        // on fewer seeds than asked for without saying so.
        assert_eq!(
            failed,
            [
                (started.name(), "no report"),
                (never.name(), "never started")
            ]
        );
        // Nothing of these runs at all: an error, saying what to give.
        let error = load_results(&specs[1..2], &out).unwrap_err().to_string();
        assert!(error.contains("--suite, --seeds and --steps"), "{error}");
        // Another --steps: the run's folder holds another configuration,
        // and with nothing else of these runs, that is an error too.
        let other = suite("paper-sets").unwrap().runs(2, Some(400));
        assert_eq!(other[0].name(), started.name());
        let error = load_results(&other[..1], &out).unwrap_err().to_string();
        assert!(error.contains("--suite, --seeds and --steps"), "{error}");
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn csv_fields_with_commas_or_quotes_are_quoted() {
        assert_eq!(field("small"), "small");
        assert_eq!(field("small, 0% truncated"), "\"small, 0% truncated\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        let spec = suite("incomplete").unwrap().runs(1, Some(100))[0].clone();
        assert!(spec.group.contains(','), "{}", spec.group);
        let failed = suite("incomplete").unwrap().runs(1, Some(100))[1].clone();
        let csv = summary_csv(
            &[summarise(spec, vec![report(100, false, 0.2)]).unwrap()],
            std::slice::from_ref(&failed),
            &[],
        );
        let rows: Vec<&str> = csv.lines().collect();
        assert!(rows[1].contains(",\"small, 0% truncated\","), "{csv}");
        assert!(rows[1].ends_with(",0"), "{csv}");
        // The failed run has its row, with its seed, flagged.
        let flagged = rows[2];
        assert!(
            flagged.starts_with(&field(&failed.name())) && flagged.ends_with(",1"),
            "{csv}"
        );
        // Every row has every column (the comma in the group quoted).
        let columns = |row: &str| row.replace(&field(&failed.group), "g").split(',').count();
        assert_eq!(columns(rows[0]), columns(flagged), "{csv}");
    }

    /// The tables say which builds made their figures, and which runs'
    /// learners failed after their last report; `summary.csv` has both,
    /// and whether each run ended at quality, per run.
    #[test]
    fn the_tables_name_builds_and_learner_failures() {
        let specs = suite("smoke").unwrap().runs(2, Some(300));
        let result = |spec: &RunSpec, builds: &[&str], failed: Option<&str>| RunResult {
            record: RunRecord {
                builds: builds.iter().map(|b| (*b).to_owned()).collect(),
                learner_failed: failed.map(str::to_owned),
            },
            ..summarise(
                spec.clone(),
                vec![report(100, true, 0.0), report(300, true, 0.0)],
            )
            .unwrap()
        };
        let results = [
            result(&specs[0], &["b1"], None),
            result(&specs[1], &["b1"], Some("1 local actor(s) failed")),
            result(&specs[2], &["b0", "b1"], None),
            result(&specs[3], &[], None),
        ];
        let table = summary_markdown(&results, &[]);
        for line in [
            "- b1: 2 runs",
            "- b0 + b1: 1 run",
            "- unrecorded: 1 run",
            &format!("- {}: 1 local actor(s) failed", specs[1].name()),
        ] {
            assert!(table.contains(line), "{line} in\n{table}");
        }
        assert!(
            table.contains("| 2/2 | 100 (100-100) | 1.00 (1.00-1.00) | 2/2 |"),
            "{table}"
        );
        let csv = summary_csv(&results, &[], std::slice::from_ref(&specs[0]));
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let rows: Vec<Vec<&str>> = csv
            .lines()
            .skip(1)
            .map(|r| r.split(',').collect())
            .collect();
        assert_eq!(rows[0][column("final_at_quality")], "1");
        assert_eq!(rows[0][column("learner_failed")], "0");
        assert_eq!(rows[1][column("learner_failed")], "1");
        assert_eq!(rows[2][column("builds")], "b0 + b1");
        assert_eq!(rows[3][column("builds")], "unrecorded");
        assert_eq!(rows[3][column("pending")], "0");
        // A run not done yet has its row, flagged pending, not failed.
        assert_eq!(rows[4][column("run")], specs[0].name());
        assert_eq!(
            (rows[4][column("pending")], rows[4][column("failed")]),
            ("1", "0")
        );
        assert_eq!(rows[4].len(), header.len());
        // Only a run every part of which one build trained is that build's.
        assert!(results[0].record.only_by("b1"));
        assert!(!results[2].record.only_by("b1"));
        assert!(!results[3].record.only_by("b1"));
    }

    /// Every run of every suite reads back as its own configuration: a
    /// round trip that differed would start every run over at every start.
    #[test]
    fn every_suite_run_recognises_its_written_configuration() {
        let out = std::env::temp_dir().join(format!("flgfn-suite-configs-{}", std::process::id()));
        for suite in SUITES {
            for spec in suite.runs(2, None) {
                let dir = out.join(spec.name());
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(CONFIG_FILE), run_config(&spec, &dir).to_toml()).unwrap();
                assert_eq!(
                    written_config_matches(&spec, &dir),
                    Some(true),
                    "{} of {}",
                    spec.name(),
                    suite.name
                );
            }
        }
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn reports_off_the_evaluation_grid_are_left_out() {
        let mut spec = suite("paper-sets").unwrap().runs(1, Some(300))[0].clone();
        spec.config.learner.eval_every_steps = 100;
        let steps: Vec<u64> = on_grid(
            &spec,
            [100, 150, 200, 300].map(|s| report(s, false, 0.0)).to_vec(),
        )
        .iter()
        .map(|r| r.step)
        .collect();
        assert_eq!(steps, [100, 200, 300]);
    }
}
