//! Trajectory balance (TB): one residual per complete trajectory,
//!
//! ```text
//! log Z + sum_t log P_F(s_{t+1}|s_t) - log R(x) - sum_t log P_B(s_t|s_{t+1})
//! ```
//!
//! with log Z a learned scalar of its own, trained by its own Adam at
//! `objective.log_z_learning_rate` (it has to travel ~12 nats on the small
//! set task, far more than any weight). It lives here, not in the policy:
//! actors never need it. A truncated prefix has no reward, so the learner
//! drops those before they reach the batch; any that do reach it count zero.

use tch::{Device, Kind, Tensor, nn};

use super::{Objective, TransitionBatch, trajectory_log_ratios};
use crate::config::BackwardPolicy;
use crate::policy::PolicyOutput;

/// The TB loss and its learned log Z.
#[derive(Debug)]
pub struct TrajectoryBalance {
    backward: BackwardPolicy,
    /// Holds `log_z` (for the optimizer and checkpoints).
    vars: nn::VarStore,
    log_z: Tensor,
    learning_rate: f64,
}

impl TrajectoryBalance {
    /// TB with log Z starting at 0 on `device`.
    pub fn new(backward: BackwardPolicy, learning_rate: f64, device: Device) -> Self {
        let vars = nn::VarStore::new(device);
        let log_z = vars.root().zeros("log_z", &[]);
        TrajectoryBalance {
            backward,
            vars,
            log_z,
            learning_rate,
        }
    }

    /// Sets log Z (tests start it at the exact value).
    pub fn set_log_z(&mut self, value: f64) {
        let _guard = tch::no_grad_guard();
        let _ = self.log_z.fill_(value);
    }

    /// The learned log Z as a tensor (its gradient is checked in tests).
    pub fn log_z(&self) -> &Tensor {
        &self.log_z
    }

    /// One residual per trajectory, `[B]`, and 1 where the trajectory is
    /// complete (0 for a truncated prefix, which TB cannot score).
    pub fn residuals(&self, output: &PolicyOutput, batch: &TransitionBatch) -> (Tensor, Tensor) {
        let grid = &batch.padded;
        let ratios = trajectory_log_ratios(output, batch, self.backward);
        // The grid's last column is each trajectory's last state.
        let last = grid.states.select(1, grid.longest as i64);
        let final_energy = batch.state_energies.index_select(0, &last);
        let complete = batch.state_terminal.index_select(0, &last);
        // log R(x) = -E(x).
        let residuals = &self.log_z + ratios + final_energy;
        (residuals, complete)
    }
}

impl Objective for TrajectoryBalance {
    fn name(&self) -> &'static str {
        "tb"
    }

    fn loss(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor {
        let (residuals, complete) = self.residuals(output, batch);
        (residuals.square() * &complete).sum(Kind::Float) / complete.sum(Kind::Float).clamp_min(1.0)
    }

    fn own_parameters(&self) -> Option<(&nn::VarStore, f64)> {
        Some((&self.vars, self.learning_rate))
    }

    fn learned_log_z(&self) -> Option<Tensor> {
        let _guard = tch::no_grad_guard();
        Some(self.log_z.detach().copy())
    }
}
