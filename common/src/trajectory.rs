//! Trajectories as actors produce them and as the learner replays them.
//!
//! On the wire a trajectory is its actions plus one local energy term per
//! transition ([`Trajectory`]). The learner replays the actions through its
//! own environment ([`replay`]): that rebuilds every state, checks every
//! action against the forward mask, and yields the encodings and masks the
//! loss needs ([`ReplayedTrajectory`]). Replay runs on the ingest path, off
//! the trainer thread.

use crate::env::{Environment, InvalidAction, State};

/// Largest |E(s -> s')| accepted for one transition. Far above any task's
/// local terms, and low enough that squared residuals summed over a batch
/// stay finite in f32: one hostile value cannot turn the model into NaN.
pub const MAX_ABS_ENERGY: f32 = 1e6;

/// One trajectory from s0: complete, or a prefix cut before its terminal
/// state. `actions` and `energies` have one entry per transition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trajectory {
    /// Forward action index of each step.
    pub actions: Vec<u32>,
    /// Local energy term E(s_t -> s_{t+1}) of each step.
    pub energies: Vec<f32>,
}

impl Trajectory {
    /// Number of transitions.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// True for a trajectory with no transition.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// A batch of trajectories from one actor, all sampled by one policy version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrajectoryChunk {
    /// The actor that sampled it (assigned at the handshake).
    pub actor_id: u64,
    /// The weight version that sampled it.
    pub policy_version: u64,
    /// Position in the actor's output; gaps show lost chunks.
    pub sequence: u64,
    /// The trajectories.
    pub trajectories: Vec<Trajectory>,
    /// Credits the actor still held, unstarted, when it finished the chunk.
    pub credits_left: u32,
}

impl TrajectoryChunk {
    /// Transitions in all trajectories.
    pub fn transitions(&self) -> usize {
        self.trajectories.iter().map(Trajectory::len).sum()
    }
}

/// Why a trajectory cannot be replayed. Field names are relative to the
/// trajectory (`actions[3]`), so callers can prefix the chunk position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplayError {
    /// No transition at all: nothing to learn from.
    #[error("`actions` is empty")]
    Empty,
    /// More transitions than any trajectory of the task has.
    #[error("`actions` has {len} entries, more than the task's longest trajectory ({max})")]
    TooLong {
        /// Transitions sent.
        len: usize,
        /// The task's maximum.
        max: usize,
    },
    /// `actions` and `energies` disagree in length.
    #[error("`energies` has {energies} entries but `actions` has {actions}")]
    LengthMismatch {
        /// Length of `actions`.
        actions: usize,
        /// Length of `energies`.
        energies: usize,
    },
    /// An energy term is NaN, infinite or beyond [`MAX_ABS_ENERGY`].
    #[error("`energies[{step}]` is {value}, outside the accepted range [-1e6, 1e6]")]
    EnergyOutOfRange {
        /// Transition index.
        step: usize,
        /// The value sent.
        value: f32,
    },
    /// An action the environment does not allow at that point.
    #[error("`actions[{step}]`: {source}")]
    InvalidAction {
        /// Transition index.
        step: usize,
        /// What the environment said.
        source: InvalidAction,
    },
}

/// A trajectory rebuilt by the learner, with everything the loss needs as
/// flat host arrays. With n transitions there are n + 1 states.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayedTrajectory {
    /// Encodings of s_0..s_n, `(n + 1) * state_dim` values.
    pub encoded: Vec<f32>,
    /// Valid forward actions at s_0..s_{n-1}, `n * forward_actions`.
    pub forward_masks: Vec<bool>,
    /// Valid backward actions at s_1..s_n, `n * backward_actions`.
    pub backward_masks: Vec<bool>,
    /// Forward action of each transition.
    pub actions: Vec<i64>,
    /// The backward action undoing each transition, scored in s_{t+1}.
    pub backward_actions: Vec<i64>,
    /// Local energy terms as the actor sent them.
    pub energies: Vec<f32>,
    /// Whether s_n is terminal (false for a truncated prefix).
    pub complete: bool,
    /// s_n itself.
    pub final_state: State,
}

