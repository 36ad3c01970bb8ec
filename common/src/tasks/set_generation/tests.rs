//! Tests of the set-generation task and its exact reference.

use super::reference::{level_log_weights, suffix_log_partition};
use super::*;
use crate::env::DistributionScores;
use crate::exact::wasserstein1;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn small() -> SetGeneration {
    SetGeneration::new(&SetGenerationConfig::default()).unwrap()
}

fn preset(size: SetSize) -> SetGeneration {
    SetGeneration::new(&SetGenerationConfig {
        size,
        ..SetGenerationConfig::default()
    })
    .unwrap()
}

fn masks(env: &SetGeneration, state: &State) -> (Vec<bool>, Vec<bool>) {
    let mut f = vec![false; env.forward_actions()];
    let mut b = vec![false; env.backward_actions()];
    env.forward_mask(state, &mut f);
    env.backward_mask(state, &mut b);
    (f, b)
}

fn state_of(env: &SetGeneration, members: &[usize]) -> State {
    let mut s = env.initial_state();
    for &u in members {
        s[u] = 1;
    }
    s
}

#[test]
fn presets_and_dimensions() {
    for (size, u, k) in [
        (SetSize::Small, 30, 20),
        (SetSize::Medium, 80, 60),
        (SetSize::Large, 100, 80),
    ] {
        let env = preset(size);
        assert_eq!((env.universe(), env.set_size()), (u, k));
        assert_eq!(env.levels().len(), 10);
        assert_eq!(env.state_dim(), u);
        assert_eq!(env.forward_actions(), u);
        assert_eq!(env.backward_actions(), u);
        assert_eq!(env.max_trajectory_len(), k);
    }
    let env = small();
    assert_eq!(env.levels()[0], -0.4381397850674522);
    assert_eq!(env.element_energy(0), env.levels()[0]);
    assert_eq!(env.element_energy(13), env.levels()[3]);
    assert_eq!(env.element_energy(29), env.levels()[9]);
}

#[test]
fn masks_at_start_middle_and_end() {
    let env = small();
    let s0 = env.initial_state();
    assert_eq!(s0, vec![0i8; 30]);
    let (f, b) = masks(&env, &s0);
    assert!(f.iter().all(|&x| x));
    assert!(b.iter().all(|&x| !x));
    assert!(!env.is_terminal(&s0));

    let mid = state_of(&env, &[0, 5, 17]);
    let (f, b) = masks(&env, &mid);
    for u in 0..30 {
        let member = [0, 5, 17].contains(&u);
        assert_eq!(f[u], !member, "forward {u}");
        assert_eq!(b[u], member, "backward {u}");
    }
    assert!(!env.is_terminal(&mid));

    let end = state_of(&env, &(0..20).collect::<Vec<_>>());
    let (f, b) = masks(&env, &end);
    assert!(env.is_terminal(&end));
    assert!(f.iter().all(|&x| !x));
    assert_eq!(b.iter().filter(|&&x| x).count(), 20);
    assert!(b[..20].iter().all(|&x| x));
}

#[test]
fn encode_writes_membership() {
    let env = small();
    let s = state_of(&env, &[2, 29]);
    let mut out = vec![7.0f32; 30];
    env.encode(&s, &mut out);
    for (u, &x) in out.iter().enumerate() {
        assert_eq!(x, if u == 2 || u == 29 { 1.0 } else { 0.0 });
    }
}

#[test]
fn step_adds_and_rejects() {
    let env = small();
    let mut s = env.initial_state();
    assert_eq!(env.step(&mut s, 4).unwrap(), 4);
    assert_eq!(s[4], 1);

    let before = s.clone();
    let e = env.step(&mut s, 4).unwrap_err();
    assert_eq!((e.action, e.reason), (4, "already a member"));
    assert_eq!(s, before);

    let e = env.step(&mut s, 30).unwrap_err();
    assert_eq!((e.action, e.reason), (30, "out of range"));
    assert_eq!(s, before);

    let mut t = state_of(&env, &(0..20).collect::<Vec<_>>());
    let before = t.clone();
    let e = env.step(&mut t, 25).unwrap_err();
    assert_eq!((e.action, e.reason), (25, "terminal state"));
    assert_eq!(t, before);
}

