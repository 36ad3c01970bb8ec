//! Every objective against the exact optimum of a tiny set task (computed
//! by dynamic programming over its whole state DAG): zero there, clearly
//! positive once perturbed, gradients in every head it uses, and the
//! identities that tie the objectives together.

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use super::detailed_balance::DetailedBalance;
use super::sub_trajectory::SubTrajectoryBalance;
use super::trajectory_balance::TrajectoryBalance;
use super::{Flow, Objective, TransitionBatch, build};
use crate::config::{BackwardPolicy, ObjectiveConfig, ObjectiveName};
use crate::env::{Environment, State};
use crate::exact::uniform_backward_log_flows;
use crate::policy::{ModelSpec, Policy, PolicyOutput};
use crate::tasks::set_generation::SetGeneration;
use crate::trajectory::{ReplayedTrajectory, Trajectory, replay};

const ALL: [ObjectiveName; 5] = [
    ObjectiveName::FlDb,
    ObjectiveName::FlSubTb,
    ObjectiveName::Db,
    ObjectiveName::SubTb,
    ObjectiveName::Tb,
];

fn tiny() -> SetGeneration {
    SetGeneration::from_parts(8, 4, vec![-0.8, -0.1, 0.4, 1.2]).unwrap()
}

fn config(name: ObjectiveName, backward: BackwardPolicy) -> ObjectiveConfig {
    ObjectiveConfig {
        name,
        backward_policy: backward,
        ..ObjectiveConfig::default()
    }
}

/// Random trajectories, a quarter of them cut short, with the states each
/// one visits (the batch's rows, in order).
fn sample(
    env: &dyn Environment,
    count: usize,
    rng: &mut SmallRng,
) -> (Vec<ReplayedTrajectory>, Vec<State>) {
    let mut replayed = Vec::new();
    let mut rows = Vec::new();
    let mut mask = vec![false; env.forward_actions()];
    for _ in 0..count {
        let cut = if rng.random::<f64>() < 0.25 {
            rng.random_range(1..env.max_trajectory_len())
        } else {
            usize::MAX
        };
        let mut state = env.initial_state();
        let mut trajectory = Trajectory::default();
        rows.push(state.clone());
        while !env.is_terminal(&state) && trajectory.len() < cut {
            env.forward_mask(&state, &mut mask);
            let valid: Vec<usize> = (0..mask.len()).filter(|&a| mask[a]).collect();
            let action = valid[rng.random_range(0..valid.len())];
            trajectory.actions.push(action as u32);
            trajectory
                .energies
                .push(env.transition_energy(&state, action) as f32);
            env.step(&mut state, action).unwrap();
            rows.push(state.clone());
        }
        replayed.push(replay(env, &trajectory).unwrap());
    }
    (replayed, rows)
}

fn batch(env: &dyn Environment, trajectories: &[ReplayedTrajectory]) -> TransitionBatch {
    let dims = (
        env.state_dim(),
        env.forward_actions(),
        env.backward_actions(),
    );
    TransitionBatch::new(trajectories, dims, Device::Cpu)
}

/// What a perfect network outputs on `rows`: log P_F of the optimal
/// sampler as logits, equal backward logits (uniform P_B), and the exact
/// flow in the parameterisation `flow` asks for. Terminal rows get a
/// nonsense flow, which every objective must ignore.
fn optimal_output(
    env: &dyn Environment,
    flows: &HashMap<State, f64>,
    rows: &[State],
    flow: Flow,
) -> PolicyOutput {
    let (fwd, bwd) = (env.forward_actions(), env.backward_actions());
    let mut forward = vec![0f32; rows.len() * fwd];
    let mut log_flow = vec![0f32; rows.len()];
    let mut mask = vec![false; fwd];
    let mut back = vec![false; bwd];
    for (r, state) in rows.iter().enumerate() {
        if env.is_terminal(state) {
            log_flow[r] = 7.5;
            continue;
        }
        let f = flows[state];
        log_flow[r] = match flow {
            Flow::ForwardLooking => f + env.energy(state),
            Flow::Plain => f,
        } as f32;
        env.forward_mask(state, &mut mask);
        for a in (0..fwd).filter(|&a| mask[a]) {
            let mut child = state.clone();
            env.step(&mut child, a).unwrap();
            env.backward_mask(&child, &mut back);
            let parents = back.iter().filter(|&&m| m).count() as f64;
            forward[r * fwd + a] = (flows[&child] - parents.ln() - f) as f32;
        }
    }
    let n = rows.len() as i64;
    PolicyOutput::from_parts(
        &Tensor::from_slice(&forward).view([n, fwd as i64]),
        &Tensor::zeros([n, bwd as i64], (Kind::Float, Device::Cpu)),
        &Tensor::from_slice(&log_flow),
    )
}