impl ReplayedTrajectory {
    /// Number of transitions.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// Bytes this trajectory holds: the struct and its buffers. What a
    /// chunk waiting for the trainer costs the learner.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.encoded.capacity() * std::mem::size_of::<f32>()
            + self.forward_masks.capacity()
            + self.backward_masks.capacity()
            + self.actions.capacity() * std::mem::size_of::<i64>()
            + self.backward_actions.capacity() * std::mem::size_of::<i64>()
            + self.energies.capacity() * std::mem::size_of::<f32>()
            + self.final_state.capacity()
    }

    /// The most [`held_bytes`](Self::held_bytes) of a trajectory of up to
    /// `transitions` transitions replayed in `env`: what the learner sets
    /// aside for each trajectory a credit allows, before it arrives.
    pub fn max_held_bytes(env: &dyn Environment, transitions: usize) -> usize {
        let per_transition = env.forward_actions()
            + env.backward_actions()
            + 2 * std::mem::size_of::<i64>()
            + std::mem::size_of::<f32>();
        std::mem::size_of::<Self>()
            + (transitions + 1) * env.state_dim() * std::mem::size_of::<f32>()
            + transitions * per_transition
            + env.initial_state().len()
    }

    /// True when there is no transition (never after a successful replay).
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Sum of the energy terms: E(s_n).
    pub fn energy(&self) -> f64 {
        self.energies.iter().map(|&e| f64::from(e)).sum()
    }
}

/// The checks of [`replay`] that need no replay: lengths, and energies
/// finite and within range. Cheap (one pass over the energies), so a
/// learner can refuse a malformed chunk before it waits for a replay slot.
pub fn check_fields(env: &dyn Environment, trajectory: &Trajectory) -> Result<(), ReplayError> {
    let n = trajectory.actions.len();
    if n == 0 {
        return Err(ReplayError::Empty);
    }
    if n > env.max_trajectory_len() {
        return Err(ReplayError::TooLong {
            len: n,
            max: env.max_trajectory_len(),
        });
    }
    if trajectory.energies.len() != n {
        return Err(ReplayError::LengthMismatch {
            actions: n,
            energies: trajectory.energies.len(),
        });
    }
    if let Some((step, &value)) = trajectory
        .energies
        .iter()
        .enumerate()
        .find(|(_, e)| e.is_nan() || e.abs() > MAX_ABS_ENERGY)
    {
        return Err(ReplayError::EnergyOutOfRange { step, value });
    }
    Ok(())
}

