//! Task 2 of the paper: a lattice energy model whose intermediate energies
//! interact.
//!
//! Spins s_i in {-1, +1} are assigned to the sites of an L x L lattice (open
//! boundaries, neighbours to the right and below), one site per step. A
//! partial assignment has energy
//!
//! ```text
//! E(s) = - sum over neighbouring pairs both assigned of J_ij s_i s_j
//!        - h sum over assigned sites of s_i
//! ```
//!
//! so assigning site i the spin v contributes -h v - sum_j J_ij v s_j over
//! its already-assigned neighbours j: local, but dependent on the state.
//! Couplings are J_ij = `coupling` + `disorder` x a standard normal draw,
//! drawn from `couplings_seed` by a fixed generator (splitmix64 and
//! Box-Muller, written here so every build draws the same lattice).
//!
//! `order = "fixed"` assigns the sites in row-major order (the state graph is
//! a tree, P_B is trivial); `order = "any"` lets each step pick any unassigned
//! site (a DAG with L^2! orders per object), allowed up to L = 3.
//!
//! Actions: forward `2 i + (v == +1)` assigns spin v to site i; backward `i`
//! unassigns site i. The encoding is two indicators per site (+1, -1).
//!
//! Up to L = 4 the target is enumerated exactly (2^16 objects), so the
//! evaluation measures the exact total variation and KL divergence of the
//! learned sampler ([`LatticeReference`]).

use std::collections::HashMap;

use crate::config::ConfigError;
use crate::env::{
    DistributionScores, Environment, InvalidAction, Quality, State, TaskReference, TaskSpec,
};

/// Largest side accepted for either order.
pub const MAX_SIDE: usize = 16;
/// Largest side whose target is enumerated exactly.
pub const MAX_EXACT_SIDE: usize = 4;
/// Largest side allowed with `order = "any"`: 3^9 states; 4 x 4 would have
/// 43 million.
pub const MAX_ANY_ORDER_SIDE: usize = 3;

/// In which order sites are assigned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteOrder {
    /// Row-major: a tree of states.
    #[default]
    Fixed,
    /// Any unassigned site next: a DAG of states.
    Any,
}

/// `[task]` with `name = "lattice"`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatticeConfig {
    /// L: the lattice is L x L.
    pub side: usize,
    /// Mean coupling J between neighbours (> 0 favours aligned spins).
    pub coupling: f64,
    /// Standard deviation of the random part of each coupling (0: every
    /// J_ij = `coupling`).
    pub disorder: f64,
    /// Seed of the random couplings.
    pub couplings_seed: u64,
    /// External field h (> 0 favours +1).
    pub field: f64,
    /// Site order: fixed (tree) or any (DAG).
    pub order: SiteOrder,
}

impl Default for LatticeConfig {
    fn default() -> Self {
        // A small spin glass: several modes, exactly enumerable.
        LatticeConfig {
            side: 4,
            coupling: 0.0,
            disorder: 1.0,
            couplings_seed: 0,
            field: 0.0,
            order: SiteOrder::Fixed,
        }
    }
}

/// The lattice environment. See the module documentation.
#[derive(Debug, Clone)]
pub struct Lattice {
    config: LatticeConfig,
    sites: usize,
    /// Per site, its neighbours and their couplings.
    neighbours: Vec<Vec<(usize, f64)>>,
}

/// splitmix64: a fixed, portable generator for the couplings.
fn splitmix64(state: &mut u64) -> u64 {
    let drawn = crate::rollout::splitmix(*state);
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    drawn
}

