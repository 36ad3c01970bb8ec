//! Evaluation on fresh on-policy samples: the figures in every report.
//!
//! Runs on the trainer thread between steps (it needs the model), and its
//! time is left out of `wall_s`. Samples are drawn without exploration or
//! truncation; energies come from the learner's own environment here, which
//! is allowed off the training path.

use std::sync::Arc;

use flgfn_common::config::BackwardPolicy;
use flgfn_common::env::{DistributionScores, Environment, Quality, State, TaskReference};
use flgfn_common::exact::{Dag, enumerate, terminal_distribution, total_variation};
use flgfn_common::objectives::{TransitionBatch, trajectory_log_ratios};
use flgfn_common::policy::{ModelSpec, Policy, to_host_f32};
use flgfn_common::rollout::{Behaviour, Rollout, forward_probabilities, rollout};
use flgfn_common::trajectory::{ReplayedTrajectory, Trajectory, replay};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::checkpoint::EvaluatorState;

/// How many of the best distinct objects the top-k reward averages.
pub const TOP_K: usize = 100;

/// Largest number of states the evaluation enumerates to compute a
/// sampler's exact terminal distribution (a 4 x 4 fixed-order lattice has
/// 2^17 - 1).
pub const EXACT_STATE_LIMIT: usize = 200_000;

/// Trajectories whose log-ratios one forward pass computes in an
/// evaluation (a few MB of activations with the default network; see
/// [`log_ratios`]).
const RATIO_GROUP_TRAJECTORIES: usize = 256;

/// Replayed trajectories held at once to compute their log-ratios: fewer
/// than [`RATIO_GROUP_TRAJECTORIES`] where each holds more than this
/// divided by 256 (a set task of 4,096 elements holds ~34 MB per replayed
/// trajectory of 2,048 transitions; the default task ~4 KB).
const RATIO_GROUP_BYTES: usize = 64 << 20;

/// Network input and activations of the environments an evaluation rolls
/// out in lockstep at once: it rolls out fewer at a time than it samples
/// where its samples' would take more (the default evaluation, 4,096
/// samples of the default task and network, takes ~6 MB: one pass).
const ROLLOUT_BYTES: usize = 256 << 20;

/// States of a DAG layer whose forward probabilities one pass computes for
/// the exact distribution (a few MB of activations too).
const EXACT_GROUP_STATES: usize = 4096;

/// Each trajectory's log P_F(tau) - log P_B(tau | x), `group` trajectories
/// per forward pass: the default evaluation's 4,096 trajectories of 20
/// transitions in one pass held ~250 MB of activations, a spike in the
/// learner's memory at every report.
fn log_ratios(
    policy: &Policy,
    trajectories: &[ReplayedTrajectory],
    dims: (usize, usize, usize),
    backward: BackwardPolicy,
    group: usize,
) -> Vec<f32> {
    let _guard = tch::no_grad_guard();
    trajectories
        .chunks(group.max(1))
        .flat_map(|group| {
            let batch = TransitionBatch::new(group, dims, policy.device());
            let output = policy.net.forward(&batch.states);
            to_host_f32(&trajectory_log_ratios(&output, &batch, backward))
        })
        .collect()
}

/// Most bytes an evaluation's samples may hold (each sample's trajectory
/// and final state, kept until it is scored): a larger
/// `learner.eval_samples` is refused at start rather than found out of
/// memory at the first report.
pub const EVAL_HELD_BYTES: u128 = 4 << 30;

/// Bytes `samples` evaluation samples of `env` hold at most: every
/// trajectory at full length, and its final state.
pub fn held_bytes(env: &dyn Environment, samples: usize) -> u128 {
    let per_sample = std::mem::size_of::<Trajectory>()
        + std::mem::size_of::<State>()
        + env.initial_state().len()
        + env.max_trajectory_len() * (std::mem::size_of::<u32>() + std::mem::size_of::<f32>());
    samples as u128 * per_sample as u128
}

/// Trajectories of `env` replayed and scored at once by an evaluation
/// (replays hold every state's encoding).
fn ratio_group(env: &dyn Environment) -> usize {
    let held = ReplayedTrajectory::max_held_bytes(env, env.max_trajectory_len());
    (RATIO_GROUP_BYTES / held.max(1)).clamp(1, RATIO_GROUP_TRAJECTORIES)
}