#[test]
fn energy_is_additive_along_random_trajectories() {
    let mut rng = SmallRng::seed_from_u64(7);
    for env in [small(), preset(SetSize::Large)] {
        for _ in 0..20 {
            let mut s = env.initial_state();
            let mut total = 0.0;
            let mut mask = vec![false; env.forward_actions()];
            let mut steps = 0;
            while !env.is_terminal(&s) {
                env.forward_mask(&s, &mut mask);
                let valid: Vec<usize> = (0..mask.len()).filter(|&a| mask[a]).collect();
                let a = valid[rng.random_range(0..valid.len())];
                total += env.transition_energy(&s, a);
                assert_eq!(env.step(&mut s, a).unwrap(), a);
                steps += 1;
                assert!((env.energy(&s) - total).abs() < 1e-12);
            }
            assert_eq!(steps, env.max_trajectory_len());
            assert!((env.energy(&s) - total).abs() < 1e-12);
        }
        assert_eq!(env.energy(&env.initial_state()), 0.0);
    }
}

#[test]
fn spec_params() {
    let env = SetGeneration::from_parts(6, 3, vec![-0.5, 0.2, 1.0]).unwrap();
    let spec = env.spec();
    assert_eq!(spec.name, "set_generation");
    assert_eq!(
        spec.params,
        vec!["universe=6", "set_size=3", "levels=-0.5,0.2,1.0"]
    );
    let spec = small().spec();
    assert_eq!(spec.params[0], "universe=30");
    assert_eq!(spec.params[1], "set_size=20");
    assert!(spec.params[2].starts_with("levels=-0.4381397850674522,-0.40046449111789073,"));
    assert!(spec.params[2].ends_with(",0.883494921538938"));
    let parsed: Vec<f64> = spec.params[2]["levels=".len()..]
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(parsed, SMALL_LEVELS.to_vec());
    assert_ne!(spec, preset(SetSize::Medium).spec());
}

#[test]
fn config_overrides_and_validation() {
    let cfg = SetGenerationConfig {
        size: SetSize::Medium,
        universe: Some(40),
        set_size: Some(5),
        levels: None,
    };
    let env = SetGeneration::new(&cfg).unwrap();
    assert_eq!((env.universe(), env.set_size()), (40, 5));
    assert_eq!(env.levels(), &MEDIUM_LEVELS);

    let field_of = |r: Result<SetGeneration, ConfigError>| {
        #[allow(irrefutable_let_patterns)]
        let ConfigError::Invalid { field, .. } = r.unwrap_err() else {
            panic!("expected ConfigError::Invalid");
        };
        field
    };
    assert_eq!(
        field_of(SetGeneration::from_parts(6, 3, vec![])),
        "task.levels"
    );
    assert_eq!(
        field_of(SetGeneration::from_parts(6, 3, vec![0.0, f64::NAN])),
        "task.levels"
    );
    assert_eq!(
        field_of(SetGeneration::from_parts(6, 3, vec![f64::INFINITY])),
        "task.levels"
    );
    // Beyond the energy terms the learner accepts: no trajectory adding
    // such an element would ever train.
    assert_eq!(
        field_of(SetGeneration::from_parts(6, 3, vec![0.0, -2e6])),
        "task.levels"
    );
    assert!(SetGeneration::from_parts(6, 3, vec![0.0, -1e6]).is_ok());
    assert_eq!(
        field_of(SetGeneration::from_parts(0, 0, vec![1.0])),
        "task.universe"
    );
    assert_eq!(
        field_of(SetGeneration::from_parts(7, 3, vec![1.0, 2.0])),
        "task.universe"
    );
    assert_eq!(
        field_of(SetGeneration::from_parts(4100, 3, vec![1.0])),
        "task.universe"
    );
    assert_eq!(
        field_of(SetGeneration::from_parts(6, 0, vec![1.0])),
        "task.set_size"
    );
    assert_eq!(
        field_of(SetGeneration::from_parts(6, 7, vec![1.0])),
        "task.set_size"
    );
    assert!(SetGeneration::from_parts(4096, 4096, vec![1.0]).is_ok());
    assert!(SetGeneration::from_parts(6, 6, vec![1.0, 2.0]).is_ok());
    let cfg = SetGenerationConfig {
        universe: Some(25),
        ..SetGenerationConfig::default()
    };
    assert_eq!(field_of(SetGeneration::new(&cfg)), "task.universe");
    let msg = SetGeneration::from_parts(6, 9, vec![1.0])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("task.set_size"), "{msg}");
}

