//! Exact distributions for tiny environments, by enumerating every state
//! reachable from s0.
//!
//! Used by the learner's evaluation (on tasks small enough to enumerate)
//! and by tests to compare a learned sampler with its target without
//! sampling noise: [`target_distribution`] gives R(x)/Z,
//! [`policy_terminal_distribution`] the terminal distribution P_T that a
//! forward policy induces, and [`total_variation`] compares the two. Every
//! function enumerates the whole state DAG, so `limit` keeps an accidental
//! call on a large task from exhausting memory.

use std::collections::{HashMap, VecDeque};

use crate::env::{Environment, State};

/// More states are reachable than the caller allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "more than {limit} states are reachable from the initial state; too many to enumerate exactly"
)]
pub struct TooManyStates {
    /// The limit that was exceeded.
    pub limit: usize,
}

/// The reachable part of an environment's state DAG ([`enumerate`]):
/// kept by a caller that scores many policies on one task
/// ([`terminal_distribution`]), which would otherwise enumerate it again
/// each time.
#[derive(Debug)]
pub struct Dag {
    states: Vec<State>,
    terminal: Vec<bool>,
    /// Per state, its forward edges `(action, child index)`.
    children: Vec<Vec<(usize, usize)>>,
}

/// Breadth-first enumeration over forward masks. Index 0 is s0.
///
/// # Panics
/// If the environment refuses an action its own forward mask allowed.
pub fn enumerate(env: &dyn Environment, limit: usize) -> Result<Dag, TooManyStates> {
    let s0 = env.initial_state();
    let mut index: HashMap<State, usize> = HashMap::new();
    let mut dag = Dag {
        states: Vec::new(),
        terminal: Vec::new(),
        children: Vec::new(),
    };
    if limit == 0 {
        return Err(TooManyStates { limit });
    }
    index.insert(s0.clone(), 0);
    dag.states.push(s0);
    let mut queue = VecDeque::from([0usize]);
    let mut mask = vec![false; env.forward_actions()];
    while let Some(i) = queue.pop_front() {
        let terminal = env.is_terminal(&dag.states[i]);
        dag.terminal.push(terminal);
        let mut edges = Vec::new();
        if !terminal {
            env.forward_mask(&dag.states[i], &mut mask);
            for action in (0..mask.len()).filter(|&a| mask[a]) {
                let mut child = dag.states[i].clone();
                if let Err(e) = env.step(&mut child, action) {
                    panic!(
                        "environment {} refused an action its forward mask allowed: {e}",
                        env.spec()
                    );
                }
                let j = match index.get(&child) {
                    Some(&j) => j,
                    None => {
                        let j = dag.states.len();
                        if j >= limit {
                            return Err(TooManyStates { limit });
                        }
                        index.insert(child.clone(), j);
                        dag.states.push(child);
                        queue.push_back(j);
                        j
                    }
                };
                edges.push((action, j));
            }
        }
        dag.children.push(edges);
    }
    Ok(dag)
}

/// Probability of each terminal state under the target R(x)/Z =
/// exp(-E(x))/Z, by enumerating every state reachable from s0 (breadth
/// first over forward masks). Errors if more than `limit` states are
/// reachable.
///
/// # Panics
/// If the environment refuses an action its own forward mask allowed.
pub fn target_distribution(
    env: &dyn Environment,
    limit: usize,
) -> Result<HashMap<State, f64>, TooManyStates> {
    let dag = enumerate(env, limit)?;
    let log_rewards: Vec<(usize, f64)> = (0..dag.states.len())
        .filter(|&i| dag.terminal[i])
        .map(|i| (i, -env.energy(&dag.states[i])))
        .collect();
    // Shift by the largest log reward so exp neither overflows nor underflows everything.
    let max = log_rewards
        .iter()
        .map(|&(_, r)| r)
        .fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = log_rewards.iter().map(|&(_, r)| (r - max).exp()).sum();
    Ok(log_rewards
        .into_iter()
        .map(|(i, r)| (dag.states[i].clone(), (r - max).exp() / z))
        .collect())
}

