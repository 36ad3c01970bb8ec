//! Task 1 of the paper: set generation.
//!
//! A trajectory adds one unused element of a universe U per step until the
//! set holds exactly |S| elements (there is no stop action). Each element u
//! carries an energy e_u; the energy of a (partial) set is the sum over its
//! members, so the local term of adding u is simply e_u. The element energies
//! take `L` distinct values ("levels"), each repeated m = |U| / L times, and
//! element u sits on level `u % L`.
//!
//! Because copies of a level are interchangeable for the target, every
//! exact quantity ([`SetReference`]) is computed over compositions: how
//! many copies c_j of each level a set holds, with multiplicity
//! prod_j C(m, c_j) and energy sum_j c_j level_j.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::config::ConfigError;
use crate::env::{DistributionScores, Environment, InvalidAction, State, TaskReference, TaskSpec};

/// Energy levels of the small preset (|U| = 30, |S| = 20).
const SMALL_LEVELS: [f64; 10] = [
    -0.4381397850674522,
    -0.40046449111789073,
    -0.2745059751263419,
    0.013149744911117978,
    0.4110535720923896,
    0.6261749162235306,
    0.6961474461702144,
    0.7442282139370466,
    0.8206350287761408,
    0.883494921538938,
];

/// Energy levels of the medium preset (|U| = 80, |S| = 60).
const MEDIUM_LEVELS: [f64; 10] = [
    -0.7866830411595669,
    -0.7837872949891345,
    -0.5230497555411129,
    -0.41860806745880197,
    -0.3855205729595568,
    0.2961218224370139,
    0.5731802451199923,
    0.6009291618806774,
    0.6881812517688572,
    0.7396350970666805,
];

/// Energy levels of the large preset (|U| = 100, |S| = 80).
const LARGE_LEVELS: [f64; 10] = [
    -0.8596854107736154,
    -0.5938789622812419,
    -0.5596177369051512,
    -0.4589997720511263,
    -0.15382957507887518,
    0.13832182722858843,
    0.3925029176153736,
    0.7231982581431591,
    0.7326989860019331,
    0.9244538380742333,
];

/// Largest universe accepted. Well beyond the paper's presets; it bounds the
/// network width and the cost of the exact reference tables.
pub const MAX_UNIVERSE: usize = 4096;

/// One of the paper's three task sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetSize {
    /// |U| = 30, |S| = 20.
    #[default]
    Small,
    /// |U| = 80, |S| = 60.
    Medium,
    /// |U| = 100, |S| = 80.
    Large,
}

impl SetSize {
    /// The preset's universe size |U|, set size |S| and energy levels.
    pub fn preset(self) -> (usize, usize, &'static [f64]) {
        match self {
            SetSize::Small => (30, 20, &SMALL_LEVELS),
            SetSize::Medium => (80, 60, &MEDIUM_LEVELS),
            SetSize::Large => (100, 80, &LARGE_LEVELS),
        }
    }
}

/// Configuration of the task as it appears under `[task]` in the TOML file
/// (the `name = "set_generation"` tag is handled by the enclosing enum).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetGenerationConfig {
    /// Preset supplying |U|, |S| and the levels; small by default.
    #[serde(default)]
    pub size: SetSize,
    /// Overrides the preset's universe size |U|.
    #[serde(default)]
    pub universe: Option<usize>,
    /// Overrides the preset's set size |S|.
    #[serde(default)]
    pub set_size: Option<usize>,
    /// Overrides the preset's energy levels.
    #[serde(default)]
    pub levels: Option<Vec<f64>>,
}

/// The set-generation environment. See the module documentation.
#[derive(Debug, Clone)]
pub struct SetGeneration {
    universe: usize,
    set_size: usize,
    levels: Vec<f64>,
    /// e_u for every element, so the hot path avoids a modulo.
    element_energies: Vec<f64>,
}

fn invalid(field: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        reason,
    }
}

