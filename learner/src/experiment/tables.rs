//! The tables a suite writes: `reports.csv`, `summary.csv` and
//! `summary.md` (and the plots, drawn by `plots.rs`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::durable_file::write_atomically;
use crate::report::Report;

use super::results::top_k_ceiling;
use super::{RunResult, RunSpec, plots};

pub(super) fn describe(point: Option<(u64, f64)>) -> String {
    point.map_or("never".to_owned(), |(step, s)| {
        format!("step {step} / {s:.2} s")
    })
}

/// A CSV field, quoted where it must be (group names hold commas:
/// "small, 0% truncated").
pub(super) fn field(text: &str) -> String {
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
/// `truncated_fraction` is of the trajectories trained: a run that drops
/// prefixes reads 0 there, and what it dropped is in
/// `unusable_truncated_transitions`, beside the `ingested_transitions`
/// taken (the share dropped is unusable / (ingested + unusable)); both
/// count from the learner process's start, so a resumed run's start
/// again.
pub fn reports_csv(results: &[RunResult]) -> String {
    let mut out = String::from(
        "run,group,curve,seed,step,wall_s,loss,logz_est,logz_sampled,logz_sampled_ess,logz_exact,marginal_tv,energy_w1,exact_tv,exact_kl,top100_mean_reward_eval,top100_mean_reward,at_quality,trained_transitions,trained_per_s,mean_policy_lag,truncated_fraction,skipped_batches,ingested_transitions,unusable_truncated_transitions\n",
    );
    for result in results {
        let s = &result.spec;
        for r in &result.reports {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
                r.ingested_transitions,
                r.unusable_truncated_transitions,
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
        "run,group,curve,seed,steps,wall_s,steps_to_quality,seconds_to_quality,steps_to_top100,seconds_to_top100,top100_ceiling,final_top100,final_logz_error,final_sampled_logz_error,final_marginal_tv,final_energy_w1,final_exact_tv,final_at_quality,learner_failed,builds,pending,failed\n",
    );
    for result in results {
        let s = &result.spec;
        let last = result.reports.last().cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},0,0",
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
            opt(Some(last.top100_mean_reward)),
            opt(last.logz_error()),
            opt(last.sampled_logz_error()),
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
            "{},{},{},{},,,,,,,,,,,,,,,,,{flags}",
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
        "| group | curve | seeds at quality | steps to quality | seconds to quality | at quality at the end | seeds at top-100 | steps to top-100 | seconds to top-100 | final top-100 | final log Z error | final sampled log Z error | final marginal TV | final energy W1 | final exact TV | failed |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
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
        // Rewards run from under 1 (small sets) to 1e6 (medium): decimals
        // for the one, none for the other. (A value written as null reads
        // back as NaN: not a value.)
        let largest_top = runs
            .iter()
            .filter_map(|r| r.reports.last())
            .map(|r| r.top100_mean_reward.abs())
            .filter(|v| v.is_finite())
            .fold(0f64, f64::max);
        let top_digits = match largest_top {
            top if top < 10.0 => 4,
            top if top < 1000.0 => 2,
            _ => 0,
        };
        // (Of the task, known without a finished run: a configuration
        // whose every seed failed reads 0/n, not "-".)
        let has_ceiling = match runs.first() {
            Some(run) => run.top_k_ceiling.is_some(),
            None => top_k_ceiling(&spec.config).is_ok_and(|c| c.is_some()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}/{n} | {} | {} | {}/{n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {failed_here} |",
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
            last(&|r| Some(r.top100_mean_reward), top_digits),
            last(&Report::logz_error, 3),
            last(&Report::sampled_logz_error, 3),
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
    let written = plots::render_groups(results, failed, &dir)?;
    // Figures this drawing did not write (a group whose runs all failed
    // this time, or another suite's that shared the folder) would show
    // runs the tables no longer count.
    plots::remove_figures_except(&dir, &written)?;
    Ok(written)
}