/// log(sum of exp(`values`)), with the largest factored out so that
/// neither overflows; -inf for none (or all -inf).
pub fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Exact terminal distribution of a forward policy: P_T(x) = sum over
/// trajectories s0 -> ... -> x of prod P_F. Errors if more than `limit`
/// states are reachable.
///
/// `forward_probs` gets a batch of non-terminal states and returns, for
/// each, a Vec of `forward_actions()` probabilities. Mass on actions the
/// mask forbids is dropped, so a policy that puts mass there yields a
/// distribution summing to less than one. States are processed in a
/// topological order of the DAG (Kahn's algorithm), a state only once all
/// its parents are done, which holds even when trajectories of different
/// lengths reach the same state; each layer of that order is one call, so
/// the number of calls is about the longest trajectory.
///
/// Every reachable terminal state is a key, with probability 0 if the policy
/// never reaches it.
///
/// # Panics
/// If `forward_probs` returns the wrong number of rows or a row of the
/// wrong length, or the environment refuses an action its own forward
/// mask allowed.
pub fn policy_terminal_distribution(
    env: &dyn Environment,
    limit: usize,
    forward_probs: &mut dyn FnMut(&[State]) -> Vec<Vec<f64>>,
) -> Result<HashMap<State, f64>, TooManyStates> {
    Ok(terminal_distribution(
        &enumerate(env, limit)?,
        env,
        forward_probs,
    ))
}

/// [`policy_terminal_distribution`] over `dag`, which [`enumerate`] made
/// of `env`.
///
/// # Panics
/// As [`policy_terminal_distribution`].
pub fn terminal_distribution(
    dag: &Dag,
    env: &dyn Environment,
    forward_probs: &mut dyn FnMut(&[State]) -> Vec<Vec<f64>>,
) -> HashMap<State, f64> {
    let n = dag.states.len();
    let mut in_degree = vec![0usize; n];
    for edges in &dag.children {
        for &(_, j) in edges {
            in_degree[j] += 1;
        }
    }
    let mut mass = vec![0.0f64; n];
    mass[0] = 1.0;
    // Only s0 has no parents among reachable states.
    let mut layer = vec![0usize];
    let mut result = HashMap::new();
    while !layer.is_empty() {
        let batch: Vec<usize> = layer
            .iter()
            .copied()
            .filter(|&i| !dag.terminal[i])
            .collect();
        if !batch.is_empty() {
            let states: Vec<State> = batch.iter().map(|&i| dag.states[i].clone()).collect();
            let probs = forward_probs(&states);
            assert_eq!(
                probs.len(),
                batch.len(),
                "forward_probs must return one row per state"
            );
            for (&i, row) in batch.iter().zip(&probs) {
                assert_eq!(
                    row.len(),
                    env.forward_actions(),
                    "forward_probs must return forward_actions() probabilities per state"
                );
                for &(action, j) in &dag.children[i] {
                    mass[j] += mass[i] * row[action];
                }
            }
        }
        let mut next = Vec::new();
        for &i in &layer {
            if dag.terminal[i] {
                result.insert(dag.states[i].clone(), mass[i]);
            }
            for &(_, j) in &dag.children[i] {
                in_degree[j] -= 1;
                if in_degree[j] == 0 {
                    next.push(j);
                }
            }
        }
        layer = next;
    }
    result
}

