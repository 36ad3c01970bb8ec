//! Progress reports: one tracing line and one JSON object per report; the
//! metrics file they go to (locked for the run, an earlier run's reports
//! set aside, a resumed run's cut back to its step); and the run's
//! summary written beside it as the run ends.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::error::LearnerError;
use crate::ingest::IngestStats;

/// Everything a report says. Field names are the JSON keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Training steps done.
    pub step: u64,
    /// Seconds since the first training step: evaluations, checkpoint
    /// writes, reports' own bookkeeping and a stop's wait for data left
    /// out.
    #[serde(deserialize_with = "number_or_null")]
    pub wall_s: f64,
    /// Mean loss over the steps since the previous report that were not
    /// skipped (0 when every one was: see `skipped_batches`).
    #[serde(deserialize_with = "number_or_null")]
    pub loss: f64,
    /// The model's log Z: the flow head at s0, or TB's learned log Z.
    #[serde(deserialize_with = "number_or_null")]
    pub logz_est: f64,
    /// log Z by importance sampling with P_B over the evaluation samples.
    #[serde(deserialize_with = "number_or_null")]
    pub logz_sampled: f64,
    /// Effective sample size of that estimate's weights.
    #[serde(deserialize_with = "number_or_null")]
    pub logz_sampled_ess: f64,
    /// Exact log Z (null when the task has none).
    pub logz_exact: Option<f64>,
    /// Mean marginal total variation against the exact target.
    pub marginal_tv: Option<f64>,
    /// Energy 1-Wasserstein distance against the exact target.
    pub energy_w1: Option<f64>,
    /// Exact TV of the sampler's terminal distribution (enumerable tasks).
    pub exact_tv: Option<f64>,
    /// Exact KL(target || sampler) in nats (enumerable tasks).
    pub exact_kl: Option<f64>,
    /// Mean reward of the best 100 distinct objects sampled by evaluations
    /// so far (depends on how many there were: see `top100_samples`).
    #[serde(deserialize_with = "number_or_null")]
    pub top100_mean_reward: f64,
    /// Evaluation samples `top100_mean_reward` rests on.
    pub top100_samples: u64,
    /// Mean reward of the best 100 distinct objects among this
    /// evaluation's `eval_samples` alone.
    #[serde(deserialize_with = "number_or_null")]
    pub top100_mean_reward_eval: f64,
    /// Whether the quality thresholds hold (null without a reference).
    pub at_quality: Option<bool>,
    /// Transitions trained on so far, whole run (a resumed run's include
    /// its checkpoint's). Those of batches skipped as not finite count
    /// too (knowing which were needs the device: see `skipped_batches`).
    pub trained_transitions: u64,
    /// Of `trained_transitions`, those of the checkpoint this process
    /// resumed from (0 in a run that did not resume). Counters kept by
    /// ingest (ingested, stale, bytes, chunks) start at 0 in each process.
    /// (Absent from metrics files written before it: read as 0.)
    #[serde(default)]
    pub resumed_trained_transitions: u64,
    /// Transitions accepted from actors so far, by this process.
    pub ingested_transitions: u64,
    /// Trained transitions per second of `wall_s` since the previous report.
    #[serde(deserialize_with = "number_or_null")]
    pub trained_per_s: f64,
    /// Ingested transitions per second of `wall_s` since the previous report
    /// (counted when `wall_s` is read, before the evaluation).
    #[serde(deserialize_with = "number_or_null")]
    pub ingested_per_s: f64,
    /// Protobuf bytes of the chunks this process accepted, per transition
    /// it accepted for training (prefixes TB cannot use are in the bytes,
    /// not in the count).
    #[serde(deserialize_with = "number_or_null")]
    pub wire_bytes_per_transition: f64,
    /// Latest published weight version.
    pub version: u64,
    /// Open trajectory streams.
    pub actors_connected: i64,
    /// Mean over transitions trained since the previous report of (the
    /// step that trains them, which is the version it produces, - the
    /// version that sampled them): data sampled with the very weights a
    /// step starts from has lag 1, as `learner.max_policy_lag` counts it.
    #[serde(deserialize_with = "number_or_null")]
    pub mean_policy_lag: f64,
    /// Largest lag of a chunk trained since the previous report (never
    /// above `learner.max_policy_lag`).
    pub max_policy_lag: u64,
    /// Mean transitions per step since the previous report: above
    /// `batch_transitions` when fresh supply exceeds the minimum.
    #[serde(deserialize_with = "number_or_null")]
    pub mean_batch_transitions: f64,
    /// Milliseconds per step since the previous report, waiting for data
    /// left out: the step's compute plus the trainer's fixed cost.
    #[serde(deserialize_with = "number_or_null")]
    pub busy_ms_per_step: f64,
    /// Protobuf bytes of accepted chunks per transition trained by this
    /// process.
    #[serde(deserialize_with = "number_or_null")]
    pub trajectory_bytes_per_trained_transition: f64,
    /// Weight bytes sent to actors per transition trained by this process.
    #[serde(deserialize_with = "number_or_null")]
    pub weight_bytes_per_trained_transition: f64,
    /// Weight versions sent to actors so far (one per grant carrying
    /// weights).
    pub weight_versions_sent: u64,
    /// Versions serialised so far (at most one per version, and only those
    /// an actor needed).
    pub weight_versions_encoded: u64,
    /// Mean milliseconds from a version's publication (or, for a version
    /// older than the session, the session's opening) to its sending with
    /// a credit, into the session's grant queue, over this process.
    #[serde(deserialize_with = "number_or_null")]
    pub publish_to_send_ms: f64,
    /// Credits granted so far (one per chunk an actor was allowed to roll
    /// out).
    pub credits_granted: u64,
    /// Current credit room, in transitions (adapts between one batch and
    /// `max_in_flight_batches` batches).
    pub credit_room_transitions: u64,
    /// Credit room in use, in transitions: a full chunk's for each credit
    /// out, the chunk's own once it arrived, until it is in a batch.
    pub in_flight_transitions: u64,
    /// Resident memory of the process the learner runs in, in MB (in the
    /// scale benchmark that process also hosts the load generator and the
    /// delay proxy, and keeps what earlier scenarios grew to).
    #[serde(deserialize_with = "number_or_null")]
    pub resident_mb: f64,
    /// Fraction of the trajectories trained since the previous report that
    /// were truncated prefixes.
    #[serde(deserialize_with = "number_or_null")]
    pub truncated_fraction: f64,
    /// Fraction of `wall_s` since the previous report the trainer spent
    /// waiting for data: near 1, more actors would help; near 0, the
    /// learner is the bottleneck.
    #[serde(deserialize_with = "number_or_null")]
    pub data_wait_fraction: f64,
    /// Chunks accepted so far (valid, each for a credit).
    #[serde(default)]
    pub accepted_chunks: u64,
    /// Chunks refused as invalid so far (not those that arrived after
    /// training ended: `rejections.shutting_down`).
    pub rejected_chunks: u64,
    /// Chunks actors numbered but never delivered (the gap in their
    /// sequence numbers where they reconnect) so far.
    #[serde(default)]
    pub lost_chunks: u64,
    /// Refusals by reason: chunks (e.g. `invalid_action`, `undecodable`),
    /// handshakes and session openings (`handshake_task_mismatch`,
    /// `session_unknown_actor`, ...), calls and connections turned away
    /// (`unauthenticated`, `too_many_sessions`, `too_many_connections`,
    /// `plain_text_at_tls`, `tls_at_plain_text`, `tls_handshake_failed`).
    #[serde(default)]
    pub rejections: std::collections::BTreeMap<String, u64>,
    /// Transitions dropped as too stale so far.
    pub stale_transitions: u64,
    /// Times an actor's credits were paused because its chunks arrived
    /// already older than `max_policy_lag` (an actor far behind the others).
    #[serde(default)]
    pub session_pauses: u64,
    /// Sessions ended because their actor held a credit without sending
    /// its chunk, or took no grant, for `learner.stall_timeout_s` (a frozen
    /// actor, a cut link); their credits went back to the room.
    #[serde(default)]
    pub stalled_sessions: u64,
    /// `stale_transitions` over `ingested_transitions`.
    #[serde(deserialize_with = "number_or_null")]
    pub stale_fraction: f64,
    /// Transitions of truncated trajectories dropped so far because the
    /// objective cannot learn from them (TB only; 0 for the others).
    pub unusable_truncated_transitions: u64,
    /// Batches skipped so far because their loss or gradients were not
    /// finite (the weights and Adam's moments stay as they were).
    pub skipped_batches: u64,
    /// Draws this evaluation made uniformly because the policy's logits
    /// were not finite at their state: a diverged model, no sampler there
    /// (a final report with any fails the run).
    #[serde(default)]
    pub non_finite_draws: usize,
    /// Number of evaluation samples behind the distribution metrics.
    pub eval_samples: usize,
    /// Seconds the evaluation took (not part of `wall_s`).
    #[serde(deserialize_with = "number_or_null")]
    pub eval_s: f64,
}