/// Replays `trajectory` from the initial state, validating every field.
pub fn replay(
    env: &dyn Environment,
    trajectory: &Trajectory,
) -> Result<ReplayedTrajectory, ReplayError> {
    check_fields(env, trajectory)?;
    let n = trajectory.actions.len();
    let (dim, fwd, bwd) = (
        env.state_dim(),
        env.forward_actions(),
        env.backward_actions(),
    );
    let mut encoded = vec![0f32; (n + 1) * dim];
    let mut forward_masks = vec![false; n * fwd];
    let mut backward_masks = vec![false; n * bwd];
    let mut backward_actions = Vec::with_capacity(n);
    let mut state = env.initial_state();
    env.encode(&state, &mut encoded[..dim]);
    for (t, &action) in trajectory.actions.iter().enumerate() {
        env.forward_mask(&state, &mut forward_masks[t * fwd..(t + 1) * fwd]);
        let back = env
            .step(&mut state, action as usize)
            .map_err(|source| ReplayError::InvalidAction { step: t, source })?;
        backward_actions.push(back as i64);
        env.encode(&state, &mut encoded[(t + 1) * dim..(t + 2) * dim]);
        env.backward_mask(&state, &mut backward_masks[t * bwd..(t + 1) * bwd]);
    }
    Ok(ReplayedTrajectory {
        encoded,
        forward_masks,
        backward_masks,
        actions: trajectory.actions.iter().map(|&a| i64::from(a)).collect(),
        backward_actions,
        energies: trajectory.energies.clone(),
        complete: env.is_terminal(&state),
        final_state: state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::set_generation::SetGeneration;

    /// Universe of 4, sets of 2, element energies 0.0, 1.0, 0.0, 1.0.
    fn env() -> SetGeneration {
        SetGeneration::from_parts(4, 2, vec![0.0, 1.0]).unwrap()
    }

    fn trajectory(actions: &[u32], energies: &[f32]) -> Trajectory {
        Trajectory {
            actions: actions.to_vec(),
            energies: energies.to_vec(),
        }
    }

    #[test]
    fn held_bytes_stay_within_the_bound_set_aside_for_them() {
        use crate::tasks::lattice::{Lattice, LatticeConfig, SiteOrder};
        let lattice = Lattice::new(&LatticeConfig {
            side: 3,
            order: SiteOrder::Any,
            ..LatticeConfig::default()
        })
        .unwrap();
        let envs: [&dyn Environment; 2] = [&env(), &lattice];
        for env in envs {
            let mut state = env.initial_state();
            let mut actions = Vec::new();
            let mut mask = vec![false; env.forward_actions()];
            while !env.is_terminal(&state) {
                env.forward_mask(&state, &mut mask);
                let action = mask.iter().position(|&valid| valid).unwrap();
                env.step(&mut state, action).unwrap();
                actions.push(action as u32);
            }
            let n = actions.len();
            assert_eq!(n, env.max_trajectory_len());
            let replayed = replay(env, &trajectory(&actions, &vec![0.0; n])).unwrap();
            let bound = ReplayedTrajectory::max_held_bytes(env, n);
            // A bound, and a tight one: it sizes credits, so slack would
            // turn away chunks that fit.
            assert!(
                replayed.held_bytes() <= bound,
                "{} > {bound}",
                replayed.held_bytes()
            );
            assert_eq!(replayed.held_bytes(), bound, "{env:?}");
            let prefix = replay(env, &trajectory(&actions[..1], &[0.0])).unwrap();
            assert!(prefix.held_bytes() <= ReplayedTrajectory::max_held_bytes(env, 1));
        }
    }

    #[test]
    fn a_complete_trajectory_replays_into_states_and_masks() {
        let replayed = replay(&env(), &trajectory(&[1, 2], &[1.0, 0.0])).unwrap();
        assert!(replayed.complete);
        assert_eq!(replayed.final_state, vec![0, 1, 1, 0]);
        assert_eq!(
            replayed.encoded,
            [0., 0., 0., 0., 0., 1., 0., 0., 0., 1., 1., 0.]
        );
        // At s0 every element may be added; at s1 all but element 1.
        assert_eq!(
            replayed.forward_masks,
            [true, true, true, true, true, false, true, true]
        );
        // At s1 only element 1 may be removed; at s2 elements 1 and 2.
        assert_eq!(
            replayed.backward_masks,
            [false, true, false, false, false, true, true, false]
        );
        assert_eq!(replayed.backward_actions, [1, 2]);
        assert_eq!(replayed.energy(), 1.0);
    }

    #[test]
    fn a_prefix_replays_as_incomplete() {
        let replayed = replay(&env(), &trajectory(&[3], &[1.0])).unwrap();
        assert!(!replayed.complete);
        assert_eq!(replayed.len(), 1);
    }

    #[test]
    fn malformed_trajectories_are_refused_with_the_field() {
        let env = env();
        assert_eq!(replay(&env, &trajectory(&[], &[])), Err(ReplayError::Empty));
        assert!(matches!(
            replay(&env, &trajectory(&[0, 1, 2], &[0.0; 3])),
            Err(ReplayError::TooLong { len: 3, max: 2 })
        ));
        assert!(matches!(
            replay(&env, &trajectory(&[0, 1], &[0.0])),
            Err(ReplayError::LengthMismatch {
                actions: 2,
                energies: 1
            })
        ));
        for bad in [f32::INFINITY, f32::NAN, 2e6, -1e30] {
            let error = replay(&env, &trajectory(&[0, 1], &[0.0, bad])).unwrap_err();
            assert!(error.to_string().contains("energies[1]"), "{error}");
        }
        assert!(replay(&env, &trajectory(&[0, 1], &[-1e6, 1e6])).is_ok());
        // Adding the same element twice, and an element outside the universe.
        let error = replay(&env, &trajectory(&[2, 2], &[0.0, 0.0])).unwrap_err();
        assert!(
            matches!(error, ReplayError::InvalidAction { step: 1, .. }),
            "{error}"
        );
        assert!(error.to_string().starts_with("`actions[1]`"), "{error}");
        let error = replay(&env, &trajectory(&[9], &[0.0])).unwrap_err();
        assert!(
            matches!(error, ReplayError::InvalidAction { step: 0, .. }),
            "{error}"
        );
    }
}