fn member_count(state: &State) -> usize {
    state.iter().filter(|&&v| v != 0).count()
}

impl SetGeneration {
    /// Registered task name.
    pub const NAME: &'static str = "set_generation";

    /// Builds the task from its configuration: the preset, then overrides.
    pub fn new(config: &SetGenerationConfig) -> Result<Self, ConfigError> {
        let (universe, set_size, levels) = config.size.preset();
        Self::from_parts(
            config.universe.unwrap_or(universe),
            config.set_size.unwrap_or(set_size),
            config.levels.clone().unwrap_or_else(|| levels.to_vec()),
        )
    }

    /// Builds the task from explicit parameters, validating them.
    pub fn from_parts(
        universe: usize,
        set_size: usize,
        levels: Vec<f64>,
    ) -> Result<Self, ConfigError> {
        if levels.is_empty() {
            return Err(invalid(
                "task.levels",
                "needs at least one energy level".into(),
            ));
        }
        if let Some(bad) = levels.iter().find(|l| !l.is_finite()) {
            return Err(invalid(
                "task.levels",
                format!("every level must be finite, got {bad}"),
            ));
        }
        if universe == 0 {
            return Err(invalid("task.universe", "must be positive".into()));
        }
        if universe > MAX_UNIVERSE {
            return Err(invalid(
                "task.universe",
                format!("{universe} exceeds the limit of {MAX_UNIVERSE}"),
            ));
        }
        if universe % levels.len() != 0 {
            return Err(invalid(
                "task.universe",
                format!(
                    "{universe} is not a multiple of the number of levels ({}): each level must repeat equally often",
                    levels.len()
                ),
            ));
        }
        if set_size == 0 || set_size > universe {
            return Err(invalid(
                "task.set_size",
                format!("must be between 1 and the universe size {universe}, got {set_size}"),
            ));
        }
        let element_energies = (0..universe).map(|u| levels[u % levels.len()]).collect();
        Ok(Self {
            universe,
            set_size,
            levels,
            element_energies,
        })
    }

    /// Energy e_u of element `element` (< universe).
    pub fn element_energy(&self, element: usize) -> f64 {
        self.element_energies[element]
    }

    /// The distinct energy levels; element u has level `u % levels().len()`.
    pub fn levels(&self) -> &[f64] {
        &self.levels
    }

    /// Universe size |U|.
    pub fn universe(&self) -> usize {
        self.universe
    }

    /// Number of elements |S| of a finished set.
    pub fn set_size(&self) -> usize {
        self.set_size
    }

    /// How many elements share each level, m = |U| / L.
    pub fn copies_per_level(&self) -> usize {
        self.universe / self.levels.len()
    }
}

impl Environment for SetGeneration {
    fn spec(&self) -> TaskSpec {
        let levels: Vec<String> = self.levels.iter().map(|l| format!("{l:?}")).collect();
        TaskSpec {
            name: Self::NAME.to_owned(),
            params: vec![
                format!("universe={}", self.universe),
                format!("set_size={}", self.set_size),
                format!("levels={}", levels.join(",")),
            ],
        }
    }

    fn state_dim(&self) -> usize {
        self.universe
    }

    fn forward_actions(&self) -> usize {
        self.universe
    }

    fn backward_actions(&self) -> usize {
        self.universe
    }

    fn max_trajectory_len(&self) -> usize {
        self.set_size
    }

    fn initial_state(&self) -> State {
        vec![0; self.universe]
    }

