//! Sampling trajectories from a policy, many environments in lockstep.
//!
//! Actors use it with exploration and truncation to produce training data;
//! the learner's evaluator uses it without either to draw fresh on-policy
//! samples. One network call per step serves every environment still
//! running; the action draw itself happens on the host with a seeded RNG, so
//! a run is reproducible from its seed.

use rand::Rng;
use rand::rngs::SmallRng;

use crate::config::{ActorConfig, TruncateAt};
use crate::env::{Environment, State};
use crate::policy::{Policy, to_host_f32};
use crate::trajectory::Trajectory;

/// SplitMix64's finaliser: spreads nearby inputs (seeds, ids, steps) far
/// apart, so that streams seeded from them share nothing.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// How the behaviour policy departs from the learned one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Behaviour {
    /// Weight of the uniform distribution over valid actions:
    /// (1 - epsilon) P_F + epsilon U. Keeps full support, which off-policy
    /// GFlowNet training needs.
    pub epsilon: f64,
    /// Probability that a trajectory is cut off before its terminal state.
    pub truncate_fraction: f64,
    /// Where a cut trajectory ends.
    pub truncate_at: TruncateAt,
    /// Transitions kept with [`TruncateAt::Cap`].
    pub truncate_cap: usize,
}

impl From<&ActorConfig> for Behaviour {
    /// An actor's exploration and truncation, as configured.
    fn from(actor: &ActorConfig) -> Self {
        Behaviour {
            epsilon: actor.epsilon,
            truncate_fraction: actor.truncate_fraction,
            truncate_at: actor.truncate_at,
            truncate_cap: actor.truncate_cap,
        }
    }
}

impl Behaviour {
    /// How many transitions the next trajectory may take: `max_len`, or
    /// for the `truncate_fraction` that are cut, a prefix length below it.
    pub fn draw_length(&self, max_len: usize, rng: &mut SmallRng) -> usize {
        if max_len < 2 || rng.random::<f64>() >= self.truncate_fraction {
            return max_len;
        }
        match self.truncate_at {
            TruncateAt::Uniform => rng.random_range(1..max_len),
            TruncateAt::Cap => self.truncate_cap.clamp(1, max_len - 1),
        }
    }
}

/// What a rollout produced: one trajectory and its last state per
/// environment, in order.
#[derive(Clone, Debug, Default)]
pub struct Rollout {
    /// Actions and local energy terms.
    pub trajectories: Vec<Trajectory>,
    /// The state each trajectory ended in (terminal unless truncated).
    pub final_states: Vec<State>,
    /// Draws made uniformly over the valid actions because the policy's
    /// logits at the state were not all finite: finite weights can still
    /// overflow f32 arithmetic (a diverged model), and a softmax of NaN or
    /// infinite logits is no distribution (drawn from anyway, it picked
    /// the last valid action at every such state). Worth a warning.
    pub non_finite_draws: usize,
}

/// Rolls out `count` trajectories from s0 with `policy` and `behaviour`.
pub fn rollout(
    env: &dyn Environment,
    policy: &Policy,
    count: usize,
    behaviour: Behaviour,
    rng: &mut SmallRng,
) -> Rollout {
    rollout_unless(env, policy, count, behaviour, rng, &|| false)
        .unwrap_or_else(|| unreachable!("never abandoned"))
}

/// [`rollout`], abandoned (None) at its next lockstep step once `abandon`
/// returns true: an actor need not finish a long rollout whose chunk
/// could no longer be sent (it is stopping, or the session it was for has
/// ended).
pub fn rollout_unless(
    env: &dyn Environment,
    policy: &Policy,
    count: usize,
    behaviour: Behaviour,
    rng: &mut SmallRng,
    abandon: &dyn Fn() -> bool,
) -> Option<Rollout> {
    let (actions_n, max_len) = (env.forward_actions(), env.max_trajectory_len());
    let mut states = vec![env.initial_state(); count];
    let mut trajectories = vec![Trajectory::default(); count];
    let cut_at: Vec<usize> = (0..count)
        .map(|_| behaviour.draw_length(max_len, rng))
        .collect();
    let mut active: Vec<usize> = (0..count)
        .filter(|&i| !env.is_terminal(&states[i]))
        .collect();
    let mut mask = vec![false; actions_n];
    let mut probs = vec![0f64; actions_n];
    // Stands in for logits that are not finite: uniform over the valid.
    let uniform = vec![0f32; actions_n];
    let mut non_finite_draws = 0;

    while !active.is_empty() {
        if abandon() {
            return None;
        }
        let output = policy.infer_states(env, active.iter().map(|&i| &states[i]));
        let logits = to_host_f32(&output.forward_logits());

        let mut still_active = Vec::with_capacity(active.len());
        for (row, &i) in active.iter().enumerate() {
            env.forward_mask(&states[i], &mut mask);
            let mut row_logits = &logits[row * actions_n..(row + 1) * actions_n];
            if !finite_where_valid(row_logits, &mask) {
                non_finite_draws += 1;
                row_logits = &uniform;
            }
            let Some(action) = draw(row_logits, &mask, behaviour.epsilon, &mut probs, rng) else {
                // A non-terminal state without a valid action is a task bug;
                // end the trajectory rather than loop forever.
                continue;
            };
            let energy = env.transition_energy(&states[i], action);
            env.step(&mut states[i], action)
                .expect("an action drawn from the forward mask is valid");
            let trajectory = &mut trajectories[i];
            trajectory.actions.push(action as u32);
            trajectory.energies.push(energy as f32);
            if !env.is_terminal(&states[i]) && trajectory.len() < cut_at[i] {
                still_active.push(i);
            }
        }
        active = still_active;
    }
    Some(Rollout {
        trajectories,
        final_states: states,
        non_finite_draws,
    })
}