/// The exact flows of a perfect sampler whose P_B is uniform over each
/// state's valid backward actions: log F(s) for every reachable state, with
/// F(x) = R(x) at terminal states and F(s) = sum over children s' of
/// F(s') P_B(s|s'). Then P_F(s'|s) = F(s') P_B(s|s') / F(s) samples
/// exactly R(x)/Z, and log F(s0) = log Z. Tests use these as the zero of
/// every objective. Errors if more than `limit` states are reachable.
///
/// # Panics
/// If the environment refuses an action its own forward mask allowed.
pub fn uniform_backward_log_flows(
    env: &dyn Environment,
    limit: usize,
) -> Result<HashMap<State, f64>, TooManyStates> {
    let dag = enumerate(env, limit)?;
    let n = dag.states.len();
    let mut mask = vec![false; env.backward_actions()];
    let parents: Vec<f64> = dag
        .states
        .iter()
        .map(|s| {
            env.backward_mask(s, &mut mask);
            mask.iter().filter(|&&m| m).count() as f64
        })
        .collect();
    // Children before parents: repeat until every state is done (the DAG
    // is shallow, so a few passes over the states suffice).
    let mut log_flow: Vec<Option<f64>> = vec![None; n];
    while log_flow.iter().any(Option::is_none) {
        for i in (0..n).rev() {
            if log_flow[i].is_some() {
                continue;
            }
            if dag.terminal[i] {
                log_flow[i] = Some(-env.energy(&dag.states[i]));
                continue;
            }
            let children: Option<Vec<f64>> = dag.children[i]
                .iter()
                .map(|&(_, j)| log_flow[j].map(|f| f - parents[j].ln()))
                .collect();
            if let Some(terms) = children {
                log_flow[i] = Some(log_sum_exp(terms.iter().copied()));
            }
        }
    }
    Ok(dag
        .states
        .into_iter()
        .zip(log_flow.into_iter().map(|f| f.unwrap_or(f64::NAN)))
        .collect())
}

/// Total variation 0.5 * sum |p - q| over the union of keys (a missing key
/// counts as probability 0).
pub fn total_variation(p: &HashMap<State, f64>, q: &HashMap<State, f64>) -> f64 {
    let from_p: f64 = p
        .iter()
        .map(|(s, &pv)| (pv - q.get(s).copied().unwrap_or(0.0)).abs())
        .sum();
    let only_q: f64 = q
        .iter()
        .filter(|(s, _)| !p.contains_key(*s))
        .map(|(_, &qv)| qv.abs())
        .sum();
    0.5 * (from_p + only_q)
}

/// The energy W1 a report gives: [`wasserstein1`] of the sampled
/// `energies` (in any order) against `target`'s sorted points; None for an
/// empty sample; `f64::MAX` where an energy is not finite (as far as can
/// be: JSON has no infinity, and would write null, which reads as a task
/// without an energy distribution).
pub fn energy_w1(energies: &[f64], target: &[(f64, f64)]) -> Option<f64> {
    if energies.is_empty() {
        return None;
    }
    if energies.iter().any(|e| !e.is_finite()) {
        return Some(f64::MAX);
    }
    let mut sorted = energies.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(wasserstein1(&sorted, target))
}

