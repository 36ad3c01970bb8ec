//! The trainer: one OS thread that owns the model and the optimizer.
//!
//! tch tensors are `Send` but not `Sync`, so the `VarStore`, Adam and every
//! tensor stay on this thread. It takes validated chunks from the bounded
//! ingest queue until a batch holds `batch_transitions`, applies the
//! objective, publishes weights every `publish_every` steps (serialised once
//! per version), and evaluates and reports every `report_every_s` seconds of
//! training time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flgfn_common::config::Config;
use flgfn_common::env::Environment;
use flgfn_common::objectives::{Objective, TransitionBatch};
use flgfn_common::policy::Policy;
use flgfn_common::trajectory::ReplayedTrajectory;
use tch::nn::{self, OptimizerConfig};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use crate::error::LearnerError;
use crate::evaluator::Evaluator;
use crate::ingest::{IngestStats, IngestedChunk};
use crate::publisher::{Publisher, WeightsSnapshot};
use crate::report::{MetricsFile, Report};

/// Batches in a row with a non-finite loss before training stops.
const MAX_CONSECUTIVE_SKIPS: u32 = 100;

/// What a finished run hands back.
#[derive(Debug, Clone)]
pub struct TrainingOutcome {
    /// Training steps done.
    pub steps: u64,
    /// Last published version.
    pub version: u64,
    /// The final weights (also the last published snapshot).
    pub weights: Bytes,
    /// The last report.
    pub final_report: Report,
    /// `wall_s` of the first report at quality, if any.
    pub time_to_quality_s: Option<f64>,
}

/// Everything the trainer thread owns.
pub struct Trainer {
    /// Model and its weights; only this thread touches them.
    pub policy: Policy,
    /// The configured loss.
    pub objective: Box<dyn Objective>,
    /// The task, for batch shapes and evaluation.
    pub env: Arc<dyn Environment>,
    /// All settings (the learner section drives the loop).
    pub config: Config,
    /// Validated chunks from the service.
    pub queue: mpsc::Receiver<IngestedChunk>,
    /// Weight broadcast.
    pub publisher: Publisher,
    /// Counters shared with the service.
    pub stats: Arc<IngestStats>,
    /// Where JSON reports go, if anywhere.
    pub metrics: Option<MetricsFile>,
    /// Turns true when the process is asked to stop.
    pub stop: watch::Receiver<bool>,
    /// Runtime used to wait on async channels from this plain thread.
    pub runtime: Handle,
}

/// Running sums between two reports.
#[derive(Debug, Default)]
struct Window {
    loss_sum: f64,
    steps: u64,
    lag_weighted: f64,
    transitions: u64,
    trajectories: u64,
    truncated: u64,
    /// Time spent waiting for data after training started.
    waiting: Duration,
}