/// Writes the behaviour distribution (1 - epsilon) softmax(logits) +
/// epsilon uniform, both restricted to `mask`, into `probs`. Returns false
/// (and leaves `probs` all zero) when no action is valid.
pub fn behaviour_probabilities(
    logits: &[f32],
    mask: &[bool],
    epsilon: f64,
    probs: &mut [f64],
) -> bool {
    probs.fill(0.0);
    let valid = mask.iter().filter(|&&m| m).count();
    if valid == 0 {
        return false;
    }
    let max = logits
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|(&l, _)| l)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for ((p, &l), &m) in probs.iter_mut().zip(logits).zip(mask) {
        if m {
            *p = f64::from(l - max).exp();
            total += *p;
        }
    }
    let uniform = epsilon / valid as f64;
    for (p, &m) in probs.iter_mut().zip(mask) {
        if m {
            *p = (1.0 - epsilon) * *p / total + uniform;
        }
    }
    true
}

/// Draws one action from the behaviour distribution; None when no action is
/// valid.
fn draw(
    logits: &[f32],
    mask: &[bool],
    epsilon: f64,
    probs: &mut [f64],
    rng: &mut SmallRng,
) -> Option<usize> {
    if !behaviour_probabilities(logits, mask, epsilon, probs) {
        return None;
    }
    let mut u = rng.random::<f64>();
    let mut last_valid = 0;
    for (a, &p) in probs.iter().enumerate() {
        if p <= 0.0 {
            continue;
        }
        last_valid = a;
        if u < p {
            return Some(a);
        }
        u -= p;
    }
    // Rounding left a sliver of mass: it belongs to the last valid action.
    Some(last_valid)
}

/// The policy's forward distribution P_F(.|s) (no exploration) at each of
/// `states`, one row of `forward_actions` probabilities per state; for exact
/// checks of tiny tasks ([`crate::exact::policy_terminal_distribution`]).
/// Where a state's logits are not finite the row is uniform over its valid
/// actions, as [`rollout`] draws there; such states are counted in
/// `non_finite_states`.
pub fn forward_probabilities(
    env: &dyn Environment,
    policy: &Policy,
    states: &[State],
    non_finite_states: &mut usize,
) -> Vec<Vec<f64>> {
    let actions_n = env.forward_actions();
    let logits = to_host_f32(&policy.infer_states(env, states.iter()).forward_logits());
    let uniform = vec![0f32; actions_n];
    let mut mask = vec![false; actions_n];
    states
        .iter()
        .enumerate()
        .map(|(row, state)| {
            env.forward_mask(state, &mut mask);
            let mut row_logits = &logits[row * actions_n..(row + 1) * actions_n];
            if !finite_where_valid(row_logits, &mask) {
                *non_finite_states += 1;
                row_logits = &uniform;
            }
            let mut probs = vec![0f64; actions_n];
            behaviour_probabilities(row_logits, &mask, 0.0, &mut probs);
            probs
        })
        .collect()
}