/// A standard normal draw (Box-Muller on two uniforms in (0, 1]).
fn standard_normal(state: &mut u64) -> f64 {
    let uniform = |s: &mut u64| ((splitmix64(s) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let (u, v) = (uniform(state), uniform(state));
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

impl Lattice {
    /// Registered task name.
    pub const NAME: &'static str = "lattice";

    /// Builds the lattice, validating its parameters.
    pub fn new(config: &LatticeConfig) -> Result<Self, ConfigError> {
        let side = config.side;
        if !(2..=MAX_SIDE).contains(&side) {
            return Err(ConfigError::invalid(
                "task.side",
                format!("must be between 2 and {MAX_SIDE}, got {side}"),
            ));
        }
        if config.order == SiteOrder::Any && side > MAX_ANY_ORDER_SIDE {
            return Err(ConfigError::invalid(
                "task.order",
                format!(
                    "\"any\" is allowed up to side {MAX_ANY_ORDER_SIDE} (3^(L*L) states), got side {side}"
                ),
            ));
        }
        for (field, value) in [
            ("task.coupling", config.coupling),
            ("task.disorder", config.disorder),
            ("task.field", config.field),
        ] {
            if !value.is_finite() || value.abs() > 100.0 {
                return Err(ConfigError::invalid(
                    field,
                    format!("must be finite and within [-100, 100], got {value}"),
                ));
            }
        }
        if config.disorder < 0.0 {
            return Err(ConfigError::invalid(
                "task.disorder",
                format!("is a standard deviation, got {}", config.disorder),
            ));
        }
        let sites = side * side;
        let mut neighbours = vec![Vec::new(); sites];
        let mut rng = config.couplings_seed;
        for i in 0..sites {
            let (row, col) = (i / side, i % side);
            let right = (col + 1 < side).then_some(i + 1);
            let below = (row + 1 < side).then_some(i + side);
            for j in [right, below].into_iter().flatten() {
                let coupling = config.coupling + config.disorder * standard_normal(&mut rng);
                neighbours[i].push((j, coupling));
                neighbours[j].push((i, coupling));
            }
        }
        Ok(Lattice {
            config: config.clone(),
            sites,
            neighbours,
        })
    }

    /// Number of sites, L x L.
    pub fn sites(&self) -> usize {
        self.sites
    }

    /// The coupling between neighbouring sites `i` and `j`, if they are.
    pub fn coupling(&self, i: usize, j: usize) -> Option<f64> {
        self.neighbours
            .get(i)?
            .iter()
            .find(|&&(k, _)| k == j)
            .map(|&(_, c)| c)
    }

    fn assigned(state: &State) -> usize {
        state.iter().filter(|&&v| v != 0).count()
    }

    /// The site the fixed order assigns next.
    fn next_fixed_site(state: &State) -> usize {
        Self::assigned(state)
    }
}

impl Environment for Lattice {
    fn spec(&self) -> TaskSpec {
        let c = &self.config;
        TaskSpec {
            name: Self::NAME.to_owned(),
            params: vec![
                format!("side={}", c.side),
                format!("order={:?}", c.order).to_lowercase(),
                format!("coupling={:?}", c.coupling),
                format!("disorder={:?}", c.disorder),
                format!("couplings_seed={}", c.couplings_seed),
                format!("field={:?}", c.field),
            ],
        }
    }

    fn state_dim(&self) -> usize {
        2 * self.sites
    }

    fn forward_actions(&self) -> usize {
        2 * self.sites
    }

    fn backward_actions(&self) -> usize {
        self.sites
    }

    fn max_trajectory_len(&self) -> usize {
        self.sites
    }

    fn initial_state(&self) -> State {
        vec![0; self.sites]
    }

    fn encode(&self, state: &State, out: &mut [f32]) {
        debug_assert_eq!(out.len(), 2 * self.sites);
        for (pair, &v) in out.chunks_exact_mut(2).zip(state) {
            pair[0] = f32::from(v > 0);
            pair[1] = f32::from(v < 0);
        }
    }

    fn forward_mask(&self, state: &State, out: &mut [bool]) {
        out.fill(false);
        match self.config.order {
            SiteOrder::Fixed => {
                let next = Self::next_fixed_site(state);
                if next < self.sites {
                    out[2 * next] = true;
                    out[2 * next + 1] = true;
                }
            }
            SiteOrder::Any => {
                for (i, &v) in state.iter().enumerate() {
                    if v == 0 {
                        out[2 * i] = true;
                        out[2 * i + 1] = true;
                    }
                }
            }
        }
    }

    fn backward_mask(&self, state: &State, out: &mut [bool]) {
        out.fill(false);
        match self.config.order {
            SiteOrder::Fixed => {
                let assigned = Self::assigned(state);
                if assigned > 0 {
                    out[assigned - 1] = true;
                }
            }
            SiteOrder::Any => {
                for (o, &v) in out.iter_mut().zip(state) {
                    *o = v != 0;
                }
            }
        }
    }

    fn is_terminal(&self, state: &State) -> bool {
        Self::assigned(state) == self.sites
    }

    fn step(&self, state: &mut State, action: usize) -> Result<usize, InvalidAction> {
        let site = action / 2;
        if site >= self.sites || state.len() != self.sites {
            return Err(InvalidAction {
                action,
                reason: "out of range",
            });
        }
        if self.is_terminal(state) {
            return Err(InvalidAction {
                action,
                reason: "terminal state",
            });
        }
        if state[site] != 0 {
            return Err(InvalidAction {
                action,
                reason: "site already assigned",
            });
        }
        if self.config.order == SiteOrder::Fixed && site != Self::next_fixed_site(state) {
            return Err(InvalidAction {
                action,
                reason: "not the next site of the fixed order",
            });
        }
        state[site] = if action % 2 == 1 { 1 } else { -1 };
        Ok(site)
    }

    fn transition_energy(&self, state: &State, action: usize) -> f64 {
        let site = action / 2;
        let spin = if action % 2 == 1 { 1.0 } else { -1.0 };
        let interaction: f64 = self.neighbours[site]
            .iter()
            .map(|&(j, coupling)| coupling * f64::from(state[j]))
            .sum();
        -spin * (self.config.field + interaction)
    }

    fn energy(&self, state: &State) -> f64 {
        let mut energy = 0.0;
        for (i, &v) in state.iter().enumerate() {
            let spin = f64::from(v);
            energy -= self.config.field * spin;
            for &(j, coupling) in &self.neighbours[i] {
                if j > i {
                    energy -= coupling * spin * f64::from(state[j]);
                }
            }
        }
        energy
    }

    fn reference(&self) -> Option<Box<dyn TaskReference>> {
        (self.config.side <= MAX_EXACT_SIDE)
            .then(|| Box::new(LatticeReference::new(self)) as Box<dyn TaskReference>)
    }
}

/// The exact target of a lattice up to 4 x 4, by enumerating every
/// assignment.
#[derive(Debug)]
pub struct LatticeReference {
    log_z: f64,
    /// R(x)/Z of every complete assignment.
    target: HashMap<State, f64>,
    /// P(s_i = +1) under the target, per site.
    up_probability: Vec<f64>,
    /// (energy, probability), sorted by energy.
    energy_points: Vec<(f64, f64)>,
}

impl LatticeReference {
    /// Enumerates the 2^(L*L) objects of `lattice` (L <= 4).
    pub fn new(lattice: &Lattice) -> Self {
        let n = lattice.sites;
        assert!(
            lattice.config.side <= MAX_EXACT_SIDE,
            "exact enumeration up to side {MAX_EXACT_SIDE}"
        );
        let states: Vec<State> = (0..1u32 << n)
            .map(|bits| {
                (0..n)
                    .map(|i| if bits >> i & 1 == 1 { 1 } else { -1 })
                    .collect()
            })
            .collect();
        let log_rewards: Vec<f64> = states.iter().map(|s| -lattice.energy(s)).collect();
        let log_z = crate::exact::log_sum_exp(log_rewards.iter().copied());
        let mut up_probability = vec![0.0; n];
        let mut energy_points = Vec::with_capacity(states.len());
        let mut target = HashMap::with_capacity(states.len());
        for (state, &log_r) in states.into_iter().zip(&log_rewards) {
            let p = (log_r - log_z).exp();
            for (up, &v) in up_probability.iter_mut().zip(&state) {
                if v > 0 {
                    *up += p;
                }
            }
            energy_points.push((-log_r, p));
            target.insert(state, p);
        }
        energy_points.sort_by(|a, b| a.0.total_cmp(&b.0));
        LatticeReference {
            log_z,
            target,
            up_probability,
            energy_points,
        }
    }

    /// P(s_i = +1) under the target.
    pub fn up_probability(&self) -> &[f64] {
        &self.up_probability
    }
}

impl TaskReference for LatticeReference {
    fn log_z(&self) -> f64 {
        self.log_z
    }

    /// Marginal TV: per site, the total variation between the sampled and
    /// exact distributions of its spin (|p^ - p| for two outcomes),
    /// averaged over sites. Energy W1 against the exact energy distribution.
    fn score(&self, terminal_states: &[State], energies: &[f64]) -> DistributionScores {
        if terminal_states.is_empty() {
            return DistributionScores::default();
        }
        let count = terminal_states.len() as f64;
        let marginal_tv = self
            .up_probability
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let sampled = terminal_states.iter().filter(|s| s[i] > 0).count() as f64 / count;
                (sampled - p).abs()
            })
            .sum::<f64>()
            / self.up_probability.len() as f64;
        DistributionScores {
            marginal_tv: Some(marginal_tv),
            energy_w1: crate::exact::energy_w1(energies, &self.energy_points),
        }
    }

    fn quality(&self) -> Quality {
        // paper-notes: exact TV <= 0.1 and |log Z error| <= 0.3.
        Quality {
            exact_tv: Some(0.1),
            log_z_error: 0.3,
            ..Quality::default()
        }
    }

    fn exact_target(&self) -> Option<&HashMap<State, f64>> {
        Some(&self.target)
    }

    fn best_mean_reward(&self, k: usize) -> Option<f64> {
        // energy_points is sorted by energy: the best objects come first.
        // A missing object counts 0 where there are fewer than k, as in
        // the sampled top-k metric.
        let best = &self.energy_points[..k.min(self.energy_points.len())];
        (!best.is_empty()).then(|| best.iter().map(|&(e, _)| (-e).exp()).sum::<f64>() / k as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::target_distribution;

    fn lattice(side: usize, order: SiteOrder) -> Lattice {
        Lattice::new(&LatticeConfig {
            side,
            order,
            coupling: 0.3,
            disorder: 0.8,
            couplings_seed: 11,
            field: 0.2,
        })
        .unwrap()
    }

    /// The energy written out from its definition, pair by pair, with no
    /// use of the task's neighbour lists except for the couplings.
    fn energy_by_definition(l: &Lattice, side: usize, state: &State) -> f64 {
        let spin = |r: usize, c: usize| f64::from(state[r * side + c]);
        let mut e = 0.0;
        for r in 0..side {
            for c in 0..side {
                e -= 0.2 * spin(r, c);
                if c + 1 < side {
                    e -= l.coupling(r * side + c, r * side + c + 1).unwrap()
                        * spin(r, c)
                        * spin(r, c + 1);
                }
                if r + 1 < side {
                    e -= l.coupling(r * side + c, (r + 1) * side + c).unwrap()
                        * spin(r, c)
                        * spin(r + 1, c);
                }
            }
        }
        e
    }

    #[test]
    fn exact_log_z_is_the_log_sum_exp_of_every_energy() {
        for side in [2, 3, 4] {
            let l = lattice(side, SiteOrder::Fixed);
            let n = side * side;
            let energies: Vec<f64> = (0..1u32 << n)
                .map(|bits| {
                    let s: State = (0..n)
                        .map(|i| if bits >> i & 1 == 1 { 1 } else { -1 })
                        .collect();
                    energy_by_definition(&l, side, &s)
                })
                .collect();
            let max = energies
                .iter()
                .map(|e| -e)
                .fold(f64::NEG_INFINITY, f64::max);
            let expected = max + energies.iter().map(|e| (-e - max).exp()).sum::<f64>().ln();
            let got = l.reference().unwrap().log_z();
            assert!(
                (got - expected).abs() < 1e-9,
                "side {side}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn energies_add_up_along_every_order() {
        // Every order of a 3 x 3 any-order lattice visits states whose
        // energies are the running sums of the local terms.
        let l = lattice(3, SiteOrder::Any);
        let mut mask = vec![false; l.forward_actions()];
        let mut seed = 5u64;
        for _ in 0..200 {
            let mut state = l.initial_state();
            let mut total = 0.0;
            while !l.is_terminal(&state) {
                l.forward_mask(&state, &mut mask);
                let valid: Vec<usize> = (0..mask.len()).filter(|&a| mask[a]).collect();
                let action = valid[(splitmix64(&mut seed) % valid.len() as u64) as usize];
                total += l.transition_energy(&state, action);
                l.step(&mut state, action).unwrap();
                assert!((total - l.energy(&state)).abs() < 1e-12);
            }
            assert!((total - energy_by_definition(&l, 3, &state)).abs() < 1e-12);
        }
    }

    #[test]
    fn both_orders_reach_the_same_targets_as_enumeration() {
        for order in [SiteOrder::Fixed, SiteOrder::Any] {
            let l = lattice(2, order);
            let by_dag = target_distribution(&l, 1_000).unwrap();
            let reference = LatticeReference::new(&l);
            assert_eq!(by_dag.len(), 16);
            for (state, p) in &by_dag {
                assert!((reference.target[state] - p).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn masks_follow_the_order() {
        let fixed = lattice(3, SiteOrder::Fixed);
        let mut state = fixed.initial_state();
        let mut mask = vec![false; 18];
        fixed.step(&mut state, 1).unwrap();
        fixed.forward_mask(&state, &mut mask);
        assert_eq!(mask.iter().filter(|&&m| m).count(), 2);
        assert!(mask[2] && mask[3]);
        let error = fixed.step(&mut state, 6).unwrap_err();
        assert!(error.reason.contains("fixed order"), "{error}");
        let mut back = vec![false; 9];
        fixed.backward_mask(&state, &mut back);
        assert_eq!(back.iter().filter(|&&m| m).count(), 1);

        let any = lattice(3, SiteOrder::Any);
        let mut state = any.initial_state();
        assert_eq!(any.step(&mut state, 9).unwrap(), 4);
        assert_eq!(state[4], 1);
        any.forward_mask(&state, &mut mask);
        assert_eq!(mask.iter().filter(|&&m| m).count(), 16);
        let error = any.step(&mut state, 8).unwrap_err();
        assert!(error.reason.contains("already"), "{error}");
    }

    #[test]
    fn bad_parameters_name_their_field() {
        let too_big = LatticeConfig {
            side: 4,
            order: SiteOrder::Any,
            ..LatticeConfig::default()
        };
        let error = Lattice::new(&too_big).unwrap_err();
        assert!(error.to_string().contains("task.order"), "{error}");
        let error = Lattice::new(&LatticeConfig {
            field: f64::NAN,
            ..LatticeConfig::default()
        })
        .unwrap_err();
        assert!(error.to_string().contains("task.field"), "{error}");
        let error = Lattice::new(&LatticeConfig {
            side: 1,
            ..LatticeConfig::default()
        })
        .unwrap_err();
        assert!(error.to_string().contains("task.side"), "{error}");
    }

    /// proto/TASKS.md's worked example, as an actor in another language
    /// checks itself against it: the couplings drawn for seed 0 and the
    /// terms of one trajectory.
    #[test]
    fn the_worked_example_of_tasks_md_holds() {
        let l = Lattice::new(&LatticeConfig {
            side: 2,
            order: SiteOrder::Fixed,
            coupling: 0.0,
            disorder: 1.0,
            couplings_seed: 0,
            field: 0.0,
        })
        .unwrap();
        for (i, j, coupling) in [
            (0, 1, -0.452_757_740_217_458_07),
            (0, 2, 2.650_605_812_079_669),
            (1, 3, -0.988_604_124_624_328_5),
            (2, 3, 0.252_462_724_150_614),
        ] {
            let drawn = l.coupling(i, j).unwrap();
            assert!((drawn - coupling).abs() < 1e-12, "J({i},{j}) = {drawn}");
        }
        let mut state = l.initial_state();
        let mut terms = Vec::new();
        for action in [1, 2, 5, 7] {
            terms.push(l.transition_energy(&state, action));
            l.step(&mut state, action).unwrap();
        }
        let expected = [
            0.0,
            -0.452_757_740_217_458_07,
            -2.650_605_812_079_669,
            -1.241_066_848_774_942_3,
        ];
        for (term, want) in terms.iter().zip(expected) {
            assert!((term - want).abs() < 1e-12, "{terms:?}");
        }
        assert_eq!(state, vec![1, -1, 1, 1]);
    }

    #[test]
    fn the_couplings_are_fixed_by_their_seed() {
        let a = Lattice::new(&LatticeConfig::default()).unwrap();
        let b = Lattice::new(&LatticeConfig::default()).unwrap();
        let c = Lattice::new(&LatticeConfig {
            couplings_seed: 1,
            ..LatticeConfig::default()
        })
        .unwrap();
        assert_eq!(a.coupling(0, 1), b.coupling(0, 1));
        assert_ne!(a.coupling(0, 1), c.coupling(0, 1));
        // Standard normal draws: the 24 couplings of 4 x 4 are spread.
        let draws: Vec<f64> = (0..16)
            .flat_map(|i| {
                a.neighbours[i]
                    .iter()
                    .filter(move |&&(j, _)| j > i)
                    .map(|&(_, c)| c)
            })
            .collect();
        assert_eq!(draws.len(), 24);
        let mean = draws.iter().sum::<f64>() / 24.0;
        assert!(mean.abs() < 0.8, "{mean}");
        assert!(draws.iter().any(|&d| d > 0.3) && draws.iter().any(|&d| d < -0.3));
    }
}