/// Integral of |F_sample - F_target| over the line, for a sorted sample and
/// sorted target points `(value, probability)`, by one merge over both sets of breakpoints.
/// NaN for an empty sample, whose distance is undefined (callers report
/// none), and for a NaN anywhere (which no order places).
pub fn wasserstein1(sample: &[f64], target: &[(f64, f64)]) -> f64 {
    // A NaN never equals itself: the merge below would never move past it.
    if sample.is_empty()
        || sample
            .iter()
            .chain(target.iter().map(|(t, _)| t))
            .any(|v| v.is_nan())
    {
        return f64::NAN;
    }
    let n = sample.len() as f64;
    let (mut i, mut j) = (0usize, 0usize);
    let mut f_target = 0.0;
    let mut previous: Option<f64> = None;
    let mut distance = 0.0;
    while i < sample.len() || j < target.len() {
        let x = match (sample.get(i), target.get(j)) {
            (Some(&s), Some(&(t, _))) => s.min(t),
            (Some(&s), None) => s,
            (None, Some(&(t, _))) => t,
            (None, None) => break,
        };
        if let Some(p) = previous {
            distance += (i as f64 / n - f_target).abs() * (x - p);
        }
        while i < sample.len() && sample[i] == x {
            i += 1;
        }
        while j < target.len() && target[j].0 == x {
            f_target += target[j].1;
            j += 1;
        }
        previous = Some(x);
    }
    distance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{InvalidAction, TaskSpec};
    use crate::tasks::set_generation::SetGeneration;

    fn tiny() -> SetGeneration {
        SetGeneration::from_parts(4, 2, vec![0.0, 1.0]).unwrap()
    }

    fn set(members: &[usize]) -> State {
        let mut s = vec![0i8; 4];
        for &u in members {
            s[u] = 1;
        }
        s
    }

    fn uniform_policy(env: &dyn Environment) -> impl FnMut(&[State]) -> Vec<Vec<f64>> + '_ {
        move |states: &[State]| {
            states
                .iter()
                .map(|s| {
                    let mut mask = vec![false; env.forward_actions()];
                    env.forward_mask(s, &mut mask);
                    let valid = mask.iter().filter(|&&m| m).count() as f64;
                    mask.iter()
                        .map(|&m| if m { 1.0 / valid } else { 0.0 })
                        .collect()
                })
                .collect()
        }
    }

    #[test]
    fn target_matches_hand_computation() {
        let env = tiny();
        let target = target_distribution(&env, 100).unwrap();
        // Elements 0 and 2 have energy 0, elements 1 and 3 energy 1.
        let z = 1.0 + 4.0 * (-1.0f64).exp() + (-2.0f64).exp();
        assert_eq!(target.len(), 6);
        let expect = |members: &[usize], e: f64| {
            let p = target[&set(members)];
            assert!((p - (-e).exp() / z).abs() < 1e-15, "{members:?}: {p}");
        };
        expect(&[0, 2], 0.0);
        expect(&[1, 3], 2.0);
        for m in [[0, 1], [0, 3], [1, 2], [2, 3]] {
            expect(&m, 1.0);
        }
        // Agrees with the task's own exact log Z.
        let reference = env.reference().unwrap();
        assert!((reference.log_z() - z.ln()).abs() < 1e-12);
    }

    #[test]
    fn uniform_policy_gives_uniform_subsets() {
        let env = tiny();
        let mut calls = 0;
        let mut policy = uniform_policy(&env);
        let mut counted = |states: &[State]| {
            calls += 1;
            policy(states)
        };
        let p = policy_terminal_distribution(&env, 100, &mut counted).unwrap();
        // One call per non-terminal layer: s0, then the four singletons.
        assert_eq!(calls, 2);
        assert_eq!(p.len(), 6);
        for (s, &v) in &p {
            assert_eq!(s.iter().filter(|&&b| b == 1).count(), 2);
            assert!((v - 1.0 / 6.0).abs() < 1e-15, "{s:?}: {v}");
        }
    }

    #[test]
    fn deterministic_policy_reaches_one_set() {
        let env = tiny();
        // Always the lowest valid index: 0 then 1.
        let mut first = |states: &[State]| -> Vec<Vec<f64>> {
            states
                .iter()
                .map(|s| {
                    let a = s.iter().position(|&b| b == 0).unwrap();
                    (0..4).map(|i| if i == a { 1.0 } else { 0.0 }).collect()
                })
                .collect()
        };
        let p = policy_terminal_distribution(&env, 100, &mut first).unwrap();
        assert_eq!(p[&set(&[0, 1])], 1.0);
        assert_eq!(p.values().sum::<f64>(), 1.0);
        let target = target_distribution(&env, 100).unwrap();
        let expected = 1.0 - target[&set(&[0, 1])];
        assert!((total_variation(&p, &target) - expected).abs() < 1e-15);
    }

    #[test]
    fn total_variation_extremes() {
        let target = target_distribution(&tiny(), 100).unwrap();
        assert_eq!(total_variation(&target, &target), 0.0);
        let a = HashMap::from([(set(&[0, 1]), 0.5), (set(&[0, 2]), 0.5)]);
        let b = HashMap::from([(set(&[1, 2]), 1.0)]);
        assert!((total_variation(&a, &b) - 1.0).abs() < 1e-15);
        assert!((total_variation(&b, &a) - 1.0).abs() < 1e-15);
        let c = HashMap::from([(set(&[0, 1]), 0.25), (set(&[0, 2]), 0.75)]);
        assert!((total_variation(&a, &c) - 0.25).abs() < 1e-15);
    }

    #[test]
    fn limit_exceeded_errors() {
        let env = tiny();
        // 1 + 4 + 6 = 11 reachable states.
        assert_eq!(
            target_distribution(&env, 10).unwrap_err(),
            TooManyStates { limit: 10 }
        );
        assert!(target_distribution(&env, 11).is_ok());
        let mut policy = uniform_policy(&env);
        assert_eq!(
            policy_terminal_distribution(&env, 5, &mut policy).unwrap_err(),
            TooManyStates { limit: 5 }
        );
        assert!(target_distribution(&env, 0).is_err());
        let msg = TooManyStates { limit: 10 }.to_string();
        assert!(msg.contains("more than 10 states"), "{msg}");
    }

    /// A walk on 0..=4 by steps of +1 or +2, finished at 3 or 4: state 2 is
    /// reached after one or two steps and state 3 after two or three, so a
    /// layer-by-depth order would process 2 before all its mass arrived.
    #[derive(Debug)]
    struct Skips;

    impl Environment for Skips {
        fn spec(&self) -> TaskSpec {
            TaskSpec {
                name: "skips".into(),
                params: vec![],
            }
        }
        fn state_dim(&self) -> usize {
            1
        }
        fn forward_actions(&self) -> usize {
            2
        }
        fn backward_actions(&self) -> usize {
            2
        }
        fn max_trajectory_len(&self) -> usize {
            3
        }
        fn initial_state(&self) -> State {
            vec![0]
        }
        fn encode(&self, state: &State, out: &mut [f32]) {
            out[0] = f32::from(state[0]);
        }
        fn forward_mask(&self, state: &State, out: &mut [bool]) {
            let open = state[0] < 3;
            out[0] = open;
            out[1] = open;
        }
        fn backward_mask(&self, state: &State, out: &mut [bool]) {
            out[0] = state[0] >= 1;
            out[1] = state[0] >= 2;
        }
        fn is_terminal(&self, state: &State) -> bool {
            state[0] >= 3
        }
        fn step(&self, state: &mut State, action: usize) -> Result<usize, InvalidAction> {
            if action > 1 {
                return Err(InvalidAction {
                    action,
                    reason: "out of range",
                });
            }
            if state[0] >= 3 {
                return Err(InvalidAction {
                    action,
                    reason: "terminal state",
                });
            }
            state[0] += action as i8 + 1;
            Ok(action)
        }
        // A step of k costs k, so the local terms add up to E(s) = s.
        fn transition_energy(&self, _state: &State, action: usize) -> f64 {
            action as f64 + 1.0
        }
        fn energy(&self, state: &State) -> f64 {
            f64::from(state[0])
        }
    }

    #[test]
    fn topological_order_handles_unequal_path_lengths() {
        let env = Skips;
        let mut calls = 0;
        let mut uniform = uniform_policy(&env);
        let mut counted = |states: &[State]| {
            calls += 1;
            uniform(states)
        };
        let p = policy_terminal_distribution(&env, 10, &mut counted).unwrap();
        assert_eq!(calls, 3);
        // P(reach 2) = 1/2 + 1/4; P(3) = 1/4 (from 1) + 3/8 (from 2); P(4) = 3/8.
        assert_eq!(p.len(), 2);
        assert!((p[&vec![3]] - 0.625).abs() < 1e-15);
        assert!((p[&vec![4]] - 0.375).abs() < 1e-15);

        let target = target_distribution(&env, 10).unwrap();
        let z = 1.0 + (-1.0f64).exp();
        assert!((target[&vec![3]] - 1.0 / z).abs() < 1e-15);
        assert!((target[&vec![4]] - (-1.0f64).exp() / z).abs() < 1e-15);
    }
}
