//! The trainer: one OS thread that owns the model and the optimizer.
//!
//! tch tensors are `Send` but not `Sync`, so the `VarStore`, Adam and every
//! tensor stay on this thread. It takes validated chunks from the bounded
//! ingest queue until a batch holds `batch_transitions`, applies the
//! objective, publishes weights every `publish_every` steps (serialised once
//! per version), and evaluates and reports at growing intervals of training
//! time (`first_report_s` up to `report_every_s`).

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

/// A batch being gathered from the queue.
#[derive(Debug, Default)]
struct Batch {
    trajectories: Vec<ReplayedTrajectory>,
    transitions: usize,
    /// Sum over chunks of lag x transitions.
    lag_weighted: f64,
}

/// Where training stands; everything a report is made from.
#[derive(Debug, Default)]
struct Progress {
    step: u64,
    version: u64,
    trained_transitions: u64,
    skipped_batches: u64,
    consecutive_skips: u32,
    window: Window,
    /// Set at the first training step: `wall_s` counts from there.
    started: Option<Instant>,
    /// Evaluation time, left out of `wall_s`.
    eval_time: Duration,
    last_report_wall: f64,
    /// When the next report is due, in `wall_s`.
    next_report_wall: f64,
    last_report_counts: (u64, u64),
    report: Report,
    time_to_quality: Option<f64>,
}

impl Progress {
    /// Seconds of training so far, evaluations left out.
    fn wall(&self) -> f64 {
        self.started.map_or(0.0, |started| {
            (started.elapsed() - self.eval_time).as_secs_f64()
        })
    }
}

impl Trainer {
    /// Trains until `max_steps`, or until `stop` turns true; then publishes
    /// the final weights marked `training_done`.
    pub fn run(mut self) -> Result<TrainingOutcome, LearnerError> {
        let learner = self.config.learner.clone();
        let mut optimizer = nn::Adam::default().build(&self.policy.vars, learner.learning_rate)?;
        let mut evaluator =
            Evaluator::new(self.env.clone(), learner.eval_samples, self.config.seed);
        let mut progress = Progress {
            next_report_wall: learner.first_report_s,
            ..Progress::default()
        };
        let mut batch = Batch::default();
        let finished = |p: &Progress| learner.max_steps > 0 && p.step >= learner.max_steps;
        while !finished(&progress) {
            let wait_started = Instant::now();
            if !self.gather(&mut batch, progress.version) {
                break;
            }
            if progress.started.is_some() {
                progress.window.waiting += wait_started.elapsed();
            }
            progress.started.get_or_insert_with(Instant::now);

            if !self.train_step(&mut optimizer, &batch, &mut progress)? {
                continue;
            }
            if progress.step % learner.publish_every == 0 {
                progress.version = progress.step;
                self.publish(progress.version, false)?;
            }
            let due = progress.wall() >= progress.next_report_wall;
            if due || finished(&progress) {
                self.report(&mut evaluator, &mut progress)?;
            }
        }

        progress.version = progress.step;
        let weights = self.publish(progress.version, true)?;
        Ok(TrainingOutcome {
            steps: progress.step,
            version: progress.version,
            weights,
            final_report: progress.report,
            time_to_quality_s: progress.time_to_quality,
        })
    }

    /// Fills `batch` with whole chunks until it holds `batch_transitions`.
    /// False when the learner stops first.
    fn gather(&mut self, batch: &mut Batch, version: u64) -> bool {
        // Reuse the trajectory vector's allocation across steps.
        batch.trajectories.clear();
        batch.transitions = 0;
        batch.lag_weighted = 0.0;
        while batch.transitions < self.config.learner.batch_transitions {
            let Some(chunk) = self.next_chunk() else {
                return false;
            };
            let lag = version.saturating_sub(chunk.policy_version);
            batch.lag_weighted += lag as f64 * chunk.transitions as f64;
            batch.transitions += chunk.transitions;
            batch.trajectories.extend(chunk.trajectories);
        }
        true
    }

