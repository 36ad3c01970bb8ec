//! Detailed balance, plain (DB) and forward-looking (FL-DB).
//!
//! With the flow reparameterised as log F(s) = log F~(s) - E(s), detailed
//! balance on one transition s -> s' becomes
//!
//! ```text
//! log F~(s) + log P_F(s'|s) - log F~(s') - log P_B(s|s') + E(s -> s') = 0
//! ```
//!
//! which needs only the local energy term, so every transition is a training
//! example, including those of truncated trajectories. At a terminal state
//! F(x) = R(x) = exp(-E(x)), i.e. log F~(x) = 0: the boundary is pinned, not
//! learned (a free terminal flow lets the loss decouple from the reward).
//!
//! Plain DB is the same residual without the energy term and with
//! log F(x) = -E(x) at terminal states: only transitions into a terminal
//! state see the reward, so its signal travels back one step per update.
//! With every intermediate energy 0 the two coincide.

use tch::{Kind, Tensor};

use super::{Flow, Objective, TransitionBatch, scored_log_probs};
use crate::config::BackwardPolicy;
use crate::policy::PolicyOutput;

/// The (FL-)DB loss: mean squared residual over all transitions.
#[derive(Clone, Copy, Debug)]
pub struct DetailedBalance {
    flow: Flow,
    backward: BackwardPolicy,
}

impl DetailedBalance {
    /// DB with `Flow::Plain`, FL-DB with `Flow::ForwardLooking`.
    pub fn new(flow: Flow, backward: BackwardPolicy) -> Self {
        DetailedBalance { flow, backward }
    }

    /// One residual per transition, `[T]`. Both sides of each transition
    /// come from one selection of the network's output (see
    /// [`scored_log_probs`]): log F(s) + log P_F(s'|s) on the rows of the
    /// sources, log F(s') + log P_B(s|s') on those of the targets.
    pub fn residuals(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor {
        let (rows, log_probs) = scored_log_probs(output, batch, self.backward);
        let window = batch.scored_window as i64;
        let flows = rows.narrow(1, window, 1) * &batch.scored_flow_weight;
        let sides = (log_probs + flows).view([2, batch.transitions as i64]);
        let balance = sides.get(0) - sides.get(1);
        match self.flow {
            Flow::ForwardLooking => balance + &batch.energies,
            // log F(x) = -E(x) at a terminal target, outside the network.
            Flow::Plain => {
                balance
                    + (&batch.state_energies * &batch.state_terminal).index_select(0, &batch.target)
            }
        }
    }
}

impl Objective for DetailedBalance {
    fn name(&self) -> &'static str {
        match self.flow {
            Flow::ForwardLooking => "fl_db",
            Flow::Plain => "db",
        }
    }

    fn loss(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor {
        self.residuals(output, batch).square().mean(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    const FL_DB: DetailedBalance = DetailedBalance {
        flow: Flow::ForwardLooking,
        backward: BackwardPolicy::Learned,
    };
    use crate::trajectory::ReplayedTrajectory;

    /// s0 --a=0--> s1 --a=1--> s2 with two forward and two backward actions.
    /// At s1 only forward action 1 is valid and only backward action 0.
    fn two_step(complete: bool) -> ReplayedTrajectory {
        ReplayedTrajectory {
            encoded: vec![0.0; 3],
            forward_masks: vec![true, true, false, true],
            backward_masks: vec![true, false, true, true],
            actions: vec![0, 1],
            backward_actions: vec![0, 1],
            energies: vec![0.25, -0.5],
            complete,
            final_state: vec![],
        }
    }

    fn output(log_flow: [f32; 3]) -> PolicyOutput {
        PolicyOutput::from_parts(
            // Row s0: logits (1, 0); row s1: anything (one valid action);
            // row s2: no forward use.
            &Tensor::from_slice(&[1.0f32, 0.0, 5.0, -2.0, 0.0, 0.0]).view([3, 2]),
            // Row s1: one valid backward action; row s2: logits (0, ln 3).
            &Tensor::from_slice(&[0.0f32, 0.0, 7.0, 1.0, 0.0, 3f32.ln()]).view([3, 2]),
            &Tensor::from_slice(&log_flow),
        )
    }

    fn batch(trajectory: &ReplayedTrajectory) -> TransitionBatch {
        TransitionBatch::new([trajectory], (1, 2, 2), Device::Cpu)
    }

    #[test]
    fn matches_a_hand_computed_two_step_example() {
        let (f0, f1, f2) = (0.3f32, -0.2f32, 9.0f32);
        let trajectory = two_step(true);
        let loss = FL_DB.loss(&output([f0, f1, f2]), &batch(&trajectory));
        // log P_F(a=0 | s0) = 1 - ln(e + 1); P_F at s1 and P_B at s1 are
        // certain (one valid action); log P_B(b=1 | s2) = ln 3 - ln 4.
        let log_pf0 = 1.0 - (1f64.exp() + 1.0).ln();
        let log_pb2 = 3f64.ln() - 4f64.ln();
        let r0 = f64::from(f0) + log_pf0 - f64::from(f1) - 0.0 + 0.25;
        // s2 is terminal: log F~(s2) is pinned to 0, whatever the net says.
        let r1 = f64::from(f1) + 0.0 - 0.0 - log_pb2 - 0.5;
        let expected = (r0 * r0 + r1 * r1) / 2.0;
        assert!((loss.double_value(&[]) - expected).abs() < 1e-5);
    }

    #[test]
    fn terminal_flow_output_is_ignored() {
        let trajectory = two_step(true);
        let a = FL_DB.loss(&output([0.3, -0.2, 9.0]), &batch(&trajectory));
        let b = FL_DB.loss(&output([0.3, -0.2, -4.0]), &batch(&trajectory));
        assert_eq!(a.double_value(&[]), b.double_value(&[]));
    }

    #[test]
    fn a_truncated_prefix_contributes_exactly_its_transitions() {
        let mut prefix = two_step(false);
        prefix.encoded.truncate(2);
        prefix.forward_masks.truncate(2);
        prefix.backward_masks.truncate(2);
        prefix.actions.truncate(1);
        prefix.backward_actions.truncate(1);
        prefix.energies.truncate(1);
        let (f0, f1) = (0.3f32, -0.2f32);
        let out = output([f0, f1, 0.0]);
        let out = PolicyOutput::new(out.heads.narrow(0, 0, 2), 2, 2);
        let b = batch(&prefix);
        let r = FL_DB.residuals(&out, &b);
        assert_eq!(r.size(), [1]);
        // Not terminal: log F~(s1) is the network's, not 0.
        let log_pf0 = 1.0 - (1f64.exp() + 1.0).ln();
        let expected = f64::from(f0) + log_pf0 - f64::from(f1) + 0.25;
        assert!((r.double_value(&[0]) - expected).abs() < 1e-5);
    }
}
