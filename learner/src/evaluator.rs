//! Evaluation on fresh on-policy samples: the figures in every report.
//!
//! Runs on the trainer thread between steps (it needs the model), and its
//! time is left out of `wall_s`. Samples are drawn without exploration or
//! truncation; energies come from the learner's own environment here, which
//! is allowed off the training path.

use std::sync::Arc;

use flgfn_common::env::{Environment, State, TaskReference};
use flgfn_common::policy::{Policy, to_host_f32};
use flgfn_common::rollout::{Behaviour, rollout};
use rand::SeedableRng;
use rand::rngs::SmallRng;

/// How many of the best distinct objects the top-k reward averages.
pub const TOP_K: usize = 100;

/// "At quality" (paper-notes): on the evaluation samples, marginal TV and
/// energy W1 at most these, and |log Z estimate - exact| at most
/// [`QUALITY_LOG_Z_ERROR`].
pub const QUALITY_MARGINAL_TV: f64 = 0.03;
/// See [`QUALITY_MARGINAL_TV`].
pub const QUALITY_ENERGY_W1: f64 = 0.1;
/// See [`QUALITY_MARGINAL_TV`].
pub const QUALITY_LOG_Z_ERROR: f64 = 0.3;

/// The figures of one evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Evaluation {
    /// log F~(s0) - E(s0): the model's log Z.
    pub log_z_estimate: f64,
    /// Exact log Z, when the task knows it.
    pub log_z_exact: Option<f64>,
    /// Mean marginal total variation against the exact target.
    pub marginal_tv: Option<f64>,
    /// Energy 1-Wasserstein distance against the exact target.
    pub energy_w1: Option<f64>,
    /// Mean reward of the best [`TOP_K`] distinct objects sampled so far.
    pub top_k_mean_reward: f64,
    /// Whether all quality thresholds hold (None without a reference).
    pub at_quality: Option<bool>,
}

/// Keeps the best distinct terminal objects seen across evaluations.
#[derive(Debug, Default)]
struct BestObjects {
    /// (energy, state), sorted by increasing energy, at most `TOP_K` long.
    best: Vec<(f64, State)>,
}

impl BestObjects {
    fn offer(&mut self, energy: f64, state: &State) {
        if self.best.len() == TOP_K && energy >= self.best[TOP_K - 1].0 {
            return;
        }
        if self.best.iter().any(|(_, s)| s == state) {
            return;
        }
        let at = self.best.partition_point(|(e, _)| *e <= energy);
        self.best.insert(at, (energy, state.clone()));
        self.best.truncate(TOP_K);
    }

    fn mean_reward(&self) -> f64 {
        if self.best.is_empty() {
            return 0.0;
        }
        self.best.iter().map(|(e, _)| (-e).exp()).sum::<f64>() / self.best.len() as f64
    }
}

/// Draws evaluation samples and scores them.
pub struct Evaluator {
    env: Arc<dyn Environment>,
    reference: Option<Box<dyn TaskReference>>,
    log_z_exact: Option<f64>,
    samples: usize,
    best: BestObjects,
    rng: SmallRng,
}

impl Evaluator {
    /// An evaluator drawing `samples` trajectories per evaluation.
    pub fn new(env: Arc<dyn Environment>, samples: usize, seed: u64) -> Self {
        let reference = env.reference();
        let log_z_exact = reference.as_ref().map(|r| r.log_z());
        Evaluator {
            env,
            reference,
            log_z_exact,
            samples,
            best: BestObjects::default(),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Exact log Z, when known.
    pub fn log_z_exact(&self) -> Option<f64> {
        self.log_z_exact
    }

    /// The model's log Z: log F(s0) = log F~(s0) - E(s0).
    pub fn log_z_estimate(&self, policy: &Policy) -> f64 {
        let s0 = self.env.initial_state();
        let output = policy.infer_states(self.env.as_ref(), std::iter::once(&s0));
        let log_flow = to_host_f32(&output.log_flow);
        f64::from(log_flow[0]) - self.env.energy(&s0)
    }

    /// Samples the current policy and computes every figure.
    pub fn evaluate(&mut self, policy: &Policy) -> Evaluation {
        let samples = rollout(
            self.env.as_ref(),
            policy,
            self.samples,
            Behaviour::default(),
            &mut self.rng,
        );
        let energies: Vec<f64> = samples
            .final_states
            .iter()
            .map(|s| self.env.energy(s))
            .collect();
        for (state, &energy) in samples.final_states.iter().zip(&energies) {
            self.best.offer(energy, state);
        }
        let scores = self
            .reference
            .as_ref()
            .map(|r| r.score(&samples.final_states, &energies))
            .unwrap_or_default();
        let log_z_estimate = self.log_z_estimate(policy);
        let at_quality = match (self.log_z_exact, scores.marginal_tv, scores.energy_w1) {
            (Some(exact), Some(tv), Some(w1)) => Some(
                tv <= QUALITY_MARGINAL_TV
                    && w1 <= QUALITY_ENERGY_W1
                    && (log_z_estimate - exact).abs() <= QUALITY_LOG_Z_ERROR,
            ),
            _ => None,
        };
        Evaluation {
            log_z_estimate,
            log_z_exact: self.log_z_exact,
            marginal_tv: scores.marginal_tv,
            energy_w1: scores.energy_w1,
            top_k_mean_reward: self.best.mean_reward(),
            at_quality,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_objects_are_distinct_and_sorted() {
        let mut best = BestObjects::default();
        for i in 0..300 {
            let state = vec![(i % 150) as i8];
            best.offer(f64::from(i % 150), &state);
        }
        assert_eq!(best.best.len(), TOP_K);
        assert!(best.best.windows(2).all(|w| w[0].0 < w[1].0));
        let expected = (0..100).map(|e| (-f64::from(e)).exp()).sum::<f64>() / 100.0;
        assert!((best.mean_reward() - expected).abs() < 1e-12);
    }
}