/// [`log_ratios`] of `trajectories`, replayed `group` at a time; None if
/// one does not replay.
fn replayed_log_ratios(
    env: &dyn Environment,
    policy: &Policy,
    trajectories: &[Trajectory],
    backward: BackwardPolicy,
    group: usize,
) -> Option<Vec<f32>> {
    let dims = (
        env.state_dim(),
        env.forward_actions(),
        env.backward_actions(),
    );
    let mut ratios = Vec::with_capacity(trajectories.len());
    for part in trajectories.chunks(group.max(1)) {
        let replayed: Vec<ReplayedTrajectory> =
            part.iter().filter_map(|t| replay(env, t).ok()).collect();
        if replayed.len() != part.len() {
            return None;
        }
        ratios.extend(log_ratios(policy, &replayed, dims, backward, group));
    }
    Some(ratios)
}

/// Environments an evaluation (or `flgfn-sample`) rolls out in lockstep
/// at once with a network of `spec`: as many as 256 MiB holds of their
/// input and widest activation.
pub fn rollout_envs(spec: &ModelSpec) -> usize {
    let outputs = spec.outputs();
    let widest = spec
        .hidden
        .iter()
        .copied()
        .chain([outputs])
        .max()
        .unwrap_or(outputs);
    let per_env = (spec.input_dim + widest) * std::mem::size_of::<f32>();
    (ROLLOUT_BYTES / per_env.max(1)).max(1)
}

/// The figures of one evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Evaluation {
    /// The model's log Z: the objective's own (TB), or else the flow at
    /// s0, log F~(s0) - E(s0) (for plain flows E(s0) = 0 is all that
    /// differs).
    pub log_z_estimate: f64,
    /// log Z by importance sampling over the evaluation samples,
    /// log mean_i exp(log R(x_i) + log P_B(tau_i|x_i) - log P_F(tau_i)): a
    /// lower bound in expectation, tight once P_F is close.
    pub log_z_sampled: f64,
    /// Effective sample size of those importance weights, out of the
    /// evaluation's samples (tiny early in training: trust the estimate
    /// only when this is a sizeable fraction).
    pub log_z_sampled_ess: f64,
    /// Exact log Z, when the task knows it.
    pub log_z_exact: Option<f64>,
    /// Mean marginal total variation against the exact target.
    pub marginal_tv: Option<f64>,
    /// Energy 1-Wasserstein distance against the exact target.
    pub energy_w1: Option<f64>,
    /// Exact total variation between the sampler's terminal distribution
    /// and the target (tasks small enough to enumerate).
    pub exact_tv: Option<f64>,
    /// Exact KL(target || sampler), in nats (same tasks).
    pub exact_kl: Option<f64>,
    /// Mean reward of the best [`TOP_K`] distinct objects sampled by every
    /// evaluation so far (a missing one counts 0 while fewer were seen).
    pub top_k_mean_reward: f64,
    /// Evaluation samples the cumulative top-k rests on.
    pub top_k_samples: u64,
    /// Mean reward of the best [`TOP_K`] distinct objects of this
    /// evaluation's samples alone: comparable between runs that report at
    /// different moments.
    pub top_k_mean_reward_this_evaluation: f64,
    /// Whether all quality thresholds hold (None without a reference).
    pub at_quality: Option<bool>,
    /// Draws made uniformly because the policy's logits were not finite
    /// at their state, plus such states met by the exact pass (where the
    /// task enumerates every state): the policy is no distribution there
    /// (diverged).
    pub non_finite_draws: usize,
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

    /// The mean reward of the best [`TOP_K`], a missing object counting
    /// 0: over fewer than `TOP_K` seen, the mean of those alone would
    /// overstate it (on a small task, where an evaluation draws fewer
    /// distinct objects, up to the ceiling at once). Saturates at f64's
    /// largest value (a custom task's rewards beyond e^709): JSON has no
    /// infinity, and the metrics file must stay readable.
    fn mean_reward(&self) -> f64 {
        let mean = self.best.iter().map(|(e, _)| (-e).exp()).sum::<f64>() / TOP_K as f64;
        if mean == f64::INFINITY {
            f64::MAX
        } else {
            mean
        }
    }
}

