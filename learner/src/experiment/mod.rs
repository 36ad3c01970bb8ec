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
//!
//! The code:
//! - `mod.rs`: a run's description ([`RunSpec`]), the suite's record,
//!   and plotting a single metrics file;
//! - `suites.rs`: the named suites;
//! - `runner.rs`: running a suite, each run kept, resumed or started over
//!   by what its folder holds ([`run_all`]);
//! - `results.rs`: a run's results read back from its reports;
//! - `tables.rs`: `reports.csv`, `summary.csv` and `summary.md`;
//! - `plots.rs`: the PNG and SVG figures.

pub mod plots;
mod results;
mod runner;
mod suites;
mod tables;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flgfn_common::config::Config;

use crate::durable_file::write_atomically;
pub use results::{RunResult, SuiteOutcome, TOP_K_FRACTION, load_results, read_reports, summarise};
pub use runner::{REPLACED_DIR, RunRecord, SuiteOptions, run_all, suite_build};
pub use suites::{RUNNER_KEYS, SUITES, Suite, suite};
pub use tables::{reports_csv, summary_csv, summary_markdown, write_outputs};

/// One run of a suite.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Plots and tables group runs by this (e.g. the task size).
    pub group: String,
    /// One curve per distinct label within a group (e.g. the objective).
    pub curve: String,
    /// Repeat number, 0, 1, ... (the configuration's `seed` is this times
    /// `SEED_STRIDE`, 2^20).
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

/// The figures' name for several metrics files drawn together.
pub const COMPARED: &str = "compared";

/// Plots metrics files (runs of `flgfn-learner --metrics FILE`) into
/// `dir`, as `<name>-steps` and `<name>-seconds`, PNG and SVG: one file
/// under its own stem; several as curves of one figure, [`COMPARED`],
/// each labelled by what tells its path from the others'
/// (`runs/a/metrics.jsonl` and `runs/b/metrics.jsonl`: `a` and `b`).
pub fn plot_metrics_files(paths: &[PathBuf], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let labels = match paths {
        [] => bail!("no metrics file given"),
        [_] => vec!["run".to_owned()],
        _ => distinguishing_labels(paths)?,
    };
    let group = match paths {
        [path] => path
            .file_stem()
            .map_or("run".to_owned(), |s| s.to_string_lossy().into_owned()),
        _ => COMPARED.to_owned(),
    };
    let mut results = Vec::new();
    for (position, (path, curve)) in paths.iter().zip(labels).enumerate() {
        let reports = read_reports(path)?;
        if reports.is_empty() {
            bail!("{} holds no report", path.display());
        }
        results.push(RunResult {
            spec: RunSpec {
                group: group.clone(),
                curve,
                seed: 0,
                actors: 0,
                position,
                config: Config::default(),
            },
            reports,
            to_quality: None,
            to_top_k: None,
            top_k_ceiling: None,
            quality: None,
            record: RunRecord::default(),
        });
    }
    plots::render_groups(&results, &[], dir)
}

/// Each path without the folders and file name that every path shares
/// (and without `.jsonl`): what tells them apart. Refuses a path given
/// twice (its curves would be drawn as one). Compared as absolute paths,
/// links resolved: `runs/a/m.jsonl` and `./runs/a/m.jsonl` are one file.
fn distinguishing_labels(paths: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let parts: Vec<Vec<String>> = paths
        .iter()
        .map(|path| {
            let resolved = std::fs::canonicalize(path)
                .or_else(|_| std::path::absolute(path))
                .unwrap_or_else(|_| path.clone());
            resolved
                .components()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .collect()
        })
        .collect();
    let shortest = parts.iter().map(Vec::len).min().unwrap_or(0);
    let shared = |at: &dyn Fn(&Vec<String>, usize) -> &String| {
        (0..shortest)
            .take_while(|&i| parts.iter().all(|p| at(p, i) == at(&parts[0], i)))
            .count()
    };
    let prefix = shared(&|p, i| &p[i]);
    // (Each keeps at least one part of its own.)
    let suffix = shared(&|p, i| &p[p.len() - 1 - i]).min(shortest.saturating_sub(prefix + 1));
    let mut labels: Vec<String> = Vec::new();
    for (path, parts) in paths.iter().zip(&parts) {
        let label = parts[prefix..parts.len() - suffix].join("/");
        let label = label.strip_suffix(".jsonl").unwrap_or(&label).to_owned();
        if label.is_empty() || labels.contains(&label) {
            bail!(
                "--plot-metrics: {} is given twice (or as another path to the same name)",
                path.display()
            );
        }
        labels.push(label);
    }
    Ok(labels)
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
    /// `--set` settings, as given (`actor.epsilon=1.0`), in order.
    #[serde(default)]
    pub set: Vec<String>,
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

#[cfg(test)]
mod tests;