    fn encode(&self, state: &State, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.universe);
        for (o, &v) in out.iter_mut().zip(state) {
            *o = if v != 0 { 1.0 } else { 0.0 };
        }
    }

    fn forward_mask(&self, state: &State, out: &mut [bool]) {
        let open = member_count(state) < self.set_size;
        for (o, &v) in out.iter_mut().zip(state) {
            *o = open && v == 0;
        }
    }

    fn backward_mask(&self, state: &State, out: &mut [bool]) {
        for (o, &v) in out.iter_mut().zip(state) {
            *o = v != 0;
        }
    }

    fn is_terminal(&self, state: &State) -> bool {
        member_count(state) == self.set_size
    }

    fn step(&self, state: &mut State, action: usize) -> Result<usize, InvalidAction> {
        if action >= self.universe || action >= state.len() {
            return Err(InvalidAction {
                action,
                reason: "out of range",
            });
        }
        if member_count(state) >= self.set_size {
            return Err(InvalidAction {
                action,
                reason: "terminal state",
            });
        }
        if state[action] != 0 {
            return Err(InvalidAction {
                action,
                reason: "already a member",
            });
        }
        state[action] = 1;
        Ok(action)
    }

    fn transition_energy(&self, _state: &State, action: usize) -> f64 {
        self.element_energies[action]
    }

    fn energy(&self, state: &State) -> f64 {
        state
            .iter()
            .zip(&self.element_energies)
            .filter(|&(&v, _)| v != 0)
            .map(|(_, &e)| e)
            .sum()
    }

    fn reference(&self) -> Option<Box<dyn TaskReference>> {
        Some(Box::new(SetReference::new(self)))
    }
}

// ---------------------------------------------------------------------------
// Exact reference
// ---------------------------------------------------------------------------

/// Above this many compositions the target energy distribution is binned
/// rather than kept point by point (small has 44,803; medium and large have
/// millions, too many to store).
const EXACT_COMPOSITIONS: f64 = 2.0e6;

/// Bin width of the binned energy distribution, unless the energy range
/// needs wider bins to stay within [`MAX_ENERGY_BINS`].
const ENERGY_BIN_WIDTH: f64 = 1e-4;

/// Caps the memory of the binned energy distribution for unusual configs.
const MAX_ENERGY_BINS: f64 = (1u64 << 20) as f64;

/// Beyond this many compositions the energy distribution is not built (a
/// custom config then has no energy W1); the presets have at most ten
/// million.
const MAX_COMPOSITIONS: f64 = 5.0e7;

/// ln C(m, c) for c = 0..=m, by a running sum of logarithms.
fn log_choose_table(m: usize) -> Vec<f64> {
    let mut table = Vec::with_capacity(m + 1);
    let mut acc = 0.0f64;
    table.push(0.0);
    for c in 1..=m {
        acc += ((m - c + 1) as f64).ln() - (c as f64).ln();
        table.push(acc);
    }
    table
}

/// Per level, ln[C(m, c) exp(-c level)] for c = 0..=m: the log weight of
/// holding c copies of that level.
fn level_log_weights(levels: &[f64], copies: usize) -> Vec<Vec<f64>> {
    let lc = log_choose_table(copies);
    levels
        .iter()
        .map(|&l| {
            lc.iter()
                .enumerate()
                .map(|(c, &w)| w - c as f64 * l)
                .collect()
        })
        .collect()
}

fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// `out[k] = ln sum_c exp(table[k - c] + weights[c])` for k = 0..=max_count.
fn log_convolve(table: &[f64], weights: &[f64], max_count: usize) -> Vec<f64> {
    (0..=max_count)
        .map(|k| {
            let terms = (0..=k.min(weights.len() - 1)).map(|c| table[k - c] + weights[c]);
            log_sum_exp(terms)
        })
        .collect()
}

/// Identity of the (log-)convolutions: only the empty selection, of size 0.
fn log_unit(max_count: usize) -> Vec<f64> {
    let mut unit = vec![f64::NEG_INFINITY; max_count + 1];
    unit[0] = 0.0;
    unit
}

/// `suffix[j][r]` = ln of the total weight of choosing r elements from
/// levels j.. (so `suffix[0][|S|]` is log Z and `suffix[L]` is the unit).
fn suffix_log_partition(weights: &[Vec<f64>], max_count: usize) -> Vec<Vec<f64>> {
    let mut suffix = vec![log_unit(max_count)];
    for w in weights.iter().rev() {
        let next = log_convolve(&suffix[suffix.len() - 1], w, max_count);
        suffix.push(next);
    }
    suffix.reverse();
    suffix
}

