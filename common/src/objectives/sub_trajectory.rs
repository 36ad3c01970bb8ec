//! Sub-trajectory balance, plain (SubTB(lambda)) and forward-looking
//! (FL-SubTB(lambda)).
//!
//! For every pair of states s_i, s_j (i < j) of one trajectory the balance
//! condition over the sub-trajectory between them is
//!
//! ```text
//! log F(s_i) + sum_{t=i}^{j-1} [log P_F - log P_B] - log F(s_j) = 0
//! ```
//!
//! With forward-looking flows the network's head is log F~ and each step
//! adds its energy term, so the sum also holds E(s_j) - E(s_i): every pair
//! trains, including those of truncated trajectories. Plain SubTB sees the
//! reward only through pairs that end at a terminal state.
//!
//! Each pair's squared residual weighs lambda^(j - i); a trajectory's
//! weights are normalised to sum to one and the loss is the mean over
//! trajectories. The batch's [`PaddedLayout`](super::PaddedLayout) puts the
//! trajectories in a grid, so every pair of every trajectory is one
//! element of a `[B, L + 1, L + 1]` tensor: a handful of kernels per step
//! whatever the batch holds.

use tch::{Kind, Tensor};

use super::{Flow, Objective, TransitionBatch, state_log_flows, transition_terms};
use crate::config::BackwardPolicy;
use crate::policy::PolicyOutput;

/// The (FL-)SubTB(lambda) loss.
#[derive(Clone, Copy, Debug)]
pub struct SubTrajectoryBalance {
    flow: Flow,
    /// ln lambda: weights are computed in log space.
    log_lambda: f64,
    backward: BackwardPolicy,
}

impl SubTrajectoryBalance {
    /// SubTB with `Flow::Plain`, FL-SubTB with `Flow::ForwardLooking`;
    /// `lambda` > 0 (the configuration checks it).
    pub fn new(flow: Flow, lambda: f64, backward: BackwardPolicy) -> Self {
        SubTrajectoryBalance {
            flow,
            log_lambda: lambda.ln(),
            backward,
        }
    }

    /// Residuals of every pair, `[B, L + 1, L + 1]` (entry `[b, i, j]` for
    /// the pair s_i, s_j of trajectory b; meaningful where i < j <= its
    /// length), and the normalised weight of each, zero elsewhere.
    pub fn pair_residuals(
        &self,
        output: &PolicyOutput,
        batch: &TransitionBatch,
    ) -> (Tensor, Tensor) {
        let grid = &batch.padded;
        let (b, l) = (batch.trajectories as i64, grid.longest as i64);
        let device = batch.states.device();
        let flows = state_log_flows(output, batch, self.flow)
            .index_select(0, &grid.states.view(-1))
            .view([b, l + 1]);
        let lengths = grid.lengths.unsqueeze(1);
        let terms = grid.by_trajectory(&transition_terms(output, batch, self.flow, self.backward));
        // Sums of the terms from s_0 to each state: a sub-trajectory's sum
        // is a difference of two.
        let to_state = Tensor::cat(
            &[
                terms.zeros_like().narrow(1, 0, 1),
                terms.cumsum(1, Kind::Float),
            ],
            1,
        );
        let g = flows - to_state;
        // residual[b, i, j] = log F(s_i) - log F(s_j) + (to_state[j] - to_state[i])
        let residuals = g.unsqueeze(2) - g.unsqueeze(1);

        let index = Tensor::arange(l + 1, (Kind::Int64, device));
        let span = (index.unsqueeze(0) - index.unsqueeze(1)).to_kind(Kind::Float);
        let pair = index
            .unsqueeze(0)
            .gt_tensor(&index.unsqueeze(1))
            .unsqueeze(0)
            .logical_and(&index.view([1, 1, l + 1]).le_tensor(&lengths.unsqueeze(2)));
        // lambda^(j - i), shifted by the largest exponent of a pair so that
        // nothing overflows, nor underflows for a tiny lambda (the
        // normalisation removes the shift): the whole trajectory's when
        // lambda > 1 (per trajectory), a single step's when lambda <= 1
        // (the same for all).
        let log_weights = if self.log_lambda > 0.0 {
            let whole = grid.lengths.to_kind(Kind::Float) * self.log_lambda;
            (span * self.log_lambda).unsqueeze(0) - whole.view([b, 1, 1])
        } else {
            ((span - 1.0) * self.log_lambda).unsqueeze(0)
        };
        // Cells that are not pairs (i >= j, or past the trajectory's end)
        // are set to -inf before exp, not multiplied by zero after it:
        // their exponents reach L |ln lambda| and overflow f32 (then inf x 0
        // = NaN) for a small lambda on long trajectories, or a large one
        // on short prefixes padded to a long batch.
        let log_weights = log_weights.masked_fill(&pair.logical_not(), f64::NEG_INFINITY);
        let weights = log_weights.exp();
        // A trajectory always has a pair (replay refuses empty ones); the
        // floor only keeps a weightless row from dividing 0 by 0.
        let totals = weights
            .sum_dim_intlist(&[1i64, 2][..], true, Kind::Float)
            .clamp_min(f64::from(f32::MIN_POSITIVE));
        (residuals, weights / totals)
    }
}

impl Objective for SubTrajectoryBalance {
    fn name(&self) -> &'static str {
        match self.flow {
            Flow::ForwardLooking => "fl_sub_tb",
            Flow::Plain => "sub_tb",
        }
    }

    fn trains_on_truncated(&self) -> bool {
        true
    }

    fn loss(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor {
        let (residuals, weights) = self.pair_residuals(output, batch);
        (residuals.square() * weights).sum(Kind::Float) / batch.trajectories.max(1) as f64
    }
}
