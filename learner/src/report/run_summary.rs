//! The run's summary (`<metrics stem>.summary.json`), written whole beside
//! the metrics file as the run ends: its steps, how it ended, any error,
//! its totals.

use std::path::Path;

use serde::Serialize;

use crate::durable_file::FileError;
use crate::error::LearnerError;

use super::Report;

/// The run's end as one JSON object: the figures of the `training
/// finished` line, once every session has ended (the metrics file's last
/// report is written before, while chunks may still arrive).
#[derive(Debug, Serialize)]
struct RunSummary<'a> {
    steps: u64,
    version: u64,
    /// `error` where the run ended in one.
    ended_by: &'static str,
    /// That error, null otherwise.
    error: Option<&'a str>,
    time_to_quality_s: Option<f64>,
    /// Whether quality was reached at some evaluation; null where the
    /// task has no quality target.
    quality_reached: Option<bool>,
    /// Whether the last evaluation was at quality (a run may fall back).
    at_quality: Option<bool>,
    /// |log Z estimate - exact| at the last evaluation, where known.
    logz_error: Option<f64>,
    untrained_at_stop_transitions: u64,
    /// Chunks that arrived after training ended (`last_report`'s
    /// `rejections.shutting_down`).
    late_chunks: u64,
    /// Calls turned away (see [`Report::refused_calls`]).
    refused_calls: u64,
    /// Every session that ended (the outcome keeps the records of the
    /// first few thousand only).
    sessions: u64,
    failed_local_actors: usize,
    build: &'static str,
    machine: &'a Machine,
    totals: &'a crate::RunTotals,
    /// The last report, its run-long counters (ingested, refused, stale,
    /// weights sent) brought up to date.
    last_report: &'a Report,
}

/// Where this learner process trained: seconds, throughput and time to
/// quality are its machine's, and runs compared from their summaries alone
/// need it. (A resumed run's totals cover its earlier processes too, which
/// may have run elsewhere.)
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    /// The training device, as the `learner listening` line gives it
    /// (`cpu`, `cuda:0`).
    pub device: String,
    /// libtorch intra-op threads the learner was configured with
    /// (`learner.threads`).
    pub torch_threads: usize,
    /// Cores this process could use (its CPU affinity or quota).
    pub cpus: usize,
    /// The host's name, where the system gives one.
    pub host: Option<String>,
}

impl Machine {
    /// This process's machine, training on `device` with `torch_threads`.
    pub fn of(device: tch::Device, torch_threads: usize) -> Machine {
        Machine {
            device: flgfn_common::policy::device_label(device),
            torch_threads,
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty()),
        }
    }
}

/// A run that ended in an error with no accounts to close: how far it
/// got and why it ended.
#[derive(Debug, Serialize)]
struct FailedRunSummary {
    steps: u64,
    ended_by: &'static str,
    error: String,
    build: &'static str,
}

/// How `ended_by` names a run that ended in an error.
const ENDED_BY_ERROR: &str = "error";

/// Writes `outcome`'s summary to `path`, whole or not at all (a temporary
/// file renamed over it); `error` where the run ended in one all the same
/// (every local actor exited).
pub fn write_summary(
    path: &Path,
    outcome: &crate::TrainingOutcome,
    error: Option<&LearnerError>,
) -> Result<(), LearnerError> {
    let error = error.map(cause_chain);
    let report = &outcome.final_report;
    write_json_atomically(
        path,
        &RunSummary {
            steps: outcome.steps,
            version: outcome.version,
            ended_by: match error {
                Some(_) => ENDED_BY_ERROR,
                None => outcome.ended_by.as_str(),
            },
            error: error.as_deref(),
            time_to_quality_s: outcome.time_to_quality_s,
            quality_reached: outcome.quality_reached(),
            at_quality: report.at_quality,
            logz_error: report.logz_error(),
            untrained_at_stop_transitions: outcome.untrained_at_stop_transitions,
            late_chunks: report.late_chunks(),
            refused_calls: report.refused_calls(),
            sessions: outcome.sessions_ended,
            failed_local_actors: outcome.failed_local_actors,
            build: crate::BUILD,
            machine: &outcome.machine,
            totals: &outcome.totals,
            last_report: report,
        },
    )
}

/// Writes the summary of a run that ended in `error` at `step`, its
/// accounts not closed.
pub fn write_failed_summary(
    path: &Path,
    step: u64,
    error: &LearnerError,
) -> Result<(), LearnerError> {
    write_json_atomically(
        path,
        &FailedRunSummary {
            steps: step,
            ended_by: ENDED_BY_ERROR,
            error: cause_chain(error),
            build: crate::BUILD,
        },
    )
}

/// `error: cause: cause...`, as the program's exit line gives it.
fn cause_chain(error: &LearnerError) -> String {
    std::iter::successors(Some(error as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Writes `value` as pretty JSON to `path`, whole or not at all.
fn write_json_atomically(path: &Path, value: &impl Serialize) -> Result<(), LearnerError> {
    let error = |source| LearnerError::Metrics {
        path: path.display().to_string(),
        source,
    };
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| error(e.into()))?;
    text.push(b'\n');
    let (dir, name) = match (crate::durable_file::parent_of(path), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name),
        _ => return Err(error(std::io::Error::other("not a file path"))),
    };
    crate::durable_file::write_atomically(dir, name, &text).map_err(|e| match e {
        // (The path is the error's already.)
        FileError::Io { error: source, .. } => error(source),
        not_a_folder => error(not_a_folder.into()),
    })?;
    Ok(())
}