#[test]
fn exact_log_z_of_presets() {
    for (size, expected) in [
        (SetSize::Small, 11.892),
        (SetSize::Medium, 45.379),
        (SetSize::Large, 48.392),
    ] {
        let env = preset(size);
        let start = Instant::now();
        let reference = SetReference::new(&env);
        let elapsed = start.elapsed();
        println!(
            "{size:?}: log Z = {:.6}, built in {elapsed:?}, energy exact: {}, points: {}",
            reference.log_z(),
            reference.energy_distribution_is_exact(),
            reference.energy_distribution().map_or(0, <[_]>::len)
        );
        assert!(
            (reference.log_z() - expected).abs() < 5e-4,
            "{size:?}: {}",
            reference.log_z()
        );
        let boxed = env.reference().unwrap();
        assert_eq!(boxed.log_z(), reference.log_z());
        // The energy distribution exists and is consistent with the exact moments.
        let points = reference.energy_distribution().unwrap();
        assert_eq!(
            reference.energy_distribution_is_exact(),
            size == SetSize::Small
        );
        let mass: f64 = points.iter().map(|p| p.1).sum();
        assert!((mass - 1.0).abs() < 1e-9);
        let mean: f64 = points.iter().map(|p| p.0 * p.1).sum();
        let var: f64 = points.iter().map(|p| (p.0 - mean).powi(2) * p.1).sum();
        let (m, s) = reference.target_energy_mean_std();
        assert!((mean - m).abs() < 1e-8, "{mean} vs {m}");
        assert!((var.sqrt() - s).abs() < 1e-4, "{} vs {s}", var.sqrt());
        // Marginals are distributions whose means add up to |S|.
        let expected_size: f64 = (0..10)
            .map(|j| {
                reference
                    .marginal(j)
                    .iter()
                    .enumerate()
                    .map(|(c, p)| c as f64 * p)
                    .sum::<f64>()
            })
            .sum();
        assert!((expected_size - env.set_size() as f64).abs() < 1e-9);
    }
}

#[test]
fn small_rewards_and_energy_moments() {
    let reference = SetReference::new(&small());
    let (mean, std) = reference.target_energy_mean_std();
    println!(
        "small: mean {mean:.6} std {std:.6}, max R {:.6}, top100 {:.7}",
        reference.max_reward(),
        reference.top_k_mean_reward(100)
    );
    assert!((mean - 4.537).abs() < 5e-4, "{mean}");
    assert!((std - 1.206).abs() < 5e-4, "{std}");
    assert!((reference.max_reward() - 0.29996).abs() < 5e-6);
    assert!((reference.top_k_mean_reward(100) - 0.263281).abs() < 5e-7);
    assert!((reference.top_k_mean_reward(1) - reference.max_reward()).abs() < 1e-12);
    assert!(reference.top_k_mean_reward(0).is_nan());
}

#[test]
fn medium_and_large_rewards() {
    for (size, max_r, top) in [
        (SetSize::Medium, 1_007_575.0, 999_302.0),
        (SetSize::Large, 908_804.0, 900_296.0),
    ] {
        let reference = SetReference::new(&preset(size));
        let (m, t) = (reference.max_reward(), reference.top_k_mean_reward(100));
        println!("{size:?}: max R {m:.1}, top100 {t:.1}");
        assert!((m - max_r).abs() < 1.0, "{size:?}: {m}");
        assert!((t - top).abs() < 1.0, "{size:?}: {t}");
    }
}