impl Trainer {
    /// Trains until `max_steps`, or until `stop` turns true; then publishes
    /// the final weights marked `training_done`.
    pub fn run(mut self) -> Result<TrainingOutcome, LearnerError> {
        let learner = self.config.learner.clone();
        let mut optimizer = nn::Adam::default().build(&self.policy.vars, learner.learning_rate)?;
        let mut evaluator =
            Evaluator::new(self.env.clone(), learner.eval_samples, self.config.seed);
        let dims = (
            self.env.state_dim(),
            self.env.forward_actions(),
            self.env.backward_actions(),
        );
        let device = self.policy.device();

        let mut step = 0u64;
        let mut version = 0u64;
        let mut trained_transitions = 0u64;
        let mut window = Window::default();
        let mut report = Report::default();
        let mut time_to_quality = None;
        // Training time excludes evaluation: `clock` starts at the first step
        // and `eval_time` accumulates what evaluations took.
        let mut clock: Option<Instant> = None;
        let mut eval_time = Duration::ZERO;
        let mut last_report_wall = 0.0;
        let mut last_report_counts = (0u64, 0u64);

        let mut skipped_batches = 0u64;
        let mut consecutive_skips = 0u32;
        let mut batch: Vec<ReplayedTrajectory> = Vec::new();
        loop {
            if learner.max_steps > 0 && step >= learner.max_steps {
                break;
            }
            // Gather whole chunks until the batch is large enough.
            let mut batch_transitions = 0usize;
            let mut lag_weighted = 0.0;
            batch.clear();
            let wait_started = Instant::now();
            while batch_transitions < learner.batch_transitions {
                let Some(chunk) = self.next_chunk() else {
                    break;
                };
                let lag = version.saturating_sub(chunk.policy_version);
                lag_weighted += lag as f64 * chunk.transitions as f64;
                batch_transitions += chunk.transitions;
                batch.extend(chunk.trajectories);
            }
            if *self.stop.borrow() || batch_transitions == 0 {
                break;
            }
            if clock.is_some() {
                window.waiting += wait_started.elapsed();
            }
            let started = *clock.get_or_insert_with(Instant::now);

            let tensors = TransitionBatch::new(&batch, dims, device);
            let output = self.policy.net.forward(&tensors.states);
            let loss = self.objective.loss(&output, &tensors);
            let loss_value = loss.double_value(&[]);
            if !loss_value.is_finite() {
                // Ingest bounds the energies, so this means the model itself
                // diverged. Stepping would make every weight NaN: skip the
                // batch, and give up if it keeps happening.
                skipped_batches += 1;
                consecutive_skips += 1;
                tracing::warn!(skipped_batches, "non-finite loss: batch skipped");
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                    return Err(LearnerError::Trainer(format!(
                        "the loss was not finite for {consecutive_skips} batches in a row: the model diverged (lower learner.learning_rate?)"
                    )));
                }
                continue;
            }
            consecutive_skips = 0;
            if learner.max_steps > 0 {
                // Constant for the first half, then linear decay to the final
                // fraction at max_steps: a large rate finds the target fast,
                // a small one settles log Z.
                let progress = step as f64 / learner.max_steps as f64;
                let decay = (2.0 * progress - 1.0).max(0.0);
                let fraction = 1.0 - (1.0 - learner.final_learning_rate_fraction) * decay;
                optimizer.set_lr(learner.learning_rate * fraction);
            }
            optimizer.backward_step(&loss);
            step += 1;
            trained_transitions += batch_transitions as u64;
            window.loss_sum += loss_value;
            window.steps += 1;
            window.lag_weighted += lag_weighted;
            window.transitions += batch_transitions as u64;
            window.trajectories += batch.len() as u64;
            window.truncated += batch.iter().filter(|t| !t.complete).count() as u64;

            if step % learner.publish_every == 0 {
                version = step;
                self.publish(version, false)?;
            }

            let wall = (started.elapsed() - eval_time).as_secs_f64();
            let last_step = learner.max_steps > 0 && step >= learner.max_steps;
            if wall - last_report_wall >= learner.report_every_s || last_step {
                let eval_started = Instant::now();
                let evaluation = evaluator.evaluate(&self.policy);
                let eval_s = eval_started.elapsed().as_secs_f64();
                eval_time += eval_started.elapsed();

                let ingested = IngestStats::get(&self.stats.accepted_transitions);
                let wire = IngestStats::get(&self.stats.wire_bytes);
                let span = (wall - last_report_wall).max(1e-9);
                report = Report {
                    step,
                    wall_s: wall,
                    loss: window.loss_sum / window.steps.max(1) as f64,
                    logz_est: evaluation.log_z_estimate,
                    logz_exact: evaluation.log_z_exact,
                    marginal_tv: evaluation.marginal_tv,
                    energy_w1: evaluation.energy_w1,
                    top100_mean_reward: evaluation.top_k_mean_reward,
                    at_quality: evaluation.at_quality,
                    trained_transitions,
                    ingested_transitions: ingested,
                    trained_per_s: (trained_transitions - last_report_counts.0) as f64 / span,
                    ingested_per_s: (ingested - last_report_counts.1) as f64 / span,
                    wire_bytes_per_transition: wire as f64 / ingested.max(1) as f64,
                    version,
                    actors_connected: self
                        .stats
                        .connected_actors
                        .load(std::sync::atomic::Ordering::Relaxed),
                    mean_policy_lag: window.lag_weighted / window.transitions.max(1) as f64,
                    truncated_fraction: window.truncated as f64 / window.trajectories.max(1) as f64,
                    data_wait_fraction: (window.waiting.as_secs_f64() / span).min(1.0),
                    rejected_chunks: IngestStats::get(&self.stats.rejected_chunks),
                    stale_transitions: IngestStats::get(&self.stats.stale_transitions),
                    skipped_batches,
                    eval_samples: learner.eval_samples,
                    eval_s,
                };
                report.log();
                if let Some(metrics) = self.metrics.as_mut() {
                    metrics.write(&report)?;
                }
                if time_to_quality.is_none() && evaluation.at_quality == Some(true) {
                    time_to_quality = Some(wall);
                }
                last_report_wall = wall;
                last_report_counts = (trained_transitions, ingested);
                window = Window::default();
            }
        }

        version = step;
        let weights = self.publish(version, true)?;
        Ok(TrainingOutcome {
            steps: step,
            version,
            weights,
            final_report: report,
            time_to_quality_s: time_to_quality,
        })
    }

    /// Serialises the weights once and makes them the latest version.
    fn publish(&self, version: u64, training_done: bool) -> Result<Bytes, LearnerError> {
        let bytes = Bytes::from(self.policy.to_bytes()?);
        self.publisher.publish(WeightsSnapshot {
            version,
            bytes: bytes.clone(),
            training_done,
        });
        Ok(bytes)
    }

    /// The next validated chunk; blocks until one arrives or the learner
    /// stops.
    fn next_chunk(&mut self) -> Option<IngestedChunk> {
        if *self.stop.borrow() {
            return None;
        }
        let (queue, stop) = (&mut self.queue, &mut self.stop);
        self.runtime.block_on(async {
            tokio::select! {
                chunk = queue.recv() => chunk,
                _ = stop.wait_for(|stopped| *stopped) => None,
            }
        })
    }
}
