//! Progress reports: one tracing line and one JSON object per report; the
//! metrics file they go to (locked for the run, an earlier run's reports
//! set aside, a resumed run's cut back to its step); and the run's
//! summary written beside it as the run ends.
//!
//! - `mod.rs`: the [`Report`] and its log line;
//! - `metrics_file.rs`: the [`MetricsFile`];
//! - `run_summary.rs`: the summary ([`write_summary`]).

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::ingest::IngestStats;

mod metrics_file;
mod run_summary;
#[cfg(test)]
mod tests;

pub use metrics_file::MetricsFile;
pub use run_summary::{Machine, write_failed_summary, write_summary};

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
    /// Latest published weight version when the report was made (the
    /// last report comes before the final version is published: with
    /// `learner.publish_every` > 1, or at a stop, the run's summary may
    /// name a later one).
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
    /// objective does not learn from them (TB, or any objective with
    /// `objective.drop_truncated`; 0 otherwise).
    pub unusable_truncated_transitions: u64,
    /// Batches skipped so far because their loss or gradients were not
    /// finite (the weights and Adam's moments stay as they were).
    pub skipped_batches: u64,
    /// Draws this evaluation made uniformly because the policy's logits
    /// were not finite at their state (and such states of the exact pass,
    /// where the task has one): a diverged model, no sampler there (a
    /// final report with any fails the run).
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
        (self.rejections, self.rejected_chunks) = stats.rejections_and_rejected_chunks();
        self.lost_chunks = get(&stats.lost_chunks);
        self.stale_transitions = get(&stats.stale_transitions);
        self.session_pauses = get(&stats.session_pauses);
        self.stalled_sessions = get(&stats.stalled_sessions);
        self.stale_fraction = self.stale_transitions as f64 / ingested.max(1) as f64;
        self.unusable_truncated_transitions = get(&stats.unusable_truncated_transitions);
    }

    /// |log Z estimate - exact log Z|, where the task knows the exact one.
    pub fn logz_error(&self) -> Option<f64> {
        self.logz_exact.map(|exact| (self.logz_est - exact).abs())
    }

    /// |importance-sampled log Z - exact log Z|, where the task has an
    /// exact value (NaN where the estimate was not finite).
    pub fn sampled_logz_error(&self) -> Option<f64> {
        self.logz_exact
            .map(|exact| (self.logz_sampled - exact).abs())
    }

    /// Chunks that arrived after training ended, before their actors
    /// heard (`rejections.shutting_down`): not refused for what they held.
    pub fn late_chunks(&self) -> u64 {
        self.rejections
            .get(crate::error::RequestError::ShuttingDown.reason())
            .copied()
            .unwrap_or(0)
    }

    /// Calls and connections turned away so far, not chunks: handshakes
    /// (another task or model, a protocol version), session openings,
    /// authentication, TLS and the connection limits (`rejections` says
    /// which). An actor refused at its handshake sends no chunk, so
    /// `rejected_chunks` stays 0 however many are turned away.
    pub fn refused_calls(&self) -> u64 {
        let total: u64 = self.rejections.values().sum();
        total.saturating_sub(self.rejected_chunks + self.late_chunks())
    }

    /// Logs the report as one line: fields named as in the metrics file
    /// (a log collector reads them from JSON logs as numbers), rounded for
    /// reading (the metrics file keeps every digit). A quality measure the
    /// task has none of is left out, and so is a loss (skipped batches,
    /// stale, refused or lost chunks, refused calls, stalled sessions)
    /// while it is zero.
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
            refused_calls = nonzero(self.refused_calls()),
            lost_chunks = nonzero(self.lost_chunks),
            stalled_sessions = nonzero(self.stalled_sessions),
            "report"
        );
    }
}

/// Seconds rounded to the millisecond, as log lines give times (the
/// metrics file keeps every digit).
pub fn to_the_millisecond(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// This process's resident memory in MB (Linux; 0 elsewhere).
pub fn resident_mb() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<f64>().ok());
    // Every Linux flgfn targets uses 4 KiB pages.
    pages.map_or(0.0, |pages| pages * 4096.0 / 1e6)
}