/// Enumerates all subsets of a tiny instance and checks every exact
/// quantity of the reference against it.
#[test]
fn brute_force_tiny_instance() {
    let levels = vec![-0.5, 0.2, 1.0];
    let env = SetGeneration::from_parts(6, 3, levels.clone()).unwrap();
    let reference = SetReference::new(&env);
    let mut sets = Vec::new();
    for bits in 0u32..64 {
        if bits.count_ones() != 3 {
            continue;
        }
        let members: Vec<usize> = (0..6).filter(|u| bits >> u & 1 == 1).collect();
        let s = state_of(&env, &members);
        sets.push((env.energy(&s), members));
    }
    assert_eq!(sets.len(), 20);
    let z: f64 = sets.iter().map(|(e, _)| (-e).exp()).sum();
    assert!((reference.log_z() - z.ln()).abs() < 1e-12);

    for j in 0..3 {
        let mut marginal = [0.0; 3];
        for (e, members) in &sets {
            let c = members.iter().filter(|&&u| u % 3 == j).count();
            marginal[c] += (-e).exp() / z;
        }
        for (c, (&exact, &brute)) in reference.marginal(j).iter().zip(&marginal).enumerate() {
            assert!((exact - brute).abs() < 1e-12, "level {j} count {c}");
        }
    }

    let mut brute: Vec<(f64, f64)> = sets.iter().map(|(e, _)| (*e, (-e).exp() / z)).collect();
    brute.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut merged: Vec<(f64, f64)> = Vec::new();
    for (e, p) in brute {
        match merged.last_mut() {
            Some(last) if (last.0 - e).abs() < 1e-9 => last.1 += p,
            _ => merged.push((e, p)),
        }
    }
    let points = reference.energy_distribution().unwrap();
    assert!(reference.energy_distribution_is_exact());
    assert_eq!(points.len(), merged.len());
    for (a, b) in points.iter().zip(&merged) {
        assert!(
            (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-12,
            "{a:?} vs {b:?}"
        );
    }

    let mean: f64 = merged.iter().map(|p| p.0 * p.1).sum();
    let var: f64 = merged.iter().map(|p| (p.0 - mean).powi(2) * p.1).sum();
    let (m, s) = reference.target_energy_mean_std();
    assert!((m - mean).abs() < 1e-12 && (s - var.sqrt()).abs() < 1e-12);

    let mut energies: Vec<f64> = sets.iter().map(|(e, _)| *e).collect();
    energies.sort_by(f64::total_cmp);
    for k in 1..=25 {
        // Beyond the 20 sets there are, a missing one counts 0, as in the
        // sampled top-k metric.
        let take = k.min(energies.len());
        let expected = energies[..take].iter().map(|e| (-e).exp()).sum::<f64>() / k as f64;
        assert!(
            (reference.top_k_mean_reward(k) - expected).abs() < 1e-12,
            "k = {k}"
        );
    }
    assert!((reference.max_reward() - (-energies[0]).exp()).abs() < 1e-12);

    // A point mass at the target's lowest energy: W1 = E_target[E] - E_min.
    let w1 = reference.energy_w1(&[energies[0]; 5]).unwrap();
    assert!((w1 - (mean - energies[0])).abs() < 1e-12);
}

#[test]
fn huge_custom_task_keeps_exact_scalars_without_energy_distribution() {
    // Equal levels: every set has energy 0, so Z = C(400, 200).
    let env = SetGeneration::from_parts(400, 200, vec![0.0; 40]).unwrap();
    let reference = SetReference::new(&env);
    let log_binomial: f64 = (1..=200).map(|i| ((200 + i) as f64 / i as f64).ln()).sum();
    assert!((reference.log_z() - log_binomial).abs() < 1e-9);
    assert!(reference.energy_distribution().is_none());
    assert_eq!(reference.energy_w1(&[0.0]), None);
    assert_eq!(reference.target_energy_mean_std(), (0.0, 0.0));
    assert_eq!(reference.top_k_mean_reward(100), 1.0);
    let s = state_of(&env, &(0..200).collect::<Vec<_>>());
    assert!(reference.marginal_tv(&[s]).unwrap() > 0.0);

    let start = Instant::now();
    // Small levels keep exp(-E) of the best sets within f64 range.
    let levels: Vec<f64> = (0..4096).map(|i| 0.1 * (i as f64 * 0.37).sin()).collect();
    let env = SetGeneration::from_parts(4096, 2048, levels).unwrap();
    let reference = SetReference::new(&env);
    let top = reference.top_k_mean_reward(100);
    println!("universe 4096: built and top-100 in {:?}", start.elapsed());
    assert!(reference.log_z().is_finite() && top.is_finite() && top <= reference.max_reward());
}

#[test]
fn binned_energy_distribution_matches_exact() {
    let env = small();
    let exact = SetReference::new(&env);
    let binned = SetReference::build(&env, 0.0);
    assert!(exact.energy_distribution_is_exact());
    assert!(!binned.energy_distribution_is_exact());
    assert!(
        binned.energy_distribution().unwrap().len() < exact.energy_distribution().unwrap().len()
    );
    let mut rng = SmallRng::seed_from_u64(3);
    let energies: Vec<f64> = (0..500).map(|_| rng.random_range(2.0..7.0)).collect();
    let (a, b) = (
        exact.energy_w1(&energies).unwrap(),
        binned.energy_w1(&energies).unwrap(),
    );
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
}

#[test]
fn w1_and_tv_edge_cases() {
    let reference = SetReference::new(&small());
    assert_eq!(reference.score(&[], &[]), DistributionScores::default());
    // Saturated, not infinite (which JSON writes as null).
    assert_eq!(reference.energy_w1(&[f64::NAN]), Some(f64::MAX));
    assert_eq!(reference.marginal_tv(&[vec![1, 0]]), None);
    // Integral of |F_sample - F_target|, hand-checked on two points.
    let d = wasserstein1(&[0.0, 2.0], &[(1.0, 1.0)]);
    assert!((d - 1.0).abs() < 1e-15);
    let d = wasserstein1(&[1.0, 1.0], &[(0.0, 0.5), (1.0, 0.25), (3.0, 0.25)]);
    assert!((d - (0.5 + 0.5)).abs() < 1e-15);
    // Undefined, not a hang (a NaN never equals itself) nor 0.
    assert!(wasserstein1(&[0.0, f64::NAN], &[(1.0, 1.0)]).is_nan());
    assert!(wasserstein1(&[0.0], &[(f64::NAN, 1.0)]).is_nan());
    assert!(wasserstein1(&[], &[(1.0, 1.0)]).is_nan());
}

/// Exact sampler of compositions: level by level from the conditional
/// given the count still to place. Which copies are chosen does not
/// matter for the metrics, so each level takes its first c_j copies.
fn exact_samples(env: &SetGeneration, n: usize, rng: &mut SmallRng) -> (Vec<State>, Vec<f64>) {
    let levels = env.levels();
    let l = levels.len();
    let m = env.copies_per_level();
    let weights = level_log_weights(levels, m);
    let suffix = suffix_log_partition(&weights, env.set_size());
    let mut states = Vec::with_capacity(n);
    let mut energies = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = env.initial_state();
        let mut r = env.set_size();
        for j in 0..l {
            let mut u: f64 = rng.random();
            let mut chosen = r.min(m);
            for c in 0..=r.min(m) {
                let p = (weights[j][c] + suffix[j + 1][r - c] - suffix[j][r]).exp();
                if u < p {
                    chosen = c;
                    break;
                }
                u -= p;
            }
            for i in 0..chosen {
                s[j + l * i] = 1;
            }
            r -= chosen;
        }
        assert!(env.is_terminal(&s));
        energies.push(env.energy(&s));
        states.push(s);
    }
    (states, energies)
}