/// Conditional moments of the energy among sets of each size, merged level
/// by level in log space: (ln mass, mean, second moment) per count.
fn energy_moments(levels: &[f64], weights: &[Vec<f64>], max_count: usize) -> (f64, f64) {
    let mut table: Vec<(f64, f64, f64)> = (0..=max_count)
        .map(|k| {
            if k == 0 {
                (0.0, 0.0, 0.0)
            } else {
                (f64::NEG_INFINITY, 0.0, 0.0)
            }
        })
        .collect();
    for (&level, w) in levels.iter().zip(weights) {
        table = (0..=max_count)
            .map(|k| {
                let terms =
                    (0..=k.min(w.len() - 1)).filter(|&c| table[k - c].0 > f64::NEG_INFINITY);
                let log_mass = log_sum_exp(terms.clone().map(|c| table[k - c].0 + w[c]));
                if log_mass == f64::NEG_INFINITY {
                    return (f64::NEG_INFINITY, 0.0, 0.0);
                }
                let (mut mean, mut second) = (0.0, 0.0);
                for c in terms {
                    let (lm, mu, s2) = table[k - c];
                    let p = (lm + w[c] - log_mass).exp();
                    let x = c as f64 * level;
                    mean += p * (mu + x);
                    second += p * (s2 + 2.0 * x * mu + x * x);
                }
                (log_mass, mean, second)
            })
            .collect();
    }
    let (_, mean, second) = table[max_count];
    (mean, (second - mean * mean).max(0.0).sqrt())
}

/// Sum of the `count` lowest (or highest) element energies.
fn extreme_energy(levels: &[f64], copies: usize, count: usize, lowest: bool) -> f64 {
    let mut sorted = levels.to_vec();
    sorted.sort_by(f64::total_cmp);
    if !lowest {
        sorted.reverse();
    }
    let mut left = count;
    let mut total = 0.0;
    for l in sorted {
        let take = left.min(copies);
        total += take as f64 * l;
        left -= take;
    }
    total
}

/// Sub-compositions of a block of consecutive levels, grouped by how many
/// elements they hold: `groups[k]` lists `(energy, weight)` with weight =
/// exp(log weight - `log_scale[k]`), so every weight is at most 1 whatever
/// the size of the task.
struct Block {
    groups: Vec<Vec<(f64, f64)>>,
    log_scale: Vec<f64>,
}

impl Block {
    /// Enumerates the block's sub-compositions holding between `min_count`
    /// and `max_count` elements. Prefixes that cannot reach `min_count` are
    /// cut, so the work is proportional to the output.
    fn enumerate(
        levels: &[f64],
        weights: &[Vec<f64>],
        copies: usize,
        min_count: usize,
        max_count: usize,
    ) -> Self {
        fn visit(
            levels: &[f64],
            weights: &[Vec<f64>],
            copies: usize,
            (min_count, max_count): (usize, usize),
            (count, energy, log_weight): (usize, f64, f64),
            out: &mut [Vec<(f64, f64)>],
        ) {
            let Some((&l, rest)) = levels.split_first() else {
                if count >= min_count {
                    out[count].push((energy, log_weight));
                }
                return;
            };
            let high = copies.min(max_count - count);
            let low = min_count.saturating_sub(count + copies * rest.len());
            for c in low..=high {
                visit(
                    rest,
                    &weights[1..],
                    copies,
                    (min_count, max_count),
                    (count + c, energy + c as f64 * l, log_weight + weights[0][c]),
                    out,
                );
            }
        }
        let mut groups = vec![Vec::new(); max_count + 1];
        if min_count <= max_count && min_count <= copies * levels.len() {
            visit(
                levels,
                weights,
                copies,
                (min_count, max_count),
                (0, 0.0, 0.0),
                &mut groups,
            );
        }
        let log_scale = groups
            .iter_mut()
            .map(|group| {
                let scale = group.iter().map(|g| g.1).fold(f64::NEG_INFINITY, f64::max);
                for g in group.iter_mut() {
                    g.1 = (g.1 - scale).exp();
                }
                // Ascending energy keeps the binning writes of the pairing loop local.
                group.sort_by(|a, b| a.0.total_cmp(&b.0));
                scale
            })
            .collect();
        Self { groups, log_scale }
    }
}

