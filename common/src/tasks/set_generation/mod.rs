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

use crate::config::ConfigError;
use crate::env::{Environment, InvalidAction, State, TaskReference, TaskSpec};

mod reference;
#[cfg(test)]
mod tests;

pub use reference::SetReference;

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
    /// As written in `task.size`.
    pub fn name(self) -> &'static str {
        match self {
            SetSize::Small => "small",
            SetSize::Medium => "medium",
            SetSize::Large => "large",
        }
    }

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

fn member_count(state: &State) -> usize {
    state.iter().filter(|&&v| v != 0).count()
}

impl SetGeneration {
    /// Registered task name.
    pub const NAME: &'static str = "set_generation";

    /// Builds the task from its configuration: the preset, then overrides.
    /// A refused value that came from the preset says so: a user who set
    /// only `universe = 10` must not be left wondering where the set size
    /// 20 they are told of came from.
    pub fn new(config: &SetGenerationConfig) -> Result<Self, ConfigError> {
        let (universe, set_size, levels) = config.size.preset();
        Self::from_parts(
            config.universe.unwrap_or(universe),
            config.set_size.unwrap_or(set_size),
            config.levels.clone().unwrap_or_else(|| levels.to_vec()),
        )
        .map_err(|error| match error {
            ConfigError::Invalid {
                field,
                reason,
                partner,
            } => {
                let preset = match field.as_str() {
                    "task.universe" if config.universe.is_none() => Some(("universe", universe)),
                    "task.set_size" if config.set_size.is_none() => Some(("set_size", set_size)),
                    _ => None,
                };
                let reason = match preset {
                    Some((key, value)) => format!(
                        "{reason} (task.size = \"{}\" sets {key} = {value}: set task.{key} too)",
                        config.size.name()
                    ),
                    None => reason,
                };
                ConfigError::Invalid {
                    field,
                    reason,
                    partner,
                }
            }
            other => other,
        })
    }

    /// Builds the task from explicit parameters, validating them.
    pub fn from_parts(
        universe: usize,
        set_size: usize,
        levels: Vec<f64>,
    ) -> Result<Self, ConfigError> {
        if levels.is_empty() {
            return Err(ConfigError::invalid(
                "task.levels",
                "needs at least one energy level",
            ));
        }
        if let Some(bad) = levels.iter().find(|l| !l.is_finite()) {
            return Err(ConfigError::invalid(
                "task.levels",
                format!("every level must be finite, got {bad}"),
            ));
        }
        // A level is the energy term of adding an element of it: the
        // learner refuses terms beyond this, so nothing would ever train.
        let limit = f64::from(crate::trajectory::MAX_ABS_ENERGY);
        if let Some(bad) = levels.iter().find(|l| l.abs() > limit) {
            return Err(ConfigError::invalid(
                "task.levels",
                format!(
                    "every level must be within [-{limit}, {limit}] (the energy terms the learner accepts), got {bad}"
                ),
            ));
        }
        if universe == 0 {
            return Err(ConfigError::invalid("task.universe", "must be positive"));
        }
        if universe > MAX_UNIVERSE {
            return Err(ConfigError::invalid(
                "task.universe",
                format!("{universe} exceeds the limit of {MAX_UNIVERSE}"),
            ));
        }
        if !universe.is_multiple_of(levels.len()) {
            return Err(ConfigError::invalid(
                "task.universe",
                format!(
                    "{universe} is not a multiple of the number of levels ({}): each level must repeat equally often",
                    levels.len()
                ),
            ));
        }
        if set_size == 0 || set_size > universe {
            return Err(ConfigError::invalid(
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