#[test]
fn noise_floor_of_exact_and_uniform_samples() {
    let env = small();
    let reference = env.reference().unwrap();
    let mut rng = SmallRng::seed_from_u64(2023);

    let (states, energies) = exact_samples(&env, 4096, &mut rng);
    let exact = reference.score(&states, &energies);
    let mean = energies.iter().sum::<f64>() / energies.len() as f64;

    let mut states = Vec::new();
    let mut energies = Vec::new();
    for _ in 0..4096 {
        let mut s = env.initial_state();
        for u in rand::seq::index::sample(&mut rng, 30, 20) {
            s[u] = 1;
        }
        energies.push(env.energy(&s));
        states.push(s);
    }
    let uniform = reference.score(&states, &energies);
    println!(
        "exact sampler (4096): {exact:?}, sample mean energy {mean:.4}; uniform sets (4096): {uniform:?}"
    );

    assert!((mean - 4.537).abs() < 0.1);
    assert!(exact.marginal_tv.unwrap() < 0.03);
    assert!(exact.energy_w1.unwrap() < 0.06);
    assert!((0.12..0.19).contains(&uniform.marginal_tv.unwrap()));
    assert!((1.3..1.9).contains(&uniform.energy_w1.unwrap()));
}

/// A custom task too large for its energy distribution has no energy W1,
/// and its quality is judged without one instead of never met.
#[test]
fn a_task_without_an_energy_distribution_is_judged_without_energy_w1() {
    let levels: Vec<f64> = (0..40).map(|j| f64::from(j) * 0.05).collect();
    let env = SetGeneration::from_parts(400, 200, levels).unwrap();
    let reference = SetReference::new(&env);
    assert!(reference.energy_distribution().is_none());
    let quality = env.reference().unwrap().quality();
    assert_eq!(quality.energy_w1, None);
    assert_eq!(quality.marginal_tv, Some(0.03));
    // The presets keep the threshold.
    assert!(small().reference().unwrap().quality().energy_w1.is_some());
}