/// Reports every composition (sum = |S|) once, as `(energy, probability)`,
/// by pairing the sub-compositions of the two halves of the levels: the
/// inner loop is then a product and a sum per composition, with no
/// recursion or exponential.
fn for_each_composition(
    levels: &[f64],
    weights: &[Vec<f64>],
    copies: usize,
    set_size: usize,
    log_z: f64,
    mut sink: impl FnMut(f64, f64),
) {
    let split = levels.len().div_ceil(2);
    let later = levels.len() - split;
    let first = Block::enumerate(
        &levels[..split],
        &weights[..split],
        copies,
        set_size.saturating_sub(copies * later),
        set_size,
    );
    let second = Block::enumerate(
        &levels[split..],
        &weights[split..],
        copies,
        set_size.saturating_sub(copies * split),
        set_size,
    );
    for (k, group) in first.groups.iter().enumerate() {
        let other = &second.groups[set_size - k];
        if group.is_empty() || other.is_empty() {
            continue;
        }
        // The two group maxima form a real composition, so this is at most 1.
        let factor = (first.log_scale[k] + second.log_scale[set_size - k] - log_z).exp();
        for &(e1, w1) in group {
            let w1 = w1 * factor;
            for &(e2, w2) in other {
                sink(e1 + e2, w1 * w2);
            }
        }
    }
}

/// Orders candidates of the top-k search by energy, highest first in a
/// max-heap so the worst kept candidate is evicted first.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    energy: f64,
    multiplicity: f64,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.energy.total_cmp(&other.energy) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.energy.total_cmp(&other.energy)
    }
}

/// Branch and bound for the k lowest-energy sets, walking levels from the
/// lowest energy up so good candidates are found early.
struct TopKSearch<'a> {
    /// Levels sorted ascending.
    levels: &'a [f64],
    log_choose: &'a [f64],
    copies: usize,
    k: f64,
    kept: BinaryHeap<Candidate>,
    kept_sets: f64,
}

impl TopKSearch<'_> {
    /// Energy of the best completion: fill the lowest remaining levels first.
    fn lower_bound(&self, level: usize, mut remaining: usize) -> f64 {
        let mut total = 0.0;
        for &l in &self.levels[level..] {
            if remaining == 0 {
                break;
            }
            let take = remaining.min(self.copies);
            total += take as f64 * l;
            remaining -= take;
        }
        total
    }

    fn threshold(&self) -> f64 {
        match self.kept.peek() {
            Some(worst) if self.kept_sets >= self.k => worst.energy,
            _ => f64::INFINITY,
        }
    }

    fn offer(&mut self, candidate: Candidate) {
        if candidate.energy >= self.threshold() {
            return;
        }
        self.kept_sets += candidate.multiplicity;
        self.kept.push(candidate);
        // Drop the worst candidates while the rest still cover k sets.
        while let Some(worst) = self.kept.peek().copied() {
            if self.kept_sets - worst.multiplicity >= self.k {
                self.kept_sets -= worst.multiplicity;
                self.kept.pop();
            } else {
                break;
            }
        }
    }

    fn visit(&mut self, level: usize, remaining: usize, energy: f64, log_mult: f64) {
        if energy + self.lower_bound(level, remaining) >= self.threshold() {
            return;
        }
        let l = self.levels[level];
        let later = self.levels.len() - level - 1;
        if later == 0 {
            let multiplicity = (log_mult + self.log_choose[remaining]).exp().round();
            self.offer(Candidate {
                energy: energy + remaining as f64 * l,
                multiplicity,
            });
            return;
        }
        let low = remaining.saturating_sub(self.copies * later);
        let high = remaining.min(self.copies);
        for c in (low..=high).rev() {
            self.visit(
                level + 1,
                remaining - c,
                energy + c as f64 * l,
                log_mult + self.log_choose[c],
            );
        }
    }
}

