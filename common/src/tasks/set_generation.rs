//! TEMPORARY STUB (being written by a helper).
#![allow(missing_docs)]
use crate::config::ConfigError;
use crate::env::*;
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SetGenerationConfig { #[serde(default)] pub size: SetSize, #[serde(default)] pub universe: Option<usize>, #[serde(default)] pub set_size: Option<usize>, #[serde(default)] pub levels: Option<Vec<f64>> }
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetSize { #[default] Small, Medium, Large }
#[derive(Debug)]
pub struct SetGeneration;
impl SetGeneration { pub fn new(_c: &SetGenerationConfig) -> Result<Self, ConfigError> { todo!() } }
impl Environment for SetGeneration {
 fn spec(&self) -> TaskSpec { todo!() } fn state_dim(&self) -> usize { todo!() } fn forward_actions(&self) -> usize { todo!() }
 fn backward_actions(&self) -> usize { todo!() } fn max_trajectory_len(&self) -> usize { todo!() } fn initial_state(&self) -> State { todo!() }
 fn encode(&self, _: &State, _: &mut [f32]) { todo!() } fn forward_mask(&self, _: &State, _: &mut [bool]) { todo!() }
 fn backward_mask(&self, _: &State, _: &mut [bool]) { todo!() } fn is_terminal(&self, _: &State) -> bool { todo!() }
 fn step(&self, _: &mut State, _: usize) -> Result<usize, InvalidAction> { todo!() }
 fn transition_energy(&self, _: &State, _: usize) -> f64 { todo!() } fn energy(&self, _: &State) -> f64 { todo!() }
}
