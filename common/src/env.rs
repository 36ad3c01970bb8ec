//! The environment trait: what a task must provide to be sampled by actors,
//! replayed by the learner and evaluated against its exact target.
//!
//! A task is a DAG of states built from [`Environment::initial_state`] by
//! forward actions until [`Environment::is_terminal`]. Every forward action
//! `a` taken in state `s` is undone by exactly one backward action
//! (returned by [`Environment::step`]) taken in the child, which is what the
//! backward policy P_B scores. The energy is additive along the trajectory:
//! [`Environment::transition_energy`] is the local term E(s -> s') =
//! E(s') - E(s), with E(s0) = 0.

use std::collections::HashMap;
use std::fmt;

/// A state as the environment sees it: one small integer per site (a set's
/// membership bit, a lattice spin in {-1, 0, +1}, ...). A concrete type rather
/// than an associated one keeps [`Environment`] object safe, so a task is
/// chosen at run time from configuration.
pub type State = Vec<i8>;

/// Identity of a task: equal specs mean identical environments. Sent at the
/// handshake so an actor of another task, or of other task parameters, is
/// refused before it sends anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    /// Registered name, e.g. `set_generation`.
    pub name: String,
    /// Canonical `key=value` pairs in a fixed order.
    pub params: Vec<String>,
}

impl fmt::Display for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name, self.params.join(", "))
    }
}

/// A forward action that the state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("action {action} is not allowed in this state ({reason})")]
pub struct InvalidAction {
    /// The offending action index.
    pub action: usize,
    /// Why, in a few words (out of range, already taken, terminal state).
    pub reason: &'static str,
}

/// A task. Implementations are cheap to share (`Send + Sync`): actors and the
/// learner's ingest path use one instance from several threads.
pub trait Environment: Send + Sync + fmt::Debug {
    /// Name and parameters, compared at the handshake.
    fn spec(&self) -> TaskSpec;

    /// Length of the network input produced by [`Environment::encode`].
    fn state_dim(&self) -> usize;

    /// Number of forward action indices (size of the P_F head).
    fn forward_actions(&self) -> usize;

    /// Number of backward action indices (size of the P_B head).
    fn backward_actions(&self) -> usize;

    /// Longest possible trajectory, in transitions. Bounds what the learner
    /// accepts and sizes rollout buffers.
    fn max_trajectory_len(&self) -> usize;

    /// The root state s0.
    fn initial_state(&self) -> State;

    /// Writes the network input for `state` into `out` (`state_dim` long).
    fn encode(&self, state: &State, out: &mut [f32]);

    /// Marks the forward actions valid in `state` (`forward_actions` long).
    /// All false exactly when `state` is terminal.
    fn forward_mask(&self, state: &State, out: &mut [bool]);

    /// Marks the backward actions valid in `state` (`backward_actions`
    /// long). All false exactly at the initial state.
    fn backward_mask(&self, state: &State, out: &mut [bool]);

    /// True when `state` is a finished object x.
    fn is_terminal(&self, state: &State) -> bool;

    /// Applies forward `action` to `state` in place and returns the backward
    /// action that undoes it. Leaves `state` unchanged on error.
    fn step(&self, state: &mut State, action: usize) -> Result<usize, InvalidAction>;

    /// Local energy term E(s -> s') of taking `action` in `state`, before
    /// the step is applied. The caller has checked that `action` is valid.
    fn transition_energy(&self, state: &State, action: usize) -> f64;

    /// Total energy E(s) of a state; E(s0) = 0. Used for evaluation only:
    /// on the training path energies come from the actors.
    fn energy(&self, state: &State) -> f64;

    /// The exact target, when the task can compute it, for evaluation.
    fn reference(&self) -> Option<Box<dyn TaskReference>> {
        None
    }
}

/// Exact facts about a task's target distribution R(x)/Z, used to score
/// samples of the learned policy.
pub trait TaskReference: Send {
    /// log Z = log sum_x exp(-E(x)).
    fn log_z(&self) -> f64;

    /// Distribution metrics of terminal samples against the exact target.
    fn score(&self, terminal_states: &[State], energies: &[f64]) -> DistributionScores;

    /// When a sampler of this task counts as "at quality" (the thresholds
    /// are the task's: they depend on its scale).
    fn quality(&self) -> Quality;

    /// Mean reward of the `k` best distinct objects, a missing one counting
    /// 0 where there are fewer than `k`: the ceiling of the top-k metric
    /// (None where it is not known).
    fn best_mean_reward(&self, _k: usize) -> Option<f64> {
        None
    }

    /// R(x)/Z for every terminal state, where the task is small enough to
    /// enumerate: the evaluation then computes the sampler's exact terminal
    /// distribution and its TV and KL to this.
    fn exact_target(&self) -> Option<&HashMap<State, f64>> {
        None
    }
}

/// Thresholds a sampler must meet, all of them, to be "at quality". A
/// threshold on a metric the evaluation could not compute is not met.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quality {
    /// Largest mean marginal TV.
    pub marginal_tv: Option<f64>,
    /// Largest energy W1.
    pub energy_w1: Option<f64>,
    /// Largest exact TV of the sampler's terminal distribution.
    pub exact_tv: Option<f64>,
    /// Largest |log Z estimate - exact log Z|.
    pub log_z_error: f64,
}

/// How far a set of samples is from the exact target. `None` where a task
/// has no such metric.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DistributionScores {
    /// Mean over a task's marginals of the total variation between the
    /// sampled and exact marginal distributions.
    pub marginal_tv: Option<f64>,
    /// 1-Wasserstein distance between sampled and exact energy distributions.
    pub energy_w1: Option<f64>,
}