/// Exact facts about the set-generation target R(x)/Z, precomputed once.
///
/// log Z, the per-level marginals and the energy mean and standard deviation
/// are exact (dynamic programming over levels in log space), and so are
/// [`SetReference::max_reward`] and [`SetReference::top_k_mean_reward`]
/// (branch and bound over compositions). The target energy distribution is
/// kept point by point when the task has at most two million compositions
/// (small: 44,803, all kept). Beyond that (medium and large have 8.3 and 9.5
/// million) every composition is still visited once, but its probability is
/// added to a bin of width 1e-4 placed at the bin's probability-weighted
/// mean energy. Moving mass within a bin shifts it by less than the width,
/// so the binned distribution is within 1e-4 of the exact one in
/// 1-Wasserstein distance (its mean is exact), far below sampling noise.
/// Tasks with more than 5e7 compositions (custom configs only) get no energy
/// distribution, hence no energy W1.
#[derive(Debug, Clone)]
pub struct SetReference {
    levels: Vec<f64>,
    copies: usize,
    set_size: usize,
    log_z: f64,
    /// `marginals[j][c]`: probability that a target set holds c copies of level j.
    marginals: Vec<Vec<f64>>,
    /// Sorted support points and probabilities of the target energy.
    energy_points: Option<Vec<(f64, f64)>>,
    energy_exact: bool,
    energy_mean: f64,
    energy_std: f64,
}

impl SetReference {
    /// Precomputes the exact reference of `task`.
    pub fn new(task: &SetGeneration) -> Self {
        Self::build(task, EXACT_COMPOSITIONS)
    }

    fn build(task: &SetGeneration, exact_compositions: f64) -> Self {
        let levels = task.levels().to_vec();
        let copies = task.copies_per_level();
        let set_size = task.set_size();
        let weights = level_log_weights(&levels, copies);

        let mut prefix = vec![log_unit(set_size)];
        for w in &weights {
            let next = log_convolve(&prefix[prefix.len() - 1], w, set_size);
            prefix.push(next);
        }
        let suffix = suffix_log_partition(&weights, set_size);
        let log_z = suffix[0][set_size];

        let marginals = (0..levels.len())
            .map(|j| {
                let mut marginal: Vec<f64> = (0..=copies)
                    .map(|c| {
                        if c > set_size {
                            return 0.0;
                        }
                        let rest = set_size - c;
                        // Weight of choosing `rest` elements from every other level.
                        let others =
                            log_sum_exp((0..=rest).map(|a| prefix[j][a] + suffix[j + 1][rest - a]));
                        (weights[j][c] + others - log_z).exp()
                    })
                    .collect();
                let total: f64 = marginal.iter().sum();
                marginal.iter_mut().for_each(|p| *p /= total);
                marginal
            })
            .collect();

        let (energy_mean, energy_std) = energy_moments(&levels, &weights, set_size);
        let (energy_points, energy_exact) = Self::energy_distribution_of(
            &levels,
            &weights,
            copies,
            set_size,
            log_z,
            exact_compositions,
        );

        Self {
            levels,
            copies,
            set_size,
            log_z,
            marginals,
            energy_points,
            energy_exact,
            energy_mean,
            energy_std,
        }
    }