fn flow_of(name: ObjectiveName) -> Flow {
    match name {
        ObjectiveName::FlDb | ObjectiveName::FlSubTb => Flow::ForwardLooking,
        _ => Flow::Plain,
    }
}

fn loss(objective: &dyn Objective, output: &PolicyOutput, batch: &TransitionBatch) -> f64 {
    objective.loss(output, batch).double_value(&[])
}

/// The objective with TB's log Z at its exact value.
fn at_optimum(name: ObjectiveName, backward: BackwardPolicy, log_z: f64) -> Box<dyn Objective> {
    if name == ObjectiveName::Tb {
        let mut tb = TrajectoryBalance::new(backward, 0.1, Device::Cpu);
        tb.set_log_z(log_z);
        return Box::new(tb);
    }
    build(&config(name, backward), Device::Cpu)
}

#[test]
fn every_objective_is_zero_at_the_exact_optimum_and_positive_off_it() {
    let env = tiny();
    let flows = uniform_backward_log_flows(&env, 10_000).unwrap();
    let log_z = flows[&env.initial_state()];
    // The optimum's parent counts come from the same backward masks the
    // objectives use: its log Z checked against the task's reference (a
    // sum over sets, no masks), so that a wrong count cannot agree with
    // itself.
    let reference = env.reference().unwrap().log_z();
    assert!((log_z - reference).abs() < 1e-7, "{log_z} vs {reference}");
    let (trajectories, rows) = sample(&env, 40, &mut SmallRng::seed_from_u64(1));
    assert!(trajectories.iter().any(|t| !t.complete));
    let batch = batch(&env, &trajectories);
    for backward in [BackwardPolicy::Learned, BackwardPolicy::Uniform] {
        for name in ALL {
            let objective = at_optimum(name, backward, log_z);
            let output = optimal_output(&env, &flows, &rows, flow_of(name));
            let at = loss(objective.as_ref(), &output, &batch);
            assert!(at < 1e-9, "{name:?}/{backward:?}: {at} at the optimum");

            // Action 1 made unlikely wherever it is allowed: every
            // objective sees it.
            let logits = output.forward_logits().copy();
            let _ = logits.narrow(1, 1, 1).fill_(-3.0);
            let nudged =
                PolicyOutput::from_parts(&logits, &output.backward_logits(), &output.log_flow());
            let off = loss(objective.as_ref(), &nudged, &batch);
            assert!(off > 1e-3, "{name:?}/{backward:?}: {off} with a wrong P_F");
        }
    }
    // A wrong log Z moves TB; a wrong flow at s0 moves the flow objectives.
    let tb = at_optimum(ObjectiveName::Tb, BackwardPolicy::Uniform, log_z + 0.2);
    let output = optimal_output(&env, &flows, &rows, Flow::Plain);
    assert!(loss(tb.as_ref(), &output, &batch) > 0.03);
    for name in [
        ObjectiveName::FlDb,
        ObjectiveName::FlSubTb,
        ObjectiveName::Db,
        ObjectiveName::SubTb,
    ] {
        let objective = build(&config(name, BackwardPolicy::Uniform), Device::Cpu);
        let output = optimal_output(&env, &flows, &rows, flow_of(name));
        let _ = output.log_flow().get(0).fill_(log_z + 0.2);
        let off = loss(objective.as_ref(), &output, &batch);
        assert!(off > 1e-4, "{name:?}: {off} with a wrong flow at s0");
    }
}

