//! Training objectives, one file each, behind the [`Objective`] trait.
//!
//! The learner turns replayed trajectories into one [`TransitionBatch`] of
//! tensors and asks the configured objective for a scalar loss. Adding an
//! objective: write its file, add a variant to
//! [`ObjectiveConfig`](crate::config::ObjectiveConfig) and a line to
//! [`build`]. Trajectory-level objectives (SubTB, TB) find each trajectory's
//! rows in [`TransitionBatch::spans`].

pub mod fl_db;

use tch::{Device, Kind, Tensor};

use crate::config::ObjectiveConfig;
use crate::policy::PolicyOutput;
use crate::trajectory::ReplayedTrajectory;

/// A loss over a batch of transitions.
pub trait Objective: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// Whether a trajectory cut before its terminal state carries signal.
    /// Objectives that need the terminal reward (TB, DB, SubTB) say false,
    /// and the learner then drops truncated prefixes (reported as
    /// `unusable_truncated_transitions`).
    fn trains_on_truncated(&self) -> bool;

    /// The scalar loss of `output`, the network evaluated on
    /// `batch.states`.
    fn loss(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor;
}

/// Builds the configured objective.
pub fn build(config: &ObjectiveConfig) -> Box<dyn Objective> {
    match config {
        ObjectiveConfig::FlDb => Box::new(fl_db::ForwardLookingDb),
    }
}

/// Where one trajectory sits in a [`TransitionBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrajectorySpan {
    /// Row of s_0 in `states`.
    pub first_state: usize,
    /// Index of its first transition.
    pub first_transition: usize,
    /// Number of transitions (states are one more).
    pub transitions: usize,
    /// Whether the last state is terminal.
    pub complete: bool,
}

/// Trajectories as tensors on the training device. Every state of every
/// trajectory is one row of `states`; transition `t` goes from row
/// `source[t]` to row `target[t]`.
#[derive(Debug)]
pub struct TransitionBatch {
    /// `[S, state_dim]` float encodings.
    pub states: Tensor,
    /// `[T]` int64 row of s_t.
    pub source: Tensor,
    /// `[T]` int64 row of s_{t+1}.
    pub target: Tensor,
    /// `[T]` int64 forward action.
    pub actions: Tensor,
    /// `[T]` int64 backward action, scored at s_{t+1}.
    pub backward_actions: Tensor,
    /// `[T, forward_actions]` float, 0 where the action is allowed at s_t
    /// and [`INVALID_LOGIT`] where not: added to the logits. (An add is
    /// vectorised and has an identity gradient; a `masked_fill` was a sixth
    /// of a small network's step.)
    pub forward_bias: Tensor,
    /// `[T, backward_actions]` float, the same for the backward actions at
    /// s_{t+1}.
    pub backward_bias: Tensor,
    /// `[T]` float local energy term.
    pub energies: Tensor,
    /// `[T]` float, 0 where s_{t+1} is terminal (log F~(s_{t+1}) is pinned
    /// to 0 there) and 1 elsewhere: multiplies the target flows.
    pub target_not_terminal: Tensor,
    /// Per-trajectory layout, for trajectory-level objectives.
    pub spans: Vec<TrajectorySpan>,
    /// Number of transitions T.
    pub transitions: usize,
}