/// Draws evaluation samples and scores them.
pub struct Evaluator {
    env: Arc<dyn Environment>,
    reference: Option<Box<dyn TaskReference>>,
    /// The task's state DAG, where its target is enumerated: made once,
    /// not at every evaluation and probe (131,071 states on a 4 x 4
    /// lattice).
    exact_dag: Option<Dag>,
    log_z_exact: Option<f64>,
    samples: usize,
    /// How P_B is chosen, for the importance-sampled log Z.
    backward: BackwardPolicy,
    best: BestObjects,
    samples_so_far: u64,
    /// Each evaluation draws from a stream seeded with this and
    /// `samples_so_far`, both of which a checkpoint keeps: a resumed run
    /// draws what an uninterrupted one would have.
    seed: u64,
}

impl Evaluator {
    /// An evaluator drawing `samples` trajectories per evaluation.
    pub fn new(
        env: Arc<dyn Environment>,
        samples: usize,
        backward: BackwardPolicy,
        seed: u64,
    ) -> Self {
        let reference = env.reference();
        let log_z_exact = reference.as_ref().map(|r| r.log_z());
        let exact_dag = reference
            .as_ref()
            .and_then(|r| r.exact_target())
            .and_then(|_| enumerate(env.as_ref(), EXACT_STATE_LIMIT).ok());
        Evaluator {
            env,
            reference,
            exact_dag,
            log_z_exact,
            samples,
            backward,
            best: BestObjects::default(),
            samples_so_far: 0,
            seed,
        }
    }

    /// What a checkpoint keeps: the best objects and the sample count.
    pub fn state(&self) -> EvaluatorState {
        EvaluatorState {
            samples_so_far: self.samples_so_far,
            best: self.best.best.clone(),
        }
    }

    /// The mean reward of the best distinct objects so far, and the samples
    /// it rests on (kept across a resume, unlike an evaluation's figures).
    pub fn top_k_so_far(&self) -> (f64, u64) {
        (self.best.mean_reward(), self.samples_so_far)
    }

    /// Continues from a checkpoint's state, drawing from there on what the
    /// run would have drawn without the checkpoint.
    pub fn restore(&mut self, state: &EvaluatorState) {
        self.samples_so_far = state.samples_so_far;
        self.best = BestObjects::default();
        for (energy, object) in &state.best {
            self.best.offer(*energy, object);
        }
    }

    /// Whether evaluations can say if a policy is at quality: the task has
    /// a reference with an exact log Z.
    pub fn judges_quality(&self) -> bool {
        self.reference.is_some() && self.log_z_exact.is_some()
    }

    /// Exact log Z, when known.
    pub fn log_z_exact(&self) -> Option<f64> {
        self.log_z_exact
    }

    /// The model's log Z: log F(s0) = log F~(s0) - E(s0).
    pub fn log_z_estimate(&self, policy: &Policy) -> f64 {
        let s0 = self.env.initial_state();
        let output = policy.infer_states(self.env.as_ref(), std::iter::once(&s0));
        let log_flow = to_host_f32(&output.log_flow());
        f64::from(log_flow[0]) - self.env.energy(&s0)
    }

    /// Importance-sampled log Z over complete `trajectories` and its
    /// effective sample size.
    fn sampled_log_z(
        &self,
        policy: &Policy,
        trajectories: &[Trajectory],
        energies: &[f64],
    ) -> (f64, f64) {
        let env = self.env.as_ref();
        if trajectories.is_empty() {
            return (f64::NAN, 0.0);
        }
        let Some(ratios) =
            replayed_log_ratios(env, policy, trajectories, self.backward, ratio_group(env))
        else {
            return (f64::NAN, 0.0);
        };
        let log_weights: Vec<f64> = ratios
            .iter()
            .zip(energies)
            .map(|(&ratio, &energy)| -energy - f64::from(ratio))
            .collect();
        log_mean_exp_and_ess(&log_weights)
    }