/// Gradient rows of the shared output layer: P_F logits, P_B logits, flow.
fn head_gradients(policy: &Policy, forward: usize, backward: usize) -> [f64; 3] {
    let grad = policy.vars.variables()["heads.weight"].grad();
    let norm = |from: usize, len: usize| {
        grad.narrow(0, from as i64, len as i64)
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
    };
    [
        norm(0, forward),
        norm(forward, backward),
        norm(forward + backward, 1),
    ]
}

#[test]
fn gradients_reach_every_head_the_objective_uses() {
    let env = tiny();
    let (trajectories, _) = sample(&env, 16, &mut SmallRng::seed_from_u64(2));
    let batch = batch(&env, &trajectories);
    let spec = ModelSpec {
        input_dim: env.state_dim(),
        hidden: vec![16],
        forward_actions: env.forward_actions(),
        backward_actions: env.backward_actions(),
    };
    for backward in [BackwardPolicy::Learned, BackwardPolicy::Uniform] {
        for name in ALL {
            tch::manual_seed(3);
            let policy = Policy::new(&spec, Device::Cpu);
            let objective = build(&config(name, backward), Device::Cpu);
            let output = policy.net.forward(&batch.states);
            objective.loss(&output, &batch).backward();
            let [pf, pb, flow] =
                head_gradients(&policy, spec.forward_actions, spec.backward_actions);
            let label = format!("{name:?}/{backward:?}");
            assert!(pf > 0.0, "{label}: no gradient in P_F");
            assert_eq!(
                pb > 0.0,
                backward == BackwardPolicy::Learned,
                "{label}: P_B {pb}"
            );
            assert_eq!(
                flow > 0.0,
                name != ObjectiveName::Tb,
                "{label}: flow {flow}"
            );
            // (TB alone has parameters of its own: the check below is not
            // skipped for it.)
            assert_eq!(
                objective.own_parameters().is_some(),
                name == ObjectiveName::Tb,
                "{label}"
            );
            if let Some((vars, _)) = objective.own_parameters() {
                let log_z = vars.variables()["log_z"].grad().abs().double_value(&[]);
                assert!(log_z > 0.0, "{label}: no gradient in log Z");
            }
        }
    }
}

#[test]
fn forward_looking_and_plain_coincide_when_intermediate_energies_are_zero() {
    // Every element has energy 0: E(s) = 0 everywhere, R(x) = 1.
    let env = SetGeneration::from_parts(8, 4, vec![0.0]).unwrap();
    let (trajectories, _) = sample(&env, 24, &mut SmallRng::seed_from_u64(4));
    let batch = batch(&env, &trajectories);
    tch::manual_seed(5);
    let policy = Policy::new(
        &ModelSpec::new(&env, &crate::config::ModelConfig { hidden: vec![16] }),
        Device::Cpu,
    );
    let output = policy.net.forward(&batch.states);
    for (fl, plain) in [
        (ObjectiveName::FlDb, ObjectiveName::Db),
        (ObjectiveName::FlSubTb, ObjectiveName::SubTb),
    ] {
        let backward = BackwardPolicy::Learned;
        let a = loss(
            build(&config(fl, backward), Device::Cpu).as_ref(),
            &output,
            &batch,
        );
        let b = loss(
            build(&config(plain, backward), Device::Cpu).as_ref(),
            &output,
            &batch,
        );
        assert!(a > 1e-3, "a random network is not at the optimum");
        assert!((a - b).abs() <= 1e-6 * a, "{fl:?} {a} vs {plain:?} {b}");
    }
}