/// Whether every valid action's logit is finite.
fn finite_where_valid(logits: &[f32], mask: &[bool]) -> bool {
    logits
        .iter()
        .zip(mask)
        .all(|(logit, &valid)| !valid || logit.is_finite())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use tch::Device;

    use super::*;
    use crate::config::ModelConfig;
    use crate::policy::ModelSpec;
    use crate::tasks::set_generation::SetGeneration;
    use crate::trajectory::replay;

    fn setup() -> (SetGeneration, Policy) {
        let env = SetGeneration::from_parts(10, 5, vec![-0.5, 0.5]).unwrap();
        let model = ModelConfig { hidden: vec![16] };
        let policy = Policy::new(&ModelSpec::new(&env, &model), Device::Cpu);
        (env, policy)
    }

    #[test]
    fn an_abandoned_rollout_stops_at_its_next_step() {
        let (env, policy) = setup();
        let mut rng = SmallRng::seed_from_u64(1);
        let behaviour = Behaviour::default();
        assert!(rollout_unless(&env, &policy, 8, behaviour, &mut rng, &|| true).is_none());
        // Set half-way: asked once per lockstep step, it stops there.
        let asked = std::cell::Cell::new(0);
        let half_way = || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        };
        assert!(rollout_unless(&env, &policy, 8, behaviour, &mut rng, &half_way).is_none());
        assert_eq!(asked.get(), 3);
        let out = rollout_unless(&env, &policy, 8, behaviour, &mut rng, &|| false).unwrap();
        assert_eq!(out.trajectories.len(), 8);
    }

    #[test]
    fn samples_are_valid_and_carry_the_local_energies() {
        let (env, policy) = setup();
        let mut rng = SmallRng::seed_from_u64(1);
        let out = rollout(
            &env,
            &policy,
            32,
            Behaviour {
                epsilon: 0.3,
                ..Behaviour::default()
            },
            &mut rng,
        );
        assert_eq!(out.trajectories.len(), 32);
        for (t, last) in out.trajectories.iter().zip(&out.final_states) {
            let replayed = replay(&env, t).unwrap();
            assert!(replayed.complete);
            assert_eq!(&replayed.final_state, last);
            assert!((replayed.energy() - env.energy(last)).abs() < 1e-5);
        }
    }

    /// Finite weights whose output overflows f32 (a diverged model): the
    /// draws at such states are uniform over the valid actions, and
    /// counted, not the last valid action every time.
    #[test]
    fn logits_that_are_not_finite_are_drawn_from_uniformly_and_counted() {
        let (env, mut policy) = setup();
        let mut rng = SmallRng::seed_from_u64(1);
        let fresh = rollout(&env, &policy, 64, Behaviour::default(), &mut rng);
        assert_eq!(fresh.non_finite_draws, 0);
        let mut huge = policy.weights();
        for array in &mut huge {
            for value in &mut array.values {
                *value = if *value >= 0.0 { 1e30 } else { -1e30 };
            }
        }
        policy.load_weights(&huge).unwrap();
        let out = rollout(&env, &policy, 64, Behaviour::default(), &mut rng);
        assert_eq!(out.non_finite_draws, 64 * 5, "every draw of every state");
        let first_actions: std::collections::BTreeSet<u32> =
            out.trajectories.iter().map(|t| t.actions[0]).collect();
        assert!(first_actions.len() >= 5, "{first_actions:?}");
        for (t, last) in out.trajectories.iter().zip(&out.final_states) {
            assert!(replay(&env, t).unwrap().complete);
            assert!(env.is_terminal(last));
        }
    }

    #[test]
    fn truncation_cuts_the_configured_fraction_before_the_end() {
        let (env, policy) = setup();
        let mut rng = SmallRng::seed_from_u64(2);
        let behaviour = Behaviour {
            truncate_fraction: 0.5,
            ..Behaviour::default()
        };
        let out = rollout(&env, &policy, 2000, behaviour, &mut rng);
        let cut: Vec<usize> = out
            .trajectories
            .iter()
            .filter(|t| t.len() < 5)
            .map(|t| t.len())
            .collect();
        assert!(
            (900..1100).contains(&cut.len()),
            "{} of 2000 cut",
            cut.len()
        );
        assert!(cut.iter().all(|&n| (1..5).contains(&n)));
        for (t, last) in out.trajectories.iter().zip(&out.final_states) {
            assert_eq!(env.is_terminal(last), t.len() == 5);
        }
    }

    #[test]
    fn a_cap_cuts_every_truncated_trajectory_at_the_same_length() {
        let (env, policy) = setup();
        let mut rng = SmallRng::seed_from_u64(3);
        let behaviour = Behaviour {
            truncate_fraction: 0.9,
            truncate_at: TruncateAt::Cap,
            truncate_cap: 2,
            ..Behaviour::default()
        };
        let out = rollout(&env, &policy, 1000, behaviour, &mut rng);
        let lengths: Vec<usize> = out.trajectories.iter().map(Trajectory::len).collect();
        assert!(lengths.iter().all(|&n| n == 2 || n == 5), "{lengths:?}");
        let cut = lengths.iter().filter(|&&n| n == 2).count();
        assert!((850..950).contains(&cut), "{cut} of 1000 cut");
        // A cap at or beyond the end still cuts before the terminal state.
        let long_cap = Behaviour {
            truncate_cap: 99,
            ..behaviour
        };
        let out = rollout(&env, &policy, 200, long_cap, &mut rng);
        assert!(
            out.trajectories
                .iter()
                .all(|t| t.len() == 4 || t.len() == 5)
        );
    }

    #[test]
    fn behaviour_probabilities_mix_in_the_uniform_share() {
        let mut probs = [0.0; 4];
        let mask = [true, false, true, true];
        let logits = [0.0f32, 100.0, 0.0, 2f32.ln()];
        assert!(behaviour_probabilities(&logits, &mask, 0.0, &mut probs));
        assert_eq!(probs[1], 0.0);
        assert!((probs[3] - 0.5).abs() < 1e-6 && (probs[0] - 0.25).abs() < 1e-6);
        assert!(behaviour_probabilities(&logits, &mask, 1.0, &mut probs));
        assert!(probs.iter().zip(mask).all(|(&p, m)| if m {
            (p - 1.0 / 3.0).abs() < 1e-12
        } else {
            p == 0.0
        }));
        assert!(!behaviour_probabilities(
            &logits,
            &[false; 4],
            0.1,
            &mut probs
        ));
    }
}