/// A number a report wrote: serde_json writes a non-finite one (a log Z
/// estimate from a failed evaluation, say) as `null`, which reads back as
/// NaN instead of making the whole metrics file unreadable.
fn number_or_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

impl Report {
    /// Sets the run-long counters kept by ingest (and the ratios made from
    /// them with `trained_transitions`) to their values now.
    pub fn count_from(&mut self, stats: &IngestStats) {
        let get = IngestStats::get;
        let ingested = get(&stats.accepted_transitions);
        let wire = get(&stats.wire_bytes) as f64;
        // Ingest counts from this process's start: so must the divisor
        // (none trained yet: 0, not the bytes themselves).
        let trained = self
            .trained_transitions
            .saturating_sub(self.resumed_trained_transitions) as f64;
        let per_trained = |bytes: f64| if trained > 0.0 { bytes / trained } else { 0.0 };
        let weight_versions_sent = get(&stats.weight_versions_sent);
        self.ingested_transitions = ingested;
        self.wire_bytes_per_transition = wire / ingested.max(1) as f64;
        self.actors_connected = stats.connected_actors.load(Ordering::Relaxed);
        self.trajectory_bytes_per_trained_transition = per_trained(wire);
        self.weight_bytes_per_trained_transition = per_trained(get(&stats.weight_bytes) as f64);
        self.weight_versions_sent = weight_versions_sent;
        self.publish_to_send_ms =
            get(&stats.publish_to_send_us) as f64 / 1e3 / weight_versions_sent.max(1) as f64;
        self.credits_granted = get(&stats.credits_granted);
        self.accepted_chunks = get(&stats.accepted_chunks);
        self.rejected_chunks = get(&stats.rejected_chunks);
        self.lost_chunks = get(&stats.lost_chunks);
        self.rejections = stats.rejections();
        self.stale_transitions = get(&stats.stale_transitions);
        self.session_pauses = get(&stats.session_pauses);
        self.stalled_sessions = get(&stats.stalled_sessions);
        self.stale_fraction = self.stale_transitions as f64 / ingested.max(1) as f64;
        self.unusable_truncated_transitions = get(&stats.unusable_truncated_transitions);
    }