#[test]
fn a_sub_trajectory_residual_is_the_sum_of_its_detailed_balance_residuals() {
    // Telescoping: log F(s_i) - log F(s_j) + sum of terms = sum of the DB
    // residuals from i to j - 1. Checked pair by pair, on trajectories of
    // different lengths, against the grid computation.
    let env = tiny();
    let mut rng = SmallRng::seed_from_u64(6);
    let (mixed, _) = sample(&env, 12, &mut rng);
    // Many one-step prefixes beside complete trajectories: the loss then
    // works length class by length class.
    let mut skewed = sample(&env, 3, &mut rng).0;
    for k in 0..40 {
        let action = k % env.forward_actions();
        let one_step = Trajectory {
            actions: vec![action as u32],
            energies: vec![env.transition_energy(&env.initial_state(), action) as f32],
        };
        skewed.push(replay(&env, &one_step).unwrap());
    }
    tch::manual_seed(7);
    let policy = Policy::new(
        &ModelSpec::new(&env, &crate::config::ModelConfig { hidden: vec![16] }),
        Device::Cpu,
    );
    for trajectories in [mixed, skewed] {
        check_sub_trajectory_pairs(&env, &policy, &trajectories);
    }
}

/// The telescoping identity, each pair's weight and the loss, on
/// `trajectories`.
fn check_sub_trajectory_pairs(
    env: &SetGeneration,
    policy: &Policy,
    trajectories: &[ReplayedTrajectory],
) {
    let batch = batch(env, trajectories);
    let output = policy.net.forward(&batch.states);
    let grid = &batch.padded;
    let split =
        super::sub_trajectory::worth_splitting(&grid.buckets, batch.trajectories, grid.longest);
    let one_steps = trajectories.iter().filter(|t| t.len() == 1).count();
    assert_eq!(
        split,
        one_steps > trajectories.len() / 2,
        "{:?}",
        grid.buckets
    );
    for (flow, lambda) in [
        (Flow::ForwardLooking, 0.7),
        (Flow::Plain, 0.7),
        (Flow::ForwardLooking, 1.5),
    ] {
        let db = DetailedBalance::new(flow, BackwardPolicy::Learned).residuals(&output, &batch);
        let db: Vec<f64> = Vec::try_from(db.to_kind(Kind::Double)).unwrap();
        let sub = SubTrajectoryBalance::new(flow, lambda, BackwardPolicy::Learned);
        let (residuals, weights) = sub.pair_residuals(&output, &batch);
        let mut first = 0;
        let mut expected_loss = 0.0;
        for (b, t) in trajectories.iter().enumerate() {
            let n = t.len();
            let total: f64 = (0..n)
                .flat_map(|i| (i + 1..=n).map(move |j| lambda.powi((j - i) as i32)))
                .sum();
            let mut per_trajectory = 0.0;
            for i in 0..n {
                for j in i + 1..=n {
                    let expected: f64 = db[first + i..first + j].iter().sum();
                    let got = residuals.double_value(&[b as i64, i as i64, j as i64]);
                    assert!((got - expected).abs() < 1e-4, "{flow:?} [{b},{i},{j}]");
                    let w = weights.double_value(&[b as i64, i as i64, j as i64]);
                    let want = lambda.powi((j - i) as i32) / total;
                    assert!(
                        (w - want).abs() < 1e-6,
                        "weight [{b},{i},{j}] {w} vs {want}"
                    );
                    per_trajectory += want * expected * expected;
                }
            }
            expected_loss += per_trajectory;
            first += n;
        }
        expected_loss /= trajectories.len() as f64;
        // Pairs outside a trajectory weigh nothing.
        let weight_total = weights.sum(Kind::Double).double_value(&[]);
        assert!((weight_total - trajectories.len() as f64).abs() < 1e-4);
        let got = sub.loss(&output, &batch).double_value(&[]);
        assert!((got - expected_loss).abs() < 1e-4 * expected_loss.max(1.0));
    }
}