    fn energy_distribution_of(
        levels: &[f64],
        weights: &[Vec<f64>],
        copies: usize,
        set_size: usize,
        log_z: f64,
        exact_compositions: f64,
    ) -> (Option<Vec<(f64, f64)>>, bool) {
        // Counted in f64: the count only chooses the mode, so overflow-free
        // approximate values are enough.
        let mut compositions = vec![0.0f64; set_size + 1];
        compositions[0] = 1.0;
        for _ in levels {
            compositions = (0..=set_size)
                .map(|k| (0..=k.min(copies)).map(|c| compositions[k - c]).sum())
                .collect();
        }
        let total_compositions = compositions[set_size];

        if total_compositions > MAX_COMPOSITIONS {
            return (None, false);
        }

        if total_compositions <= exact_compositions {
            let mut points = Vec::new();
            for_each_composition(levels, weights, copies, set_size, log_z, |e, p| {
                points.push((e, p))
            });
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut merged: Vec<(f64, f64)> = Vec::with_capacity(points.len());
            for (e, p) in points {
                match merged.last_mut() {
                    Some(last) if last.0 == e => last.1 += p,
                    _ => merged.push((e, p)),
                }
            }
            normalise(&mut merged);
            return (Some(merged), true);
        }

        let low = extreme_energy(levels, copies, set_size, true);
        let high = extreme_energy(levels, copies, set_size, false);
        let width = ENERGY_BIN_WIDTH.max((high - low) / MAX_ENERGY_BINS);
        let bins = ((high - low) / width) as usize + 1;
        // Per bin: probability and probability-weighted energy.
        let mut binned = vec![(0.0f64, 0.0f64); bins];
        let inverse_width = 1.0 / width;
        for_each_composition(levels, weights, copies, set_size, log_z, |e, p| {
            // `as` saturates a rounding-negative offset to bin 0.
            let index = (((e - low) * inverse_width) as usize).min(bins - 1);
            binned[index].0 += p;
            binned[index].1 += p * e;
        });
        let mut points: Vec<(f64, f64)> = binned
            .into_iter()
            .filter(|&(p, _)| p > 0.0)
            .map(|(p, pe)| (pe / p, p))
            .collect();
        normalise(&mut points);
        (Some(points), false)
    }

    /// Exact log Z = ln sum_x exp(-E(x)).
    pub fn log_z(&self) -> f64 {
        self.log_z
    }

    /// Probability that a target set holds c copies of level `level`, for
    /// c = 0..=m.
    pub fn marginal(&self, level: usize) -> &[f64] {
        &self.marginals[level]
    }

    /// Target distribution of E(x) as sorted `(energy, probability)` points;
    /// `None` when the task is too large to enumerate (never for the presets).
    pub fn energy_distribution(&self) -> Option<&[(f64, f64)]> {
        self.energy_points.as_deref()
    }

    /// Whether [`SetReference::energy_distribution`] is exact rather than binned.
    pub fn energy_distribution_is_exact(&self) -> bool {
        self.energy_exact
    }

    /// Mean and standard deviation of E(x) under the target (exact).
    pub fn target_energy_mean_std(&self) -> (f64, f64) {
        (self.energy_mean, self.energy_std)
    }

    /// Largest reward over all sets: exp(-E) of the |S| lowest energies.
    pub fn max_reward(&self) -> f64 {
        (-extreme_energy(&self.levels, self.copies, self.set_size, true)).exp()
    }

    /// Mean reward of the `k` best distinct sets (all sets if there are fewer
    /// than `k`); NaN for `k == 0`. Exact, by branch and bound over
    /// compositions with their multiplicities prod_j C(m, c_j).
    pub fn top_k_mean_reward(&self, k: usize) -> f64 {
        if k == 0 {
            return f64::NAN;
        }
        let mut sorted = self.levels.clone();
        sorted.sort_by(f64::total_cmp);
        let log_choose = log_choose_table(self.copies);
        let mut search = TopKSearch {
            levels: &sorted,
            log_choose: &log_choose,
            copies: self.copies,
            k: k as f64,
            kept: BinaryHeap::new(),
            kept_sets: 0.0,
        };
        search.visit(0, self.set_size, 0.0, 0.0);
        // Ascending energy: the best sets are taken first.
        let kept = search.kept.into_sorted_vec();
        let (mut left, mut taken, mut total) = (k as f64, 0.0, 0.0);
        for candidate in kept {
            let take = candidate.multiplicity.min(left);
            total += take * (-candidate.energy).exp();
            taken += take;
            left -= take;
        }
        total / taken
    }