    /// Logs the report as one line: fields named as in the metrics file
    /// (a log collector reads them from JSON logs as numbers), rounded for
    /// reading (the metrics file keeps every digit). A quality measure the
    /// task has none of is left out, and so is a loss (skipped batches,
    /// stale, refused or lost chunks, stalled sessions) while it is zero.
    pub fn log(&self) {
        let round = |value: f64, digits: i32| {
            let scale = 10f64.powi(digits);
            (value * scale).round() / scale
        };
        let measure = |value: Option<f64>| value.map(|value| round(value, 4));
        let nonzero = |count: u64| (count > 0).then_some(count);
        tracing::info!(
            step = self.step,
            wall_s = round(self.wall_s, 2),
            loss = round(self.loss, 4),
            logz_est = round(self.logz_est, 3),
            logz_exact = measure(self.logz_exact),
            marginal_tv = measure(self.marginal_tv),
            energy_w1 = measure(self.energy_w1),
            exact_tv = measure(self.exact_tv),
            top100_mean_reward = round(self.top100_mean_reward, 5),
            at_quality = self.at_quality,
            trained_per_s = self.trained_per_s.round() as u64,
            ingested_per_s = self.ingested_per_s.round() as u64,
            actors_connected = self.actors_connected,
            mean_policy_lag = round(self.mean_policy_lag, 2),
            data_wait_fraction = round(self.data_wait_fraction, 2),
            mean_batch_transitions = self.mean_batch_transitions.round() as u64,
            version = self.version,
            skipped_batches = nonzero(self.skipped_batches),
            stale_transitions = nonzero(self.stale_transitions),
            rejected_chunks = nonzero(self.rejected_chunks),
            lost_chunks = nonzero(self.lost_chunks),
            stalled_sessions = nonzero(self.stalled_sessions),
            "report"
        );
    }
}