    /// One optimizer step on `batch`. False (and no step) when the loss is
    /// not finite; an error when that keeps happening.
    fn train_step(
        &self,
        optimizer: &mut nn::Optimizer,
        batch: &Batch,
        progress: &mut Progress,
    ) -> Result<bool, LearnerError> {
        let learner = &self.config.learner;
        let dims = (
            self.env.state_dim(),
            self.env.forward_actions(),
            self.env.backward_actions(),
        );
        let tensors = TransitionBatch::new(&batch.trajectories, dims, self.policy.device());
        let output = self.policy.net.forward(&tensors.states);
        let loss = self.objective.loss(&output, &tensors);
        let loss_value = loss.double_value(&[]);
        if !loss_value.is_finite() {
            // Ingest bounds the energies, so this means the model itself
            // diverged. Stepping would make every weight NaN: skip the
            // batch, and give up if it keeps happening.
            progress.skipped_batches += 1;
            progress.consecutive_skips += 1;
            tracing::warn!(progress.skipped_batches, "non-finite loss: batch skipped");
            if progress.consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                return Err(LearnerError::Trainer(format!(
                    "the loss was not finite for {} batches in a row: the model diverged (lower learner.learning_rate?)",
                    progress.consecutive_skips
                )));
            }
            return Ok(false);
        }
        progress.consecutive_skips = 0;
        if learner.max_steps > 0 {
            // Constant for the first half, then linear decay to the final
            // fraction at max_steps: a large rate finds the target fast, a
            // small one settles log Z.
            let done = progress.step as f64 / learner.max_steps as f64;
            let decay = (2.0 * done - 1.0).max(0.0);
            let fraction = 1.0 - (1.0 - learner.final_learning_rate_fraction) * decay;
            optimizer.set_lr(learner.learning_rate * fraction);
        }
        optimizer.backward_step(&loss);

        progress.step += 1;
        progress.trained_transitions += batch.transitions as u64;
        let window = &mut progress.window;
        window.loss_sum += loss_value;
        window.steps += 1;
        window.lag_weighted += batch.lag_weighted;
        window.transitions += batch.transitions as u64;
        window.trajectories += batch.trajectories.len() as u64;
        window.truncated += batch.trajectories.iter().filter(|t| !t.complete).count() as u64;
        Ok(true)
    }

    /// Evaluates the current policy, then logs and writes one report.
    fn report(
        &mut self,
        evaluator: &mut Evaluator,
        progress: &mut Progress,
    ) -> Result<(), LearnerError> {
        let wall = progress.wall();
        let eval_started = Instant::now();
        let evaluation = evaluator.evaluate(&self.policy);
        let eval_s = eval_started.elapsed();
        progress.eval_time += eval_s;

        let stats = &self.stats;
        let ingested = IngestStats::get(&stats.accepted_transitions);
        let wire = IngestStats::get(&stats.wire_bytes);
        let span = (wall - progress.last_report_wall).max(1e-9);
        let (last_trained, last_ingested) = progress.last_report_counts;
        let window = &progress.window;
        let report = Report {
            step: progress.step,
            wall_s: wall,
            loss: window.loss_sum / window.steps.max(1) as f64,
            logz_est: evaluation.log_z_estimate,
            logz_exact: evaluation.log_z_exact,
            marginal_tv: evaluation.marginal_tv,
            energy_w1: evaluation.energy_w1,
            top100_mean_reward: evaluation.top_k_mean_reward,
            at_quality: evaluation.at_quality,
            trained_transitions: progress.trained_transitions,
            ingested_transitions: ingested,
            trained_per_s: (progress.trained_transitions - last_trained) as f64 / span,
            ingested_per_s: (ingested - last_ingested) as f64 / span,
            wire_bytes_per_transition: wire as f64 / ingested.max(1) as f64,
            version: progress.version,
            actors_connected: stats
                .connected_actors
                .load(std::sync::atomic::Ordering::Relaxed),
            mean_policy_lag: window.lag_weighted / window.transitions.max(1) as f64,
            truncated_fraction: window.truncated as f64 / window.trajectories.max(1) as f64,
            data_wait_fraction: (window.waiting.as_secs_f64() / span).min(1.0),
            rejected_chunks: IngestStats::get(&stats.rejected_chunks),
            stale_transitions: IngestStats::get(&stats.stale_transitions),
            unusable_truncated_transitions: IngestStats::get(&stats.unusable_truncated_transitions),
            skipped_batches: progress.skipped_batches,
            eval_samples: self.config.learner.eval_samples,
            eval_s: eval_s.as_secs_f64(),
        };
        report.log();
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.write(&report)?;
        }
        if progress.time_to_quality.is_none() && evaluation.at_quality == Some(true) {
            progress.time_to_quality = Some(wall);
        }
        progress.last_report_wall = wall;
        // Geometric spacing: each gap a quarter of the training time so far,
        // between first_report_s and report_every_s.
        let learner = &self.config.learner;
        let gap = (0.25 * wall).clamp(learner.first_report_s, learner.report_every_s);
        progress.next_report_wall = wall + gap;
        progress.last_report_counts = (progress.trained_transitions, ingested);
        progress.window = Window::default();
        progress.report = report;
        Ok(())
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