    /// Exact TV and KL(target || sampler) of the policy's terminal
    /// distribution, where the task enumerates its target, and the number
    /// of states whose logits were not finite (taken as uniform, as the
    /// sampler draws there: a diverged model, which is not at quality).
    fn exact_scores(&self, policy: &Policy) -> ExactScores {
        let none = ExactScores::default();
        let Some(target) = self.reference.as_ref().and_then(|r| r.exact_target()) else {
            return none;
        };
        // (None: more states than an evaluation may enumerate.)
        let Some(dag) = &self.exact_dag else {
            return none;
        };
        let env = self.env.as_ref();
        let mut non_finite_states = 0;
        // A layer of the DAG (32,768 states deep in a 4 x 4 lattice) a
        // group at a time, like the log-ratios.
        let learned = terminal_distribution(dag, env, &mut |states| {
            states
                .chunks(EXACT_GROUP_STATES)
                .flat_map(|group| forward_probabilities(env, policy, group, &mut non_finite_states))
                .collect()
        });
        let kl = target
            .iter()
            .filter(|&(_, &p)| p > 0.0)
            .map(|(state, &p)| {
                let q = learned.get(state).copied().unwrap_or(0.0);
                p * (p.ln() - q.max(f64::MIN_POSITIVE).ln())
            })
            .sum();
        ExactScores {
            tv: Some(total_variation(&learned, target)),
            kl: Some(kl),
            non_finite_states,
        }
    }

    /// Whether `policy` meets every quality threshold, judged on samples of
    /// its own drawn from `seed` (None without a reference). Unlike
    /// [`Evaluator::evaluate`] it leaves the running figures (best objects,
    /// sample count, sampling stream) alone: it judges weights from the
    /// past ([`crate::quality_probes`]).
    pub fn reaches_quality(
        &self,
        policy: &Policy,
        learned_log_z: Option<f64>,
        seed: u64,
    ) -> Option<bool> {
        if !self.judges_quality() {
            return None;
        }
        let (samples, _, scores) =
            self.sample_and_score(policy, &mut SmallRng::seed_from_u64(seed));
        let log_z_estimate = learned_log_z.unwrap_or_else(|| self.log_z_estimate(policy));
        let exact = self.exact_scores(policy);
        let non_finite = samples.non_finite_draws + exact.non_finite_states;
        self.at_quality(non_finite, &scores, exact.tv, log_z_estimate)
    }

    /// Draws the evaluation's samples from `policy`; their energies, and
    /// their distribution metrics against the reference, if any.
    fn sample_and_score(
        &self,
        policy: &Policy,
        rng: &mut SmallRng,
    ) -> (Rollout, Vec<f64>, DistributionScores) {
        let mut samples = Rollout::default();
        let lockstep = rollout_envs(policy.spec());
        let mut left = self.samples;
        while left > 0 {
            let envs = left.min(lockstep);
            let part = rollout(self.env.as_ref(), policy, envs, Behaviour::default(), rng);
            samples.trajectories.extend(part.trajectories);
            samples.final_states.extend(part.final_states);
            samples.non_finite_draws += part.non_finite_draws;
            left -= envs;
        }
        let energies: Vec<f64> = samples
            .final_states
            .iter()
            .map(|s| self.env.energy(s))
            .collect();
        let scores = self
            .reference
            .as_ref()
            .map(|r| r.score(&samples.final_states, &energies))
            .unwrap_or_default();
        (samples, energies, scores)
    }

    /// Whether these figures meet every threshold of the task's reference
    /// (None without one).
    fn at_quality(
        &self,
        non_finite_draws: usize,
        scores: &DistributionScores,
        exact_tv: Option<f64>,
        log_z_estimate: f64,
    ) -> Option<bool> {
        let (Some(reference), Some(exact)) = (&self.reference, self.log_z_exact) else {
            return None;
        };
        Some(meets(
            &reference.quality(),
            non_finite_draws,
            scores,
            exact_tv,
            (log_z_estimate - exact).abs(),
        ))
    }

