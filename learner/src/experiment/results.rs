//! A run's results read back from its metrics file: its reports on the
//! evaluation grid, steps and seconds to quality and to the top-k ceiling,
//! and the suite's results loaded from a folder (`--plot-only`).

use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, bail};
use flgfn_common::config::Config;
use flgfn_common::env::{Quality, TaskReference};
use flgfn_common::tasks;

use crate::report::Report;

use super::runner::{METRICS_FILE, written_config_matches};
use super::{RunRecord, RunSpec};

/// Fraction of the exact top-100 ceiling a run must reach to count as
/// having found the best objects.
pub const TOP_K_FRACTION: f64 = 0.99;

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
    /// The task's quality thresholds, where it has a reference (drawn in
    /// the plots).
    pub quality: Option<Quality>,
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

/// The reports on the suite's evaluation grid (every `eval_every_steps`,
/// and the last): a run stopped and resumed also reported where it
/// stopped, and plots line seeds up report by report.
pub(super) fn on_grid(spec: &RunSpec, mut reports: Vec<Report>) -> Vec<Report> {
    let learner = &spec.config.learner;
    let every = learner.eval_every_steps;
    if every > 0 {
        reports.retain(|r| r.step % every == 0 || r.step == learner.max_steps);
    }
    reports
}

/// Whether `reports` reach `max_steps` with a policy that samples: a run
/// whose final policy diverged (its learner failed) is a failed run, and
/// is run again at the next start.
pub(super) fn finished(spec: &RunSpec, reports: &[Report]) -> bool {
    reports
        .last()
        .is_some_and(|r| r.step >= spec.config.learner.max_steps && r.non_finite_draws == 0)
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
    let reference = tasks::build(&spec.config.task)?.reference();
    let top_k_ceiling = reference.as_deref().and_then(ceiling_of);
    let quality = reference.as_deref().map(TaskReference::quality);
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
        quality,
        record: RunRecord::default(),
    })
}

/// The exact top-100 mean reward of `config`'s task, where known. Rewards
/// beyond f64 (a custom task's energies below -709) give an infinite
/// ceiling, which the saturated sampled figure could never reach: not
/// compared, as for a task without a reference.
pub(super) fn top_k_ceiling(config: &Config) -> anyhow::Result<Option<f64>> {
    Ok(tasks::build(&config.task)?
        .reference()
        .as_deref()
        .and_then(ceiling_of))
}

/// The finite top-100 ceiling of a task's reference, if it has one.
fn ceiling_of(reference: &dyn TaskReference) -> Option<f64> {
    reference
        .best_mean_reward(crate::evaluator::TOP_K)
        .filter(|ceiling| ceiling.is_finite())
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
            read_reports(&dir.join(METRICS_FILE)),
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
    // A suite run (not redrawn) sets aside the runs of other builds;
    // redrawing takes what is there, and says so where that mixes builds.
    let builds: std::collections::BTreeSet<String> = results
        .iter()
        .map(|result| result.record.builds_text())
        .collect();
    if builds.len() > 1 {
        flgfn_common::outln!(
            "warning: these runs were made by {} builds ({}), drawn together: summary.md counts each one's runs; running the suite again makes those of other builds anew",
            builds.len(),
            builds.into_iter().collect::<Vec<_>>().join("; ")
        );
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