#[test]
fn length_buckets_keep_short_prefixes_beside_a_long_trajectory_cheap() {
    // One trajectory of 256 transitions beside 2,000 one-step prefixes: one
    // grid for all would hold 2,001 x 257 x 257 cells; by length class the
    // prefixes take 2 x 2 each.
    let mut lengths = vec![1i64; 2000];
    lengths.insert(700, 256);
    lengths.extend([3, 4, 5, 2]);
    let (order, buckets) = super::LengthBucket::group(&lengths);
    let mut seen = order.clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..lengths.len() as i64).collect::<Vec<_>>());
    let cells: usize = buckets
        .iter()
        .map(|b| b.count * (b.longest + 1) * (b.longest + 1))
        .sum();
    let transitions: usize = lengths.iter().map(|&n| n as usize).sum();
    assert!(
        cells <= 4 * (transitions + lengths.len()) * 257,
        "{cells} cells for {transitions} transitions"
    );
    assert!(cells < 2001 * 257 * 257 / 100, "{cells}");
    // Every trajectory sits in the bucket that covers it, within a factor
    // of two of its longest.
    for bucket in buckets.iter() {
        for &b in &order[bucket.first..bucket.first + bucket.count] {
            let n = lengths[b as usize] as usize;
            assert!(
                n <= bucket.longest && 2 * n >= bucket.longest,
                "{n} in {bucket:?}"
            );
        }
    }
    assert_eq!(
        buckets.iter().map(|b| b.longest).collect::<Vec<_>>(),
        [1, 2, 4, 5, 256]
    );
}

#[test]
fn lambda_above_one_favours_long_pairs_without_overflow() {
    let env = tiny();
    let (trajectories, _) = sample(&env, 8, &mut SmallRng::seed_from_u64(8));
    let batch = batch(&env, &trajectories);
    let policy = Policy::new(
        &ModelSpec::new(&env, &crate::config::ModelConfig { hidden: vec![8] }),
        Device::Cpu,
    );
    let output = policy.net.forward(&batch.states);
    let sub = SubTrajectoryBalance::new(Flow::Plain, 1e6, BackwardPolicy::Learned);
    let (_, weights) = sub.pair_residuals(&output, &batch);
    assert!(bool::try_from(weights.isfinite().all()).unwrap());
    // Nearly all of a complete trajectory's weight is on the whole of it.
    let (b, t) = trajectories
        .iter()
        .enumerate()
        .find(|(_, t)| t.complete)
        .unwrap();
    let whole = weights.double_value(&[b as i64, 0, t.len() as i64]);
    assert!(whole > 0.99, "{whole}");
}

/// Extreme lambdas on a batch mixing complete trajectories and prefixes cut
/// short: a tiny lambda puts exponents of L |ln lambda| in the cells below
/// the diagonal, a huge one in the cells past a short prefix's end. Both
/// overflow f32 unless those cells are masked before the exponential.
#[test]
fn extreme_lambdas_keep_every_weight_and_the_loss_finite() {
    let env = tiny();
    let (trajectories, _) = sample(&env, 32, &mut SmallRng::seed_from_u64(9));
    let lengths: Vec<usize> = trajectories.iter().map(|t| t.len()).collect();
    assert!(
        lengths.iter().min() < lengths.iter().max(),
        "the batch needs prefixes of different lengths: {lengths:?}"
    );
    let batch = batch(&env, &trajectories);
    let policy = Policy::new(
        &ModelSpec::new(&env, &crate::config::ModelConfig { hidden: vec![8] }),
        Device::Cpu,
    );
    let output = policy.net.forward(&batch.states);
    // 1e-60: below f32's smallest, every weight but the shifted ones
    // would underflow to zero.
    for lambda in [1e-60, 1e-30, 1e30] {
        for flow in [Flow::Plain, Flow::ForwardLooking] {
            let sub = SubTrajectoryBalance::new(flow, lambda, BackwardPolicy::Learned);
            let (_, weights) = sub.pair_residuals(&output, &batch);
            assert!(
                bool::try_from(weights.isfinite().all()).unwrap(),
                "lambda {lambda}"
            );
            let per_trajectory = weights.sum_dim_intlist(&[1i64, 2][..], false, Kind::Double);
            for (b, &length) in lengths.iter().enumerate() {
                let total = per_trajectory.double_value(&[b as i64]);
                assert!((total - 1.0).abs() < 1e-4, "lambda {lambda}: {total}");
                // All the weight on single steps (tiny lambda) or on the
                // whole trajectory (huge lambda).
                let expected_pair = if lambda < 1.0 { (0, 1) } else { (0, length) };
                let share =
                    weights.double_value(&[b as i64, expected_pair.0, expected_pair.1 as i64]);
                let expected_share = if lambda < 1.0 {
                    1.0 / length as f64
                } else {
                    1.0
                };
                assert!(
                    (share - expected_share).abs() < 1e-4,
                    "lambda {lambda}, b {b}: {share}"
                );
            }
            assert!(sub.loss(&output, &batch).double_value(&[]).is_finite());
        }
    }
}

