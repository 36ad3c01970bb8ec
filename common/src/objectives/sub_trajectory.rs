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
//! trajectories in a grid, so every pair of every trajectory is one element
//! of a `[B, L + 1, L + 1]` tensor: a handful of kernels per step. Where
//! many short prefixes sit beside long trajectories, that grid would be
//! mostly padding, and the loss takes one grid per length class instead,
//! so its memory stays a few times transitions x L however lengths mix.

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
    /// length), and the normalised weight of each, zero elsewhere: the
    /// whole batch in one grid (the loss works bucket by bucket).
    pub fn pair_residuals(
        &self,
        output: &PolicyOutput,
        batch: &TransitionBatch,
    ) -> (Tensor, Tensor) {
        let potentials = self.potentials(output, batch);
        self.pairs(
            &potentials,
            &batch.padded.lengths,
            batch.padded.longest as i64,
        )
    }

    /// `[B, L + 1]`: log F(s_k) minus the terms summed from s_0 to s_k, so
    /// that a pair's residual is the difference of two entries.
    fn potentials(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor {
        let grid = &batch.padded;
        let (b, l) = (batch.trajectories as i64, grid.longest as i64);
        let flows = state_log_flows(output, batch, self.flow)
            .index_select(0, &grid.states.view(-1))
            .view([b, l + 1]);
        let terms = grid.by_trajectory(&transition_terms(output, batch, self.flow, self.backward));
        let to_state = Tensor::cat(
            &[
                terms.zeros_like().narrow(1, 0, 1),
                terms.cumsum(1, Kind::Float),
            ],
            1,
        );
        flows - to_state
    }

    /// The pairs of trajectories whose potentials are `potentials`
    /// (`[B', l + 1]`, none longer than `l`) and lengths `lengths`
    /// (`[B']`): residuals and normalised weights, `[B', l + 1, l + 1]`.
    fn pairs(&self, potentials: &Tensor, lengths: &Tensor, l: i64) -> (Tensor, Tensor) {
        let b = potentials.size()[0];
        let device = potentials.device();
        // residual[b, i, j] = log F(s_i) - log F(s_j) + (to_state[j] - to_state[i])
        let residuals = potentials.unsqueeze(2) - potentials.unsqueeze(1);

        let index = Tensor::arange(l + 1, (Kind::Int64, device));
        let span = (index.unsqueeze(0) - index.unsqueeze(1)).to_kind(Kind::Float);
        let pair = index
            .unsqueeze(0)
            .gt_tensor(&index.unsqueeze(1))
            .unsqueeze(0)
            .logical_and(
                &index
                    .view([1, 1, l + 1])
                    .le_tensor(&lengths.view([b, 1, 1])),
            );
        // lambda^(j - i), shifted by the largest exponent of a pair so that
        // nothing overflows, nor underflows for a tiny lambda (the
        // normalisation removes the shift): the whole trajectory's when
        // lambda > 1 (per trajectory), a single step's when lambda <= 1
        // (the same for all).
        let log_weights = if self.log_lambda > 0.0 {
            let whole = lengths.to_kind(Kind::Float) * self.log_lambda;
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

/// Whether one grid per length class (`buckets`) holds at most a quarter
/// of the cells of one grid for the whole batch (`trajectories` x
/// (`longest` + 1)^2): then their extra kernels pay for themselves, and
/// the whole batch's grid is never more than four times the classes'.
pub(super) fn worth_splitting(
    buckets: &[super::LengthBucket],
    trajectories: usize,
    longest: usize,
) -> bool {
    let square = |l: usize| ((l + 1) * (l + 1)) as f64;
    let split: f64 = buckets
        .iter()
        .map(|b| b.count as f64 * square(b.longest))
        .sum();
    buckets.len() > 1 && 4.0 * split <= trajectories as f64 * square(longest)
}

impl Objective for SubTrajectoryBalance {
    fn name(&self) -> &'static str {
        match self.flow {
            Flow::ForwardLooking => "fl_sub_tb",
            Flow::Plain => "sub_tb",
        }
    }

    fn loss(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor {
        let grid = &batch.padded;
        let potentials = self.potentials(output, batch);
        let weighted = |(residuals, weights): (Tensor, Tensor)| {
            (residuals.square() * weights).sum(Kind::Float)
        };
        let total = match &grid.buckets[..] {
            // One grid for the batch where length classes would save
            // little (complete trajectories, evenly cut prefixes): fewer
            // kernels. Many short prefixes beside a long trajectory take
            // one grid per class instead, so their memory stays near
            // transitions x L.
            buckets if !worth_splitting(buckets, batch.trajectories, grid.longest) => {
                weighted(self.pairs(&potentials, &grid.lengths, grid.longest as i64))
            }
            buckets => buckets
                .iter()
                .map(|bucket| {
                    let rows = grid
                        .order
                        .narrow(0, bucket.first as i64, bucket.count as i64);
                    let l = bucket.longest as i64;
                    weighted(self.pairs(
                        &potentials.index_select(0, &rows).narrow(1, 0, l + 1),
                        &grid.lengths.index_select(0, &rows),
                        l,
                    ))
                })
                .reduce(|sum, part| sum + part)
                .unwrap_or_else(|| unreachable!("two buckets or more")),
        };
        total / batch.trajectories.max(1) as f64
    }
}