    /// Samples the current policy and computes every figure. `learned_log_z`
    /// is the objective's own log Z where it has one.
    pub fn evaluate(&mut self, policy: &Policy, learned_log_z: Option<f64>) -> Evaluation {
        let stream = self.seed ^ self.samples_so_far.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let (samples, energies, scores) =
            self.sample_and_score(policy, &mut SmallRng::seed_from_u64(stream));
        let exact = self.exact_scores(policy);
        // The exact pass visits every state, the samples only some.
        let non_finite_draws = samples.non_finite_draws + exact.non_finite_states;
        if non_finite_draws > 0 {
            tracing::warn!(
                draws = samples.non_finite_draws,
                exact_pass_states = exact.non_finite_states,
                "the policy's logits are not finite at some states (weights too large for f32: the model diverged?): this evaluation drew uniformly there"
            );
        }
        let mut this_evaluation = BestObjects::default();
        for (state, &energy) in samples.final_states.iter().zip(&energies) {
            self.best.offer(energy, state);
            this_evaluation.offer(energy, state);
        }
        self.samples_so_far += samples.final_states.len() as u64;
        let log_z_estimate = learned_log_z.unwrap_or_else(|| self.log_z_estimate(policy));
        let (log_z_sampled, log_z_sampled_ess) =
            self.sampled_log_z(policy, &samples.trajectories, &energies);
        let at_quality = self.at_quality(non_finite_draws, &scores, exact.tv, log_z_estimate);
        Evaluation {
            log_z_estimate,
            log_z_sampled,
            log_z_sampled_ess,
            log_z_exact: self.log_z_exact,
            marginal_tv: scores.marginal_tv,
            energy_w1: scores.energy_w1,
            exact_tv: exact.tv,
            exact_kl: exact.kl,
            top_k_mean_reward: self.best.mean_reward(),
            top_k_samples: self.samples_so_far,
            top_k_mean_reward_this_evaluation: this_evaluation.mean_reward(),
            at_quality,
            non_finite_draws,
        }
    }
}

/// What [`Evaluator::exact_scores`] gives: none of the figures where the
/// task enumerates no target.
#[derive(Debug, Default)]
struct ExactScores {
    tv: Option<f64>,
    kl: Option<f64>,
    non_finite_states: usize,
}

/// log of the mean of exp(`log_weights`), and their Kish effective sample
/// size (sum w)^2 / sum w^2, with the largest weight factored out so that
/// neither overflows.
fn log_mean_exp_and_ess(log_weights: &[f64]) -> (f64, f64) {
    let max = log_weights
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = log_weights.iter().map(|w| (w - max).exp()).sum();
    let sum_sq: f64 = log_weights.iter().map(|w| (2.0 * (w - max)).exp()).sum();
    let count = log_weights.len() as f64;
    (max + sum.ln() - count.ln(), sum * sum / sum_sq)
}

