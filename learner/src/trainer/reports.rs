//! The trainer's reports: the window's sums read from the device, the
//! evaluator called, the metrics line and file written, the first report
//! at quality found (time to quality), the run stopped after
//! `MAX_DIVERGED_REPORTS` reports with no finite step, and the next report
//! scheduled.

use std::time::Instant;

use flgfn_common::policy::Policy;
use tch::Tensor;
use tracing::{info, warn};

use super::{Progress, Trainer, divergence_remedy};
use crate::error::LearnerError;
use crate::evaluator::Evaluator;
use crate::quality_probes::QualityProbes;
use crate::report::{Report, to_the_millisecond};

/// Reports in a row whose every step had a non-finite loss before training
/// stops.
const MAX_DIVERGED_REPORTS: u32 = 3;

impl Trainer {
    /// When quality was first reached, found by the report at `report_wall`:
    /// the earliest of the weights kept since the report before that from
    /// which every later copy is at quality, or else that report.
    fn first_at_quality(
        &self,
        evaluator: &Evaluator,
        probes: Option<QualityProbes>,
        report_wall: f64,
    ) -> f64 {
        let Some(probes) = probes else {
            return report_wall;
        };
        let mut scratch: Option<Policy> = None;
        let earliest = probes.earliest_at_quality(|probe| {
            let policy = scratch
                .get_or_insert_with(|| Policy::new(self.policy.spec(), self.policy.device()));
            if let Err(error) = policy.load_weights(&probe.weights.to_host()) {
                warn!(%error, "cannot load weights kept to refine time to quality");
                return false;
            }
            let seed = probe_seed(self.config.seed, probe.step);
            let learned_log_z = probe.learned_log_z.as_ref().map(|z| z.double_value(&[]));
            evaluator.reaches_quality(policy, learned_log_z, seed) == Some(true)
        });
        match earliest {
            Some((wall_s, step)) => {
                // To the millisecond, as the final line gives it.
                info!(
                    wall_s = to_the_millisecond(wall_s),
                    step,
                    report_wall_s = to_the_millisecond(report_wall),
                    "quality first reached between two reports"
                );
                wall_s
            }
            None => report_wall,
        }
    }

