//! The exact target of the set-generation task, for evaluation: log Z, the
//! per-level marginals, the energy distribution and the best rewards, all
//! computed over compositions (how many copies of each level a set holds)
//! rather than over the astronomically many sets themselves.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{SetGeneration, SetSize};
use crate::env::{DistributionScores, Quality, State, TaskReference};
use crate::exact::log_sum_exp;

/// Above this many compositions the target energy distribution is binned
/// rather than kept point by point (small has 44,803; medium and large have
/// millions, too many to store).
const EXACT_COMPOSITIONS: f64 = 2.0e6;

/// paper-notes' energy W1 threshold on the small preset.
const SMALL_ENERGY_W1_THRESHOLD: f64 = 0.1;

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
pub(super) fn level_log_weights(levels: &[f64], copies: usize) -> Vec<Vec<f64>> {
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
pub(super) fn suffix_log_partition(weights: &[Vec<f64>], max_count: usize) -> Vec<Vec<f64>> {
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
/// distribution, hence no energy W1, and their quality is judged on
/// marginal TV and log Z alone (a threshold on a metric never computed
/// would leave them "not at quality" for ever).
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

    pub(super) fn build(task: &SetGeneration, exact_compositions: f64) -> Self {
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

    /// The energy W1 that counts as quality: 0.083 x the target energy's
    /// standard deviation, except on the small preset, where the notes set
    /// 0.1 itself (0.083 x 1.2063 is 0.10012: a W1 just above 0.1 would
    /// pass here and not there).
    pub fn energy_w1_threshold(&self) -> f64 {
        let (universe, set_size, levels) = SetSize::Small.preset();
        // Its levels in any order: the same task.
        let sorted = |levels: &[f64]| {
            let mut sorted = levels.to_vec();
            sorted.sort_by(f64::total_cmp);
            sorted
        };
        let small = self.set_size == set_size
            && self.copies * self.levels.len() == universe
            && sorted(&self.levels) == sorted(levels);
        if small {
            SMALL_ENERGY_W1_THRESHOLD
        } else {
            0.083 * self.energy_std
        }
    }

    /// Largest reward over all sets: exp(-E) of the |S| lowest energies.
    pub fn max_reward(&self) -> f64 {
        (-extreme_energy(&self.levels, self.copies, self.set_size, true)).exp()
    }

    /// Mean reward of the `k` best distinct sets, a missing one counting 0
    /// where there are fewer than `k` (as the sampled top-k metric counts
    /// them); NaN for `k == 0`. Exact, by branch and bound over
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
        let (mut left, mut total) = (k as f64, 0.0);
        for candidate in kept {
            let take = candidate.multiplicity.min(left);
            total += take * (-candidate.energy).exp();
            left -= take;
        }
        total / k as f64
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
    /// saturated if any energy is not finite ([`crate::exact::energy_w1`]).
    pub fn energy_w1(&self, energies: &[f64]) -> Option<f64> {
        crate::exact::energy_w1(energies, self.energy_points.as_deref()?)
    }
}

fn normalise(points: &mut [(f64, f64)]) {
    let total: f64 = points.iter().map(|p| p.1).sum();
    points.iter_mut().for_each(|p| p.1 /= total);
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

    fn best_mean_reward(&self, k: usize) -> Option<f64> {
        Some(self.top_k_mean_reward(k))
    }

    /// paper-notes: marginal TV <= 0.03, energy W1 <= 0.083 x the target
    /// energy's standard deviation (0.1 on small), |log Z error| <= 0.3.
    fn quality(&self) -> Quality {
        Quality {
            marginal_tv: Some(0.03),
            energy_w1: self
                .energy_distribution()
                .map(|_| self.energy_w1_threshold()),
            exact_tv: None,
            log_z_error: 0.3,
        }
    }
}