impl TransitionBatch {
    /// Stacks replayed trajectories into tensors on `device`.
    pub fn new<'a>(
        trajectories: impl IntoIterator<Item = &'a ReplayedTrajectory> + Clone,
        dims: (usize, usize, usize),
        device: Device,
    ) -> Self {
        Self::collate(trajectories, dims, false).to_device(device)
    }

    /// Stacks replayed trajectories into host tensors, in page-locked
    /// memory when `pinned` (so a later copy to a GPU can be asynchronous).
    /// The learner does this on its batch-builder thread, while the trainer
    /// runs the previous step.
    pub fn collate<'a>(
        trajectories: impl IntoIterator<Item = &'a ReplayedTrajectory> + Clone,
        dims: (usize, usize, usize),
        pinned: bool,
    ) -> Self {
        let (dim, fwd, bwd) = dims;
        let (mut states_n, mut trans_n) = (0usize, 0usize);
        for t in trajectories.clone() {
            states_n += t.len() + 1;
            trans_n += t.len();
        }
        let mut encoded = Vec::with_capacity(states_n * dim);
        let mut source = Vec::with_capacity(trans_n);
        let mut target_not_terminal = Vec::with_capacity(trans_n);
        let mut actions = Vec::with_capacity(trans_n);
        let mut backward_actions = Vec::with_capacity(trans_n);
        let mut energies = Vec::with_capacity(trans_n);
        let mut forward_bias = Vec::with_capacity(trans_n * fwd);
        let mut backward_bias = Vec::with_capacity(trans_n * bwd);
        let mut spans = Vec::new();
        for t in trajectories {
            let first_state = encoded.len() / dim;
            spans.push(TrajectorySpan {
                first_state,
                first_transition: source.len(),
                transitions: t.len(),
                complete: t.complete,
            });
            encoded.extend_from_slice(&t.encoded);
            let n = t.len();
            source.extend((0..n).map(|i| (first_state + i) as i64));
            target_not_terminal
                .extend((0..n).map(|i| if t.complete && i + 1 == n { 0f32 } else { 1f32 }));
            actions.extend_from_slice(&t.actions);
            backward_actions.extend_from_slice(&t.backward_actions);
            energies.extend_from_slice(&t.energies);
            let bias = |&allowed: &bool| if allowed { 0f32 } else { INVALID_LOGIT };
            forward_bias.extend(t.forward_masks.iter().map(bias));
            backward_bias.extend(t.backward_masks.iter().map(bias));
        }
        let target: Vec<i64> = source.iter().map(|&s| s + 1).collect();
        let (s, t) = (states_n as i64, trans_n as i64);
        let put = |x: Tensor| {
            if pinned {
                x.pin_memory(Device::Cuda(0))
            } else {
                x
            }
        };
        TransitionBatch {
            states: put(Tensor::from_slice(&encoded).view([s, dim as i64])),
            source: put(Tensor::from_slice(&source)),
            target: put(Tensor::from_slice(&target)),
            actions: put(Tensor::from_slice(&actions)),
            backward_actions: put(Tensor::from_slice(&backward_actions)),
            forward_bias: put(Tensor::from_slice(&forward_bias).view([t, fwd as i64])),
            backward_bias: put(Tensor::from_slice(&backward_bias).view([t, bwd as i64])),
            energies: put(Tensor::from_slice(&energies).to_kind(Kind::Float)),
            target_not_terminal: put(Tensor::from_slice(&target_not_terminal)),
            spans,
            transitions: trans_n,
        }
    }
}

impl TransitionBatch {
    /// The same batch on `device`. From pinned host memory to a GPU the
    /// copies are queued without waiting; on the CPU nothing is copied.
    pub fn to_device(self, device: Device) -> Self {
        if device == Device::Cpu {
            return self;
        }
        let put = |x: &Tensor| x.to_device_(device, x.kind(), true, false);
        TransitionBatch {
            states: put(&self.states),
            source: put(&self.source),
            target: put(&self.target),
            actions: put(&self.actions),
            backward_actions: put(&self.backward_actions),
            forward_bias: put(&self.forward_bias),
            backward_bias: put(&self.backward_bias),
            energies: put(&self.energies),
            target_not_terminal: put(&self.target_not_terminal),
            spans: self.spans,
            transitions: self.transitions,
        }
    }
}

/// Added to the logit of an action that is not allowed: far below any
/// real logit, yet finite, so no NaN can reach the gradient.
pub const INVALID_LOGIT: f32 = -1e9;

/// log P(action) under logits restricted to the valid actions, for the rows
/// `rows` of `logits`; `bias` is 0 for valid actions and [`INVALID_LOGIT`]
/// for the others.
pub fn masked_log_prob(logits: &Tensor, rows: &Tensor, bias: &Tensor, action: &Tensor) -> Tensor {
    (logits.index_select(0, rows) + bias)
        .log_softmax(-1, Kind::Float)
        .gather(1, &action.unsqueeze(1), false)
        .squeeze_dim(1)
}