/// log P(action) under `logits` restricted to `mask`, in f64 on the host.
fn masked_log_softmax(logits: &[f32], mask: &[bool], action: usize) -> f64 {
    let valid: Vec<f64> = (0..logits.len())
        .filter(|&a| mask[a])
        .map(|a| f64::from(logits[a]))
        .collect();
    let top = valid.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = top + valid.iter().map(|l| (l - top).exp()).sum::<f64>().ln();
    f64::from(logits[action]) - log_sum
}

/// A 3 x 3 lattice: twice as many forward actions as backward ones, so
/// the scored rows of P_B are padded.
fn small_lattice() -> crate::tasks::lattice::Lattice {
    crate::tasks::lattice::Lattice::new(&crate::tasks::lattice::LatticeConfig {
        side: 3,
        order: crate::tasks::lattice::SiteOrder::Any,
        coupling: 0.3,
        disorder: 0.8,
        couplings_seed: 11,
        field: 0.2,
    })
    .unwrap()
}

#[test]
fn scored_log_probs_are_each_policys_masked_softmax_state_by_state() {
    let lattice = small_lattice();
    assert_ne!(lattice.forward_actions(), lattice.backward_actions());
    let set = tiny();
    for env in [&set as &dyn Environment, &lattice] {
        check_scored_log_probs(env);
    }
}

fn check_scored_log_probs(env: &dyn Environment) {
    let (fwd, bwd) = (env.forward_actions(), env.backward_actions());
    let (trajectories, _) = sample(env, 12, &mut SmallRng::seed_from_u64(6));
    let batch = batch(env, &trajectories);
    tch::manual_seed(7);
    let policy = Policy::new(
        &ModelSpec::new(env, &crate::config::ModelConfig { hidden: vec![16] }),
        Device::Cpu,
    );
    let output = policy.net.forward(&batch.states);
    let forward_logits = crate::policy::to_host_f32(&output.forward_logits());
    let backward_logits = crate::policy::to_host_f32(&output.backward_logits());
    let log_flow = crate::policy::to_host_f32(&output.log_flow());
    for backward in [BackwardPolicy::Learned, BackwardPolicy::Uniform] {
        let (rows, scored) = super::scored_log_probs(&output, &batch, backward);
        let scored = crate::policy::to_host_f32(&scored);
        let flows = crate::policy::to_host_f32(&rows.select(1, batch.scored_window as i64));
        let transitions = batch.transitions;
        assert_eq!(scored.len(), 2 * transitions);
        let (mut row, mut t) = (0usize, 0usize);
        for trajectory in &trajectories {
            for i in 0..trajectory.len() {
                let forward_mask = &trajectory.forward_masks[i * fwd..(i + 1) * fwd];
                let backward_mask = &trajectory.backward_masks[i * bwd..(i + 1) * bwd];
                let (source, target) = (row + i, row + i + 1);
                let log_pf = masked_log_softmax(
                    &forward_logits[source * fwd..(source + 1) * fwd],
                    forward_mask,
                    trajectory.actions[i] as usize,
                );
                let log_pb = match backward {
                    BackwardPolicy::Learned => masked_log_softmax(
                        &backward_logits[target * bwd..(target + 1) * bwd],
                        backward_mask,
                        trajectory.backward_actions[i] as usize,
                    ),
                    BackwardPolicy::Uniform => {
                        -(backward_mask.iter().filter(|&&m| m).count() as f64).ln()
                    }
                };
                let label = format!("{backward:?}, transition {t}");
                assert!((f64::from(scored[t]) - log_pf).abs() < 1e-5, "{label}: P_F");
                let got = f64::from(scored[transitions + t]);
                assert!(
                    (got - log_pb).abs() < 1e-5,
                    "{label}: P_B {got} vs {log_pb}"
                );
                assert_eq!(flows[t], log_flow[source], "{label}: flow at s_t");
                assert_eq!(
                    flows[transitions + t],
                    log_flow[target],
                    "{label}: flow at s_t+1"
                );
                t += 1;
            }
            row += trajectory.len() + 1;
        }
        assert_eq!(t, transitions);
    }
}