    /// Mean over levels of the total variation between the sampled and
    /// target distributions of how many copies of the level a set holds.
    /// States of the wrong length are ignored; `None` if none remain.
    pub fn marginal_tv(&self, terminal_states: &[State]) -> Option<f64> {
        let n_levels = self.levels.len();
        let universe = n_levels * self.copies;
        let mut histograms = vec![vec![0usize; self.copies + 1]; n_levels];
        let mut used = 0usize;
        let mut counts = vec![0usize; n_levels];
        for state in terminal_states.iter().filter(|s| s.len() == universe) {
            counts.iter_mut().for_each(|c| *c = 0);
            for (u, &v) in state.iter().enumerate() {
                if v != 0 {
                    counts[u % n_levels] += 1;
                }
            }
            for (histogram, &c) in histograms.iter_mut().zip(&counts) {
                histogram[c] += 1;
            }
            used += 1;
        }
        if used == 0 {
            return None;
        }
        let n = used as f64;
        let total: f64 = histograms
            .iter()
            .zip(&self.marginals)
            .map(|(histogram, marginal)| {
                0.5 * histogram
                    .iter()
                    .zip(marginal)
                    .map(|(&h, &p)| (h as f64 / n - p).abs())
                    .sum::<f64>()
            })
            .sum();
        Some(total / n_levels as f64)
    }

    /// 1-Wasserstein distance between the empirical distribution of
    /// `energies` and the target energy distribution. `None` for an empty
    /// sample or when the target energy distribution is unavailable;
    /// infinite if any energy is not finite.
    pub fn energy_w1(&self, energies: &[f64]) -> Option<f64> {
        let target = self.energy_points.as_deref()?;
        if energies.is_empty() {
            return None;
        }
        if energies.iter().any(|e| !e.is_finite()) {
            return Some(f64::INFINITY);
        }
        let mut sample = energies.to_vec();
        sample.sort_by(f64::total_cmp);
        Some(wasserstein1(&sample, target))
    }
}

fn normalise(points: &mut [(f64, f64)]) {
    let total: f64 = points.iter().map(|p| p.1).sum();
    points.iter_mut().for_each(|p| p.1 /= total);
}

/// Integral of |F_sample - F_target| over the line, for a sorted sample and
/// sorted target points, by one merge over both sets of breakpoints.
fn wasserstein1(sample: &[f64], target: &[(f64, f64)]) -> f64 {
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

impl TaskReference for SetReference {
    fn log_z(&self) -> f64 {
        self.log_z
    }

    fn score(&self, terminal_states: &[State], energies: &[f64]) -> DistributionScores {
        DistributionScores {
            marginal_tv: self.marginal_tv(terminal_states),
            energy_w1: self.energy_w1(energies),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            let take = k.min(energies.len());
            let expected = energies[..take].iter().map(|e| (-e).exp()).sum::<f64>() / take as f64;
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
            binned.energy_distribution().unwrap().len()
                < exact.energy_distribution().unwrap().len()
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
        assert_eq!(reference.energy_w1(&[f64::NAN]), Some(f64::INFINITY));
        assert_eq!(reference.marginal_tv(&[vec![1, 0]]), None);
        // Integral of |F_sample - F_target|, hand-checked on two points.
        let d = wasserstein1(&[0.0, 2.0], &[(1.0, 1.0)]);
        assert!((d - 1.0).abs() < 1e-15);
        let d = wasserstein1(&[1.0, 1.0], &[(0.0, 0.5), (1.0, 0.25), (3.0, 0.25)]);
        assert!((d - (0.5 + 0.5)).abs() < 1e-15);
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
}