/// Only small itself (its levels in any order) gets the notes' flat 0.1;
/// a set one field away from it is judged by 0.083 x its own spread.
#[test]
fn only_the_small_preset_itself_gets_the_notes_flat_threshold() {
    let (_, _, levels) = SetSize::Small.preset();
    let mut reversed = levels.to_vec();
    reversed.reverse();
    let mut moved = levels.to_vec();
    moved[0] -= 0.1;
    let threshold = |universe, set_size, levels: Vec<f64>| {
        let env = SetGeneration::from_parts(universe, set_size, levels).unwrap();
        let reference = SetReference::new(&env);
        let (_, std) = reference.target_energy_mean_std();
        (reference.energy_w1_threshold(), 0.083 * std)
    };
    assert_eq!(threshold(30, 20, levels.to_vec()).0, 0.1);
    assert_eq!(threshold(30, 20, reversed).0, 0.1);
    for (universe, set_size, levels) in [
        (20, 20 - 6, levels.to_vec()),
        (30, 19, levels.to_vec()),
        (30, 20, moved),
    ] {
        let (given, spread) = threshold(universe, set_size, levels);
        assert!(
            (given - spread).abs() < 1e-12,
            "{universe} {set_size}: {given} {spread}"
        );
        assert_ne!(given, 0.1);
    }
}

/// Each size is judged by paper-notes' thresholds: marginal TV <= 0.03,
/// |log Z error| <= 0.3 and energy W1 <= 0.083 x that size's target
/// energy standard deviation, except on small, where the notes set 0.1
/// itself (0.083 x its 1.2063 is 0.10012).
#[test]
fn every_set_size_is_judged_by_its_own_thresholds() {
    let mut w1 = Vec::new();
    for size in [SetSize::Small, SetSize::Medium, SetSize::Large] {
        let env = preset(size);
        let quality = env.reference().unwrap().quality();
        let (_, std) = SetReference::new(&env).target_energy_mean_std();
        assert_eq!(quality.marginal_tv, Some(0.03), "{size:?}");
        assert_eq!(quality.log_z_error, 0.3, "{size:?}");
        assert_eq!(quality.exact_tv, None, "{size:?}");
        let threshold = quality.energy_w1.unwrap();
        if size == SetSize::Small {
            assert_eq!(threshold, 0.1);
            assert!(0.083 * std > 0.1, "small's 0.083 x std: {}", 0.083 * std);
        } else {
            assert!((threshold - 0.083 * std).abs() < 1e-12, "{size:?}");
        }
        w1.push(threshold);
    }
    // Their own: the sizes' energies spread differently.
    assert!(w1[0] != w1[1] && w1[1] != w1[2], "{w1:?}");
}

/// A refused value that the size preset supplied names the preset and the
/// key to set; one the user set is refused as it is.
#[test]
fn a_refused_value_from_the_preset_says_where_it_came_from() {
    let refusal = |config: SetGenerationConfig| {
        SetGeneration::new(&config)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    };
    let from_preset = refusal(SetGenerationConfig {
        universe: Some(10),
        ..SetGenerationConfig::default()
    });
    assert!(
        from_preset.contains("task.set_size")
            && from_preset.contains("got 20")
            && from_preset
                .contains("task.size = \"small\" sets set_size = 20: set task.set_size too"),
        "{from_preset}"
    );
    let set_by_the_user = refusal(SetGenerationConfig {
        universe: Some(10),
        set_size: Some(20),
        ..SetGenerationConfig::default()
    });
    assert!(set_by_the_user.contains("got 20"), "{set_by_the_user}");
    assert!(!set_by_the_user.contains("task.size"), "{set_by_the_user}");
    // The universe too: medium's 80 with levels the user gave (3 of them).
    let universe = refusal(SetGenerationConfig {
        size: SetSize::Medium,
        levels: Some(vec![0.1, 0.2, 0.3]),
        ..SetGenerationConfig::default()
    });
    assert!(
        universe.contains("task.universe")
            && universe.contains("task.size = \"medium\" sets universe = 80"),
        "{universe}"
    );
}