    /// Evaluates the current policy, then logs and writes one report.
    pub(super) fn report(
        &mut self,
        evaluator: &mut Evaluator,
        progress: &mut Progress,
    ) -> Result<(), LearnerError> {
        // The steps queued on a GPU are done before the clock is read: the
        // window's rates, busy time and any time to quality describe work
        // done, and the wait is not billed to the evaluation (left out of
        // wall_s).
        self.wait_for_device();
        let wall = progress.wall();
        // Counted at the same moment: chunks keep arriving during the
        // evaluation, and counted after it they would be set against the
        // training done before it (ingest and bytes per trained
        // transition, this window's ingest rate, the room in flight).
        let mut counts = Report {
            trained_transitions: progress.trained_transitions,
            resumed_trained_transitions: progress.resumed_trained_transitions,
            weight_versions_encoded: self.publisher.encodings(),
            credit_room_transitions: self.pool.capacity(),
            in_flight_transitions: self.pool.in_use(),
            ..Report::default()
        };
        counts.count_from(&self.stats);
        let ingested_at_wall = counts.ingested_transitions;
        let eval_started = Instant::now();
        let learned_log_z = self.objective.learned_log_z().map(|z| z.double_value(&[]));
        let evaluation = evaluator.evaluate(&self.policy, learned_log_z);
        progress.non_finite_draws = evaluation.non_finite_draws;
        let eval_s = eval_started.elapsed();
        progress.time_left_out += eval_s;
        // The report's own bookkeeping (its line, the metrics file, the
        // refinement of a first time to quality) is not training either:
        // left out below, once the report is done.
        let bookkeeping_started = Instant::now();

        let span = (wall - progress.last_report_wall).max(1e-9);
        let (last_trained, last_ingested) = progress.last_report_counts;
        // Taken whole: its skipped steps now count in `totals`, and a
        // checkpoint saved after an error below (divergence, a failed
        // metrics write) must not count them again.
        let window = std::mem::take(&mut progress.window);
        let read = |sum: &Option<Tensor>| sum.as_ref().map_or(0.0, |t| t.double_value(&[]));
        let nonfinite = window.skipped_steps();
        let finite_steps = window.steps - nonfinite;
        progress.totals.skipped_batches += nonfinite;
        // Prefixes alone (actors configured apart, or of another
        // implementation, that cut every trajectory short; the
        // configuration refuses it): no transition reached a terminal
        // state, where the reward ties the flows to the target, so the
        // loss falls while the sampler drifts.
        if window.trajectories > 0 && window.truncated == window.trajectories {
            warn!(
                step = progress.step,
                trajectories = window.trajectories,
                "every trajectory trained since the last report was truncated: none reached a terminal state, where the reward ties the flows to the target, so the sampler follows no target; actors must complete some (actor.truncate_fraction below 1)"
            );
        }
        if nonfinite > 0 {
            warn!(
                step = progress.step,
                skipped = nonfinite,
                of_steps = window.steps,
                "steps skipped since the last report: their loss, gradients or update were not finite (a diverging model? lower learner.learning_rate); {MAX_DIVERGED_REPORTS} reports in a row with no finite step stop the run"
            );
        }
        if window.steps > 0 && nonfinite == 0 && evaluation.non_finite_draws == 0 {
            progress.last_sound_report = Some(progress.step);
        }
        if window.steps > 0 && finite_steps == 0 {
            progress.diverged_reports += 1;
            if progress.diverged_reports >= MAX_DIVERGED_REPORTS {
                return Err(LearnerError::Trainer(format!(
                    "no step of the last {} was finite (its loss, gradients or update): the model diverged; {}",
                    window.steps,
                    divergence_remedy(progress, self.checkpoint_dir.as_deref())
                )));
            }
        } else {
            progress.diverged_reports = 0;
        }
        let busy = (span - window.waiting.as_secs_f64()).max(0.0);
        let mut report = Report {
            step: progress.step,
            wall_s: wall,
            loss: read(&window.loss_sum) / finite_steps.max(1) as f64,
            logz_est: evaluation.log_z_estimate,
            logz_sampled: evaluation.log_z_sampled,
            logz_sampled_ess: evaluation.log_z_sampled_ess,
            logz_exact: evaluation.log_z_exact,
            marginal_tv: evaluation.marginal_tv,
            energy_w1: evaluation.energy_w1,
            exact_tv: evaluation.exact_tv,
            exact_kl: evaluation.exact_kl,
            top100_mean_reward: evaluation.top_k_mean_reward,
            top100_samples: evaluation.top_k_samples,
            top100_mean_reward_eval: evaluation.top_k_mean_reward_this_evaluation,
            at_quality: evaluation.at_quality,
            trained_per_s: (progress.trained_transitions - last_trained) as f64 / span,
            version: progress.version,
            mean_policy_lag: window.lag_weighted / window.transitions.max(1) as f64,
            max_policy_lag: window.max_lag,
            mean_batch_transitions: window.transitions as f64 / window.steps.max(1) as f64,
            busy_ms_per_step: 1e3 * busy / window.steps.max(1) as f64,
            resident_mb: crate::report::resident_mb(),
            truncated_fraction: window.truncated as f64 / window.trajectories.max(1) as f64,
            data_wait_fraction: (window.waiting.as_secs_f64() / span).min(1.0),
            skipped_batches: progress.totals.skipped_batches,
            non_finite_draws: evaluation.non_finite_draws,
            eval_samples: self.config.learner.eval_samples,
            eval_s: eval_s.as_secs_f64(),
            ..counts
        };
        report.ingested_per_s = ingested_at_wall.saturating_sub(last_ingested) as f64 / span;
        report.log();
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.write(&report)?;
        }
        if progress.time_to_quality.is_none() && evaluation.at_quality == Some(true) {
            let first = self.first_at_quality(evaluator, progress.probes.take(), wall);
            progress.time_to_quality = Some(first);
        }
        progress.last_report_wall = wall;
        // Geometric spacing: each gap a quarter of the training time so far,
        // between first_report_s and report_every_s.
        let learner = &self.config.learner;
        let gap = (0.25 * wall).clamp(learner.first_report_s, learner.report_every_s);
        progress.next_report_wall = wall + gap;
        if let Some(probes) = progress.probes.as_mut() {
            probes.plan(wall, progress.next_report_wall);
        }
        progress.last_report_counts = (progress.trained_transitions, ingested_at_wall);
        progress.report = report;
        progress.time_left_out += bookkeeping_started.elapsed();
        Ok(())
    }
}

/// The seed of a quality probe's evaluation at `step`: its own stream,
/// apart from every actor's. (`seed ^ step` was `seed + step` for a seed
/// of trailing zeros, the default 0 included, and so the stream of the
/// local actor seeded `seed + 1 + (step - 1)`.)
fn probe_seed(run_seed: u64, step: u64) -> u64 {
    flgfn_common::rollout::splitmix(run_seed ^ flgfn_common::rollout::splitmix(step))
}

#[cfg(test)]
mod tests {
    use super::probe_seed;

    /// No probe draws a local actor's stream (seeded `seed + 1 + i`), nor
    /// another probe's.
    #[test]
    fn probes_draw_streams_of_their_own() {
        for seed in [0, 2, 1 << 20, 12_345] {
            let probes: Vec<u64> = (1..=64).map(|step| probe_seed(seed, step)).collect();
            for (i, probe) in probes.iter().enumerate() {
                assert!(
                    (0..64u64).all(|actor| *probe != seed + 1 + actor),
                    "seed {seed}, step {}",
                    i + 1
                );
                assert!(!probes[..i].contains(probe), "seed {seed}, step {}", i + 1);
            }
        }
    }
}