/// Each trajectory's log ratio sums its own transitions and no more: the
/// grid pads a short trajectory with its last transition, which must not
/// count (for a task whose complete trajectories differ in length, TB and
/// the importance-sampled log Z would be wrong). Prefixes of several
/// lengths stand in for such trajectories.
#[test]
fn a_trajectory_log_ratio_sums_its_own_transitions_only() {
    let env = tiny();
    let mut rng = SmallRng::seed_from_u64(8);
    let (trajectories, _) = sample(&env, 16, &mut rng);
    let lengths: std::collections::BTreeSet<usize> =
        trajectories.iter().map(ReplayedTrajectory::len).collect();
    assert!(lengths.len() > 1, "{lengths:?}");
    tch::manual_seed(9);
    let policy = Policy::new(
        &ModelSpec::new(&env, &crate::config::ModelConfig { hidden: vec![16] }),
        Device::Cpu,
    );
    let batch = batch(&env, &trajectories);
    let output = policy.net.forward(&batch.states);
    for backward in [BackwardPolicy::Learned, BackwardPolicy::Uniform] {
        let to_vec = |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap();
        let terms = to_vec(super::transition_terms(
            &output,
            &batch,
            Flow::Plain,
            backward,
        ));
        let ratios = to_vec(super::trajectory_log_ratios(&output, &batch, backward));
        let mut first = 0;
        for (b, t) in trajectories.iter().enumerate() {
            let own: f64 = terms[first..first + t.len()].iter().sum();
            assert!(
                (ratios[b] - own).abs() < 1e-4,
                "{backward:?}, trajectory {b} of length {}: {} against {own}",
                t.len(),
                ratios[b]
            );
            first += t.len();
        }
    }
}

/// Set in the child process of [`pinning_prints_no_libtorch_warning`].
const PINNING_CHILD: &str = "FLGFN_TEST_PINNING_CHILD";

/// Pinning a batch for CUDA prints nothing: libtorch's warnings go
/// straight to the process's stderr, so the test reads a child's. Without
/// a GPU the pinning itself fails, after the point where `pin_memory`
/// warned.
#[test]
fn pinning_prints_no_libtorch_warning() {
    if std::env::var_os(PINNING_CHILD).is_some() {
        // Without a GPU the pinning panics; its message is not the point.
        std::panic::set_hook(Box::new(|_| {}));
        let pinned = std::panic::catch_unwind(|| {
            let _ = super::pinned_for_cuda(Tensor::from_slice(&[1f32, 2.0]));
        });
        println!(
            "pinning done: {}",
            if pinned.is_ok() { "pinned" } else { "failed" }
        );
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "objectives::tests::pinning_prints_no_libtorch_warning",
            "--nocapture",
        ])
        .env(PINNING_CHILD, "1")
        .output()
        .expect("the test binary runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr),
    );
    assert!(child.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("pinning done"),
        "the child did not pin: {stdout}\n{stderr}"
    );
    assert!(!stderr.contains("deprecated"), "libtorch warned: {stderr}");
}