/// This process's resident memory in MB (Linux; 0 elsewhere).
pub fn resident_mb() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<f64>().ok());
    // Every Linux flgfn targets uses 4 KiB pages.
    pages.map_or(0.0, |pages| pages * 4096.0 / 1e6)
}

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
    untrained_at_stop_transitions: u64,
    sessions: usize,
    failed_local_actors: usize,
    build: &'static str,
    totals: &'a crate::RunTotals,
    /// The last report, its run-long counters (ingested, refused, stale,
    /// weights sent) brought up to date.
    last_report: &'a Report,
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
            untrained_at_stop_transitions: outcome.untrained_at_stop_transitions,
            sessions: outcome.sessions.len(),
            failed_local_actors: outcome.failed_local_actors,
            build: crate::BUILD,
            totals: &outcome.totals,
            last_report: &outcome.final_report,
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
        (Some(dir), Some(name)) => (dir, name.to_string_lossy()),
        _ => return Err(error(std::io::Error::other("not a file path"))),
    };
    crate::durable_file::write_atomically(dir, &name, &text).map_err(|e| error(e.into()))?;
    Ok(())
}

/// Appends reports to a JSON-lines file, one flushed line each, so a crash
/// loses at most the report being written.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    out: BufWriter<File>,
    /// A file of its own, not a stream, a pipe or a device: the run's
    /// summary goes beside it.
    plain_file: bool,
}

/// The leading whole lines of a metrics file whose reports are at or
/// before `step` (a line that is not a report is kept).
fn reports_up_to(contents: &[u8], step: u64) -> &[u8] {
    let mut end = 0;
    for line in contents.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        let past = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|report| report.get("step").and_then(serde_json::Value::as_u64))
            .is_some_and(|at| at > step);
        if past {
            break;
        }
        end += line.len();
    }
    &contents[..end]
}

/// How every line of a metrics file starts (`step` is a report's first
/// field).
const REPORT_START: &[u8] = b"{\"step\":";