/// Whether figures meet every threshold of `quality`: a threshold the task
/// sets whose figure is missing fails, and samples drawn uniformly where
/// the logits overflowed are not the policy's, so they cannot show it at
/// quality.
fn meets(
    quality: &Quality,
    non_finite_draws: usize,
    scores: &DistributionScores,
    exact_tv: Option<f64>,
    log_z_error: f64,
) -> bool {
    let within = |value: Option<f64>, limit: Option<f64>| match limit {
        None => true,
        Some(limit) => value.is_some_and(|v| v <= limit),
    };
    non_finite_draws == 0
        && within(scores.marginal_tv, quality.marginal_tv)
        && within(scores.energy_w1, quality.energy_w1)
        && within(exact_tv, quality.exact_tv)
        && log_z_error <= quality.log_z_error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn importance_weights_average_in_log_space_with_their_effective_size() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // Equal weights: their log, and every sample counts.
        let (log_mean, ess) = log_mean_exp_and_ess(&[0.7; 5]);
        assert!(close(log_mean, 0.7) && close(ess, 5.0), "{log_mean} {ess}");
        // Weights 1 and 3: mean 2, ESS 16 / 10.
        let (log_mean, ess) = log_mean_exp_and_ess(&[0.0, 3f64.ln()]);
        assert!(
            close(log_mean, 2f64.ln()) && close(ess, 1.6),
            "{log_mean} {ess}"
        );
        // The same far beyond f64's exponent range.
        let (log_mean, ess) = log_mean_exp_and_ess(&[1000.0, 1000.0 + 3f64.ln()]);
        assert!(
            close(log_mean, 1000.0 + 2f64.ln()) && close(ess, 1.6),
            "{log_mean} {ess}"
        );
    }

    /// A policy whose output layer is zero draws uniformly among valid
    /// actions: on sets of 3 from 6 elements, each of the 6 * 5 * 4
    /// orders has P_F = 1/120 and P_B = 1/3! under either backward
    /// policy, so every importance weight is R(x) * 20. With every
    /// element adding 0.5, E(x) = 1.5 and the estimate is exactly
    /// ln 20 - 1.5 (a sign slip on the ratio or the energy moves it by
    /// 2 ln 20 or 3), from weights that are all equal (ESS = every
    /// sample). The flow estimate is the flow head's bias at s0.
    #[test]
    fn log_z_by_importance_sampling_is_exact_for_a_uniform_sampler() {
        use flgfn_common::config::ModelConfig;
        use flgfn_common::tasks::set_generation::SetGeneration;
        let env: Arc<dyn Environment> =
            Arc::new(SetGeneration::from_parts(6, 3, vec![0.5]).unwrap());
        let spec = ModelSpec::new(env.as_ref(), &ModelConfig { hidden: vec![8] });
        let mut policy = Policy::new(&spec, tch::Device::Cpu);
        let mut weights = policy.weights();
        for array in &mut weights {
            if array.name.starts_with("heads.") {
                array.values.fill(0.0);
            }
            if array.name == "heads.bias" {
                *array.values.last_mut().unwrap() = 2.0;
            }
        }
        policy.load_weights(&weights).unwrap();
        for backward in [BackwardPolicy::Uniform, BackwardPolicy::Learned] {
            let mut evaluator = Evaluator::new(env.clone(), 200, backward, 3);
            let evaluation = evaluator.evaluate(&policy, None);
            let expected = 20f64.ln() - 1.5;
            assert!(
                (evaluation.log_z_sampled - expected).abs() < 1e-5,
                "{backward:?}: {} against {expected}",
                evaluation.log_z_sampled
            );
            assert!(
                (evaluation.log_z_sampled_ess - 200.0).abs() < 1e-3,
                "{}",
                evaluation.log_z_sampled_ess
            );
            assert!((evaluation.log_z_estimate - 2.0).abs() < 1e-6);
        }
    }

    #[test]
    fn quality_needs_every_threshold_the_task_sets() {
        let quality = Quality {
            marginal_tv: Some(0.03),
            energy_w1: Some(0.1),
            exact_tv: None,
            log_z_error: 0.3,
        };
        let scores = DistributionScores {
            marginal_tv: Some(0.02),
            energy_w1: Some(0.09),
        };
        assert!(meets(&quality, 0, &scores, None, 0.29));
        // Each threshold alone fails it.
        assert!(!meets(&quality, 0, &scores, None, 0.31));
        let worse_tv = DistributionScores {
            marginal_tv: Some(0.031),
            ..scores
        };
        assert!(!meets(&quality, 0, &worse_tv, None, 0.0));
        let worse_w1 = DistributionScores {
            energy_w1: Some(0.11),
            ..scores
        };
        assert!(!meets(&quality, 0, &worse_w1, None, 0.0));
        // A figure the task has a threshold for but that is missing fails.
        let missing = DistributionScores {
            marginal_tv: None,
            ..scores
        };
        assert!(!meets(&quality, 0, &missing, None, 0.0));
        // A threshold the task does not set is not checked.
        assert!(meets(&quality, 0, &scores, Some(0.9), 0.0));
        let lattice = Quality {
            marginal_tv: None,
            energy_w1: None,
            exact_tv: Some(0.1),
            log_z_error: 0.3,
        };
        assert!(meets(
            &lattice,
            0,
            &DistributionScores::default(),
            Some(0.09),
            0.0
        ));
        assert!(!meets(
            &lattice,
            0,
            &DistributionScores::default(),
            None,
            0.0
        ));
        // Draws from logits that are not finite are not the policy's.
        assert!(!meets(&quality, 1, &scores, None, 0.0));
        // NaN errors are never within.
        assert!(!meets(&quality, 0, &scores, None, f64::NAN));
    }

    /// Grouped or in one pass, the same log-ratios (to float rounding).
    #[test]
    fn log_ratios_in_groups_match_one_pass() {
        use flgfn_common::config::ModelConfig;
        use flgfn_common::policy::ModelSpec;
        use flgfn_common::tasks::set_generation::SetGeneration;
        let env = SetGeneration::from_parts(10, 5, vec![-0.5, 0.5]).unwrap();
        let model = ModelConfig { hidden: vec![16] };
        let policy = Policy::new(&ModelSpec::new(&env, &model), tch::Device::Cpu);
        let mut rng = SmallRng::seed_from_u64(7);
        let sampled = rollout(&env, &policy, 300, Behaviour::default(), &mut rng);
        let replayed: Vec<ReplayedTrajectory> = sampled
            .trajectories
            .iter()
            .map(|t| replay(&env, t).unwrap())
            .collect();
        let dims = (
            env.state_dim(),
            env.forward_actions(),
            env.backward_actions(),
        );
        let whole = log_ratios(
            &policy,
            &replayed,
            dims,
            BackwardPolicy::Learned,
            usize::MAX,
        );
        let grouped = log_ratios(&policy, &replayed, dims, BackwardPolicy::Learned, 64);
        assert_eq!(whole.len(), 300);
        assert_eq!(grouped.len(), 300);
        for (a, b) in whole.iter().zip(&grouped) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} against {b}");
        }
    }

    #[test]
    fn an_evaluator_restored_from_its_state_draws_what_it_would_have() {
        use flgfn_common::config::ModelConfig;
        use flgfn_common::policy::ModelSpec;
        use flgfn_common::tasks::set_generation::SetGeneration;
        let env: Arc<dyn Environment> =
            Arc::new(SetGeneration::from_parts(10, 5, vec![-0.5, 0.5]).unwrap());
        let model = ModelConfig { hidden: vec![16] };
        let policy = Policy::new(&ModelSpec::new(env.as_ref(), &model), tch::Device::Cpu);
        let evaluator = || Evaluator::new(env.clone(), 64, BackwardPolicy::Learned, 11);
        let mut uninterrupted = evaluator();
        let _ = uninterrupted.evaluate(&policy, None);
        let saved = uninterrupted.state();
        let continued = uninterrupted.evaluate(&policy, None);
        let mut resumed = evaluator();
        resumed.restore(&saved);
        let after_resume = resumed.evaluate(&policy, None);
        assert_eq!(
            format!("{after_resume:?}"),
            format!("{continued:?}"),
            "the same draws, so the same figures"
        );
        // Figures, not NaN (which would print alike on both sides)...
        assert!(continued.log_z_sampled.is_finite(), "{continued:?}");
        // ...and new draws, not the first evaluation's again.
        let first = evaluator().evaluate(&policy, None);
        assert_ne!(first.log_z_sampled, continued.log_z_sampled);
    }

    /// A diverged model (output beyond f32 everywhere): the exact pass
    /// takes its logits as uniform, as the sampler draws there, so exact
    /// TV is a number (the uniform sampler's), and it counts every state
    /// it met, beyond the few a single sample visits.
    #[test]
    fn the_exact_pass_counts_states_whose_logits_are_not_finite() {
        use flgfn_common::config::{ModelConfig, TaskConfig};
        use flgfn_common::tasks::lattice::LatticeConfig;
        let env = flgfn_common::tasks::build(&TaskConfig::Lattice(LatticeConfig {
            side: 2,
            ..LatticeConfig::default()
        }))
        .unwrap();
        let spec = ModelSpec::new(env.as_ref(), &ModelConfig { hidden: vec![8] });
        let mut policy = Policy::new(&spec, tch::Device::Cpu);
        let sound =
            Evaluator::new(env.clone(), 1, BackwardPolicy::Uniform, 3).evaluate(&policy, None);
        assert_eq!(sound.non_finite_draws, 0);
        assert!(sound.exact_tv.is_some_and(f64::is_finite));
        let mut huge = policy.weights();
        for array in &mut huge {
            for value in &mut array.values {
                *value = if *value >= 0.0 { 1e30 } else { -1e30 };
            }
        }
        policy.load_weights(&huge).unwrap();
        let diverged =
            Evaluator::new(env.clone(), 1, BackwardPolicy::Uniform, 3).evaluate(&policy, None);
        // One sample of 4 spins draws at 4 states; the exact pass meets
        // every state that is not terminal (1 + 2 + 4 + 8 in a fixed order).
        assert!(
            diverged.non_finite_draws > 4,
            "{}",
            diverged.non_finite_draws
        );
        let uniform_tv = diverged.exact_tv.unwrap();
        assert!(uniform_tv.is_finite() && uniform_tv > 0.0, "{uniform_tv}");
        assert_eq!(diverged.at_quality, Some(false));
    }

    #[test]
    fn large_tasks_and_networks_are_evaluated_a_part_at_a_time() {
        use flgfn_common::config::ModelConfig;
        use flgfn_common::tasks::set_generation::SetGeneration;
        // The default task: 256 trajectories a group, and the default
        // evaluation's 4,096 samples rolled out in one pass.
        let small = SetGeneration::from_parts(30, 20, vec![-0.5, 0.5]).unwrap();
        assert_eq!(ratio_group(&small), RATIO_GROUP_TRAJECTORIES);
        let default_net = ModelSpec::new(
            &small,
            &ModelConfig {
                hidden: vec![256, 256],
            },
        );
        assert!(rollout_envs(&default_net) >= 4096);
        // 4,096 elements, sets of 2,048: one replayed trajectory holds
        // ~34 MB, so one at a time; a very wide network, fewer in lockstep.
        let large = SetGeneration::from_parts(4096, 2048, vec![-0.5, 0.5]).unwrap();
        assert_eq!(ratio_group(&large), 1);
        let wide = ModelSpec::new(
            &large,
            &ModelConfig {
                hidden: vec![1 << 20],
            },
        );
        assert_eq!(rollout_envs(&wide), 63);
    }

    #[test]
    fn log_ratios_replayed_a_few_at_a_time_match_all_at_once() {
        use flgfn_common::config::ModelConfig;
        use flgfn_common::tasks::set_generation::SetGeneration;
        let env = SetGeneration::from_parts(10, 5, vec![-0.5, 0.5]).unwrap();
        let model = ModelConfig { hidden: vec![16] };
        let policy = Policy::new(&ModelSpec::new(&env, &model), tch::Device::Cpu);
        let mut rng = SmallRng::seed_from_u64(3);
        let sampled = rollout(&env, &policy, 50, Behaviour::default(), &mut rng);
        let all = replayed_log_ratios(
            &env,
            &policy,
            &sampled.trajectories,
            BackwardPolicy::Learned,
            50,
        )
        .unwrap();
        let few = replayed_log_ratios(
            &env,
            &policy,
            &sampled.trajectories,
            BackwardPolicy::Learned,
            3,
        )
        .unwrap();
        assert_eq!(all.len(), 50);
        for (a, b) in all.iter().zip(&few) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} against {b}");
        }
    }

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

    #[test]
    fn a_top_k_beyond_f64_saturates_instead_of_turning_infinite() {
        let mut best = BestObjects::default();
        best.offer(-800.0, &vec![1]);
        assert_eq!(best.mean_reward(), f64::MAX);
        // JSON keeps it (infinity would be written as null).
        assert_ne!(serde_json::to_string(&best.mean_reward()).unwrap(), "null");
    }

    #[test]
    fn fewer_than_the_top_k_count_the_missing_as_zero() {
        let mut best = BestObjects::default();
        // Ten distinct objects of reward 1, each drawn many times.
        for _ in 0..50 {
            for i in 0..10 {
                best.offer(0.0, &vec![i]);
            }
        }
        assert_eq!(best.best.len(), 10);
        assert!((best.mean_reward() - 10.0 / TOP_K as f64).abs() < 1e-12);
    }
}