/// Whether `path` names a stream rather than a file of its own:
/// `/dev/stdout`, `/dev/fd/N` and the like, or a link into `/dev` or
/// `/proc` (each link followed, up to a few).
fn is_stream(path: &Path) -> bool {
    let mut at = path.to_path_buf();
    for _ in 0..8 {
        if at.starts_with("/dev") || at.starts_with("/proc") {
            return true;
        }
        match std::fs::read_link(&at) {
            Ok(target) => {
                at = match at.parent() {
                    Some(parent) => parent.join(target),
                    None => target,
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// Writes `contents` (an earlier run's reports) beside the file they came
/// from (a link's target: its history stays in one place), as
/// `<file>.<n>`, one past the highest number there (the highest is the
/// newest), synced before that file is cut. Returns where.
fn set_aside(path: &Path, contents: &[u8]) -> std::io::Result<PathBuf> {
    let file = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let folder = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    // Numbers of plain ASCII digits after `<file>.`, compared as bytes
    // (a name need not be UTF-8).
    let name = file.file_name().unwrap_or_default().as_bytes().to_vec();
    let highest = std::fs::read_dir(&folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.file_name();
            let digits = entry
                .as_bytes()
                .strip_prefix(name.as_slice())?
                .strip_prefix(b".")?;
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(digits).ok()?.parse::<u32>().ok()
        })
        .max()
        .unwrap_or(0);
    let cannot = |beside: &Path, why: std::io::Error| {
        std::io::Error::new(
            why.kind(),
            format!(
                "cannot keep the reports it holds in {} ({why}), and leaves them: give --metrics a new path",
                beside.display()
            ),
        )
    };
    let first = highest.checked_add(1).ok_or_else(|| {
        std::io::Error::other(format!(
            "{}.{highest} is the highest number there: give --metrics a new path",
            file.display()
        ))
    })?;
    for number in first..=u32::MAX {
        let mut numbered = file.as_os_str().to_owned();
        numbered.push(format!(".{number}"));
        let beside = PathBuf::from(numbered);
        let mut copy = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&beside)
        {
            Ok(copy) => copy,
            // (Made meanwhile.)
            Err(taken) if taken.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(other) => return Err(cannot(&beside, other)),
        };
        if let Err(error) = copy.write_all(contents).and_then(|()| copy.sync_all()) {
            // No half copy left to be taken for the reports.
            drop(copy);
            let _ = std::fs::remove_file(&beside);
            return Err(cannot(&beside, error));
        }
        return Ok(beside);
    }
    Err(std::io::Error::other("no free name to keep its reports in"))
}

impl MetricsFile {
    /// Opens the file: with `resumed_at` (a run resuming at that step), it
    /// keeps the reports up to that step and appends; otherwise it
    /// moves what it holds to `<path>.<n>` (see [`set_aside`]) and
    /// empties it. Reports past the step a run resumes at describe
    /// training that is done again (the learner stopped after its last
    /// checkpoint): they go, so steps only ever increase. A last line torn
    /// by a crash goes too, so every line stays one JSON object.
    ///
    /// A plain file (or a link to one) is locked for the run, and checked
    /// before anything in it is cut: a second learner given the same path
    /// would empty the first one's reports while the first wrote on at its
    /// old offset, and a path given by mistake (`--metrics job.toml`) would
    /// lose the file. A pipe, a device or a stream (`/dev/stdout`, even
    /// where it is redirected to a file: `>> runs.jsonl` holds other runs'
    /// reports, a batch job's output other lines) is appended to as it is:
    /// reading it would block or read the terminal, and two runs may well
    /// share one.
    pub fn open(path: &Path, resumed_at: Option<u64>) -> Result<Self, LearnerError> {
        let error = |source| LearnerError::Metrics {
            path: path.display().to_string(),
            source,
        };
        let plain_file = match std::fs::metadata(path) {
            Ok(_) if is_stream(path) => false,
            Ok(metadata) => metadata.is_file(),
            // Created below, as a plain file, in folders made for it (as
            // the checkpoint folder is).
            Err(missing) if missing.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(error)?;
                }
                true
            }
            Err(other) => return Err(error(other)),
        };
        if !plain_file {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(error)?;
            return Ok(MetricsFile {
                path: path.to_owned(),
                out: BufWriter::new(file),
                plain_file,
            });
        }
        // Not truncated on opening: the lock and the contents come first.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(error(std::io::Error::other(
                    "another process is writing its reports to this file (a second learner given the same --metrics?): give each run its own metrics file",
                )));
            }
            // A file system without working locks (NFS without its lock
            // daemon: ENOLCK): written unguarded, as the checkpoint
            // folder's lock does.
            Err(std::fs::TryLockError::Error(why)) => {
                tracing::warn!(path = %path.display(), error = %why, "cannot lock the metrics file; make sure no other learner writes to it");
            }
        }
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).map_err(error)?;
        // Every report is a JSON object whose first field is its step.
        if !contents.is_empty() && !contents.starts_with(REPORT_START) {
            return Err(error(std::io::Error::other(
                "it holds something other than metrics (it does not start with a report, `{\"step\":`), and is left as it is: give --metrics a new path, or remove the file",
            )));
        }
        let kept = resumed_at.map_or(0, |step| reports_up_to(&contents, step).len());
        let mut set_aside_as = None;
        // In place (one truncation, the kept reports untouched), so that
        // the lock and any link stay.
        if kept < contents.len() {
            let dropped = contents[kept..].iter().filter(|&&b| b == b'\n').count();
            match resumed_at {
                // Training that is done again: its reports are replaced
                // by the new ones.
                Some(step) => {
                    tracing::info!(path = %path.display(), dropped, "metrics: dropped the reports after step {step}, where the run resumed")
                }
                // Another run's reports (`deploy/local.sh` always starts
                // fresh; a mistyped --checkpoint-dir finds nothing to
                // resume): kept, beside, before the file is cut.
                None => {
                    let beside = set_aside(path, &contents).map_err(error)?;
                    tracing::warn!(path = %path.display(), reports = dropped, moved_to = %beside.display(), "metrics: a fresh run starts this file over; the reports it held were moved (give each run its own --metrics path)");
                    set_aside_as = beside.extension().map(ToOwned::to_owned);
                }
            }
            file.set_len(kept as u64).map_err(error)?;
        }
        file.seek(std::io::SeekFrom::End(0)).map_err(error)?;
        let metrics = MetricsFile {
            path: path.to_owned(),
            out: BufWriter::new(file),
            plain_file,
        };
        metrics.retire_summary(set_aside_as.as_deref())?;
        Ok(metrics)
    }

    /// Takes an earlier run's summary out of the way, so that a summary
    /// found beside the file is always this run's end (a learner killed
    /// outright writes none): numbered as its reports were set aside
    /// (`run.summary.json.3` beside `run.jsonl.3`), or removed (a resumed
    /// run's end writes it again; a file that held no reports had no run
    /// worth it).
    fn retire_summary(&self, set_aside_as: Option<&std::ffi::OsStr>) -> Result<(), LearnerError> {
        let Some(summary) = self.summary_path() else {
            return Ok(());
        };
        let retired = match set_aside_as {
            Some(number) => {
                let mut numbered = summary.clone().into_os_string();
                numbered.push(".");
                numbered.push(number);
                std::fs::rename(&summary, numbered)
            }
            None => std::fs::remove_file(&summary),
        };
        match retired {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LearnerError::Metrics {
                path: summary.display().to_string(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Where the run's summary is written: beside a plain file,
    /// `run.jsonl` giving `run.summary.json`; nowhere for a stream, a pipe
    /// or a device (`/dev/stdout`), whose folder is not the run's.
    pub fn summary_path(&self) -> Option<PathBuf> {
        self.plain_file
            .then(|| self.path.with_extension("summary.json"))
    }

    /// Makes the reports written so far durable (each is flushed as it is
    /// written; this waits for the disk). A stream is not synced.
    pub fn sync(&self) -> Result<(), LearnerError> {
        match self.out.get_ref().sync_data() {
            Ok(()) => Ok(()),
            // A pipe, a terminal, /dev/null: nothing to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            Err(source) => Err(LearnerError::Metrics {
                path: self.path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes one JSON object and a newline.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<(), LearnerError> {
        let error = |source| LearnerError::Metrics {
            path: self.path.display().to_string(),
            source,
        };
        serde_json::to_writer(&mut self.out, record).map_err(|e| error(e.into()))?;
        self.out.write_all(b"\n").map_err(error)?;
        self.out.flush().map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed run's summary names its error with the causes, as the
    /// exit line does (`{:#}`), and where it got to.
    #[test]
    fn a_failed_run_summary_names_the_error_and_its_causes() {
        let dir = std::env::temp_dir().join(format!("flgfn-failed-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.summary.json");
        let error = LearnerError::Metrics {
            path: "run.jsonl".to_owned(),
            source: std::io::Error::other("No space left on device"),
        };
        write_failed_summary(&path, 812, &error).unwrap();
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            summary["error"],
            format!("{:#}", anyhow::Error::from(error)),
            "{summary}"
        );
        assert_eq!(
            summary["error"],
            "cannot write metrics file run.jsonl: No space left on device"
        );
        assert_eq!(summary["ended_by"], "error");
        assert_eq!(summary["steps"], 812);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_non_finite_number_reads_back_as_nan() {
        let report = Report {
            loss: 0.5,
            logz_est: f64::NAN,
            busy_ms_per_step: f64::INFINITY,
            ..Report::default()
        };
        let line = serde_json::to_string(&report).unwrap();
        assert!(line.contains("\"logz_est\":null"), "{line}");
        let back: Report = serde_json::from_str(&line).unwrap();
        assert_eq!(back.loss, 0.5);
        assert!(back.logz_est.is_nan() && back.busy_ms_per_step.is_nan());
    }

    #[test]
    fn bytes_per_trained_transition_count_what_this_process_trained() {
        let stats = IngestStats::default();
        stats.wire_bytes.store(6_000, Ordering::Relaxed);
        stats.weight_bytes.store(30_000, Ordering::Relaxed);
        // 1,000 trained before the resume, 3,000 by this process.
        let mut report = Report {
            trained_transitions: 4_000,
            resumed_trained_transitions: 1_000,
            ..Report::default()
        };
        report.count_from(&stats);
        assert_eq!(report.trajectory_bytes_per_trained_transition, 2.0);
        assert_eq!(report.weight_bytes_per_trained_transition, 10.0);
        // Resumed, and nothing trained since: 0, not infinite (nor the
        // bytes over what an earlier process trained).
        report.trained_transitions = 1_000;
        report.count_from(&stats);
        assert_eq!(report.trajectory_bytes_per_trained_transition, 0.0);
        assert_eq!(report.weight_bytes_per_trained_transition, 0.0);
    }

    #[test]
    fn a_resumed_run_keeps_the_reports_up_to_its_step_and_appends() {
        let dir = std::env::temp_dir().join(format!("flgfn-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let line = |step: u64| format!("{{\"step\":{step},\"loss\":1.0}}\n");
        // Reports to step 300, then a line torn by a crash; the run resumes
        // from its checkpoint at step 200.
        let before = format!("{}{}{}{{\"step\":4", line(100), line(200), line(300));
        std::fs::write(&path, before).unwrap();
        let mut metrics = MetricsFile::open(&path, Some(200)).unwrap();
        metrics
            .write(&Report {
                step: 250,
                ..Report::default()
            })
            .unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [100, 200, 250]);
        drop(metrics);
        // Without a step to resume at, the file starts over.
        drop(MetricsFile::open(&path, None).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A link to a plain file: trimmed through the link, which stays.
    #[test]
    fn a_resumed_run_trims_through_a_link_without_replacing_it() {
        let dir = std::env::temp_dir().join(format!("flgfn-metrics-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("kept.jsonl");
        let link = dir.join("metrics.jsonl");
        std::fs::write(&target, "{\"step\":300}\n").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mut metrics = MetricsFile::open(&link, Some(200)).unwrap();
        metrics
            .write(&Report {
                step: 250,
                ..Report::default()
            })
            .unwrap();
        drop(metrics);
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let text = std::fs::read_to_string(&target).unwrap();
        assert!(text.starts_with("{\"step\":250,"), "{text}");
        assert_eq!(text.lines().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh run given another run's metrics file keeps those reports,
    /// moved beside it, each run's in a file of its own.
    #[test]
    fn a_fresh_run_moves_the_reports_it_finds_beside_its_file() {
        let dir = std::env::temp_dir().join(format!("flgfn-metrics-aside-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.jsonl");
        let first = "{\"step\":100}\n{\"step\":200}\n";
        std::fs::write(&path, first).unwrap();
        let mut metrics = MetricsFile::open(&path, None).unwrap();
        metrics
            .write(&Report {
                step: 5,
                ..Report::default()
            })
            .unwrap();
        drop(metrics);
        let second = std::fs::read_to_string(&path).unwrap();
        assert!(second.starts_with("{\"step\":5,"), "{second}");
        assert_eq!(second.lines().count(), 1);
        assert_eq!(
            std::fs::read_to_string(dir.join("run.jsonl.1")).unwrap(),
            first
        );
        // The next fresh run: the next free name, the summary of the run
        // set aside numbered as its reports.
        let summary = dir.join("run.summary.json");
        std::fs::write(&summary, "{}").unwrap();
        drop(MetricsFile::open(&path, None).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("run.jsonl.2")).unwrap(),
            second
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert!(!summary.exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("run.summary.json.2")).unwrap(),
            "{}"
        );
        // An empty file has nothing to keep; a resumed run keeps its own
        // reports, and its summary is written again at its end.
        drop(MetricsFile::open(&path, None).unwrap());
        std::fs::write(&path, "{\"step\":100}\n").unwrap();
        std::fs::write(&summary, "{}").unwrap();
        drop(MetricsFile::open(&path, Some(100)).unwrap());
        assert!(!dir.join("run.jsonl.3").exists());
        assert!(!summary.exists() && !dir.join("run.summary.json.3").exists());
        // One past the highest, whatever was deleted below it.
        std::fs::remove_file(dir.join("run.jsonl.1")).unwrap();
        drop(MetricsFile::open(&path, None).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("run.jsonl.3")).unwrap(),
            "{\"step\":100}\n"
        );
        // Through a link: beside its target.
        let target = dir.join("target.jsonl");
        std::fs::write(&target, "{\"step\":7}\n").unwrap();
        let link = dir.join("link.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        drop(MetricsFile::open(&link, None).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("target.jsonl.1")).unwrap(),
            "{\"step\":7}\n"
        );
        assert!(!dir.join("link.jsonl.1").exists());
        // Only plain numbers count; past the largest, refused.
        std::fs::write(dir.join("run.jsonl.+9"), "").unwrap();
        std::fs::write(&path, "{\"step\":1}\n").unwrap();
        drop(MetricsFile::open(&path, None).unwrap());
        assert!(dir.join("run.jsonl.4").exists());
        std::fs::write(dir.join("run.jsonl.4294967295"), "").unwrap();
        std::fs::write(&path, "{\"step\":2}\n").unwrap();
        let refused = MetricsFile::open(&path, None).err().unwrap();
        let said = format!("{:#}", anyhow::Error::from(refused));
        assert!(said.contains("is the highest number there"), "{said}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":2}\n");
        // Where nothing can be written beside it (here a name one past
        // the longest a file may have), the file is left whole.
        let long = dir.join(format!("{}.jsonl", "m".repeat(248)));
        std::fs::write(&long, "{\"step\":9}\n").unwrap();
        let refused = MetricsFile::open(&long, None).err().unwrap();
        let said = format!("{:#}", anyhow::Error::from(refused));
        assert!(said.contains("cannot keep the reports"), "{said}");
        assert_eq!(std::fs::read_to_string(&long).unwrap(), "{\"step\":9}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A metrics file in folders that do not exist yet: they are made.
    #[test]
    fn the_folders_of_a_new_metrics_file_are_made() {
        let dir =
            std::env::temp_dir().join(format!("flgfn-metrics-folders-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("runs/a/metrics.jsonl");
        let mut metrics = MetricsFile::open(&path, None).unwrap();
        metrics.write(&Report::default()).unwrap();
        drop(metrics);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Not a plain file: appended to, never read (a pipe would block).
    #[test]
    fn a_device_is_appended_to_as_it_is() {
        for resumed_at in [None, Some(10)] {
            let mut metrics = MetricsFile::open(Path::new("/dev/null"), resumed_at).unwrap();
            metrics.write(&Report::default()).unwrap();
            // Two runs may share one.
            drop(MetricsFile::open(Path::new("/dev/null"), None).unwrap());
        }
    }

    /// A stream redirected to a file (`--metrics /dev/stdout >> out`):
    /// appended to, its other lines kept, whether resumed or not.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_stream_redirected_to_a_file_is_appended_to_as_it_is() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("flgfn-metrics-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("job.out");
        std::fs::write(&out, "job started\n{\"step\":900}\n").unwrap();
        let held = std::fs::File::open(&out).unwrap();
        let stream = PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
        for resumed_at in [None, Some(10)] {
            let mut metrics = MetricsFile::open(&stream, resumed_at).unwrap();
            metrics.write(&Report::default()).unwrap();
        }
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("job started\n{\"step\":900}\n{"), "{text}");
        assert_eq!(text.lines().count(), 4, "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_writer_is_refused_and_the_first_ones_reports_stay() {
        let dir = std::env::temp_dir().join(format!("flgfn-metrics-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let mut first = MetricsFile::open(&path, None).unwrap();
        first
            .write(&Report {
                step: 7,
                ..Report::default()
            })
            .unwrap();
        for resumed_at in [None, Some(0)] {
            let refused = MetricsFile::open(&path, resumed_at).err().unwrap();
            let said = format!("{:#}", anyhow::Error::from(refused));
            assert!(said.contains("another process is writing"), "{said}");
        }
        first
            .write(&Report {
                step: 8,
                ..Report::default()
            })
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.starts_with("{\"step\":7,"), "{text}");
        // Free once the first is done.
        drop(first);
        drop(MetricsFile::open(&path, Some(8)).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_holds_no_reports_is_left_as_it_is() {
        let dir = std::env::temp_dir().join(format!("flgfn-metrics-other-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, job) in [
            ("job.toml", "[learner]\nmax_steps = 5\n"),
            ("config.json", "{\"seeds\": 3}\n"),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, job).unwrap();
            for resumed_at in [None, Some(3)] {
                let refused = MetricsFile::open(&path, resumed_at).err().unwrap();
                let said = format!("{:#}", anyhow::Error::from(refused));
                assert!(
                    said.contains(name) && said.contains("holds something other than metrics"),
                    "{said}"
                );
            }
            assert_eq!(std::fs::read_to_string(&path).unwrap(), job);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
