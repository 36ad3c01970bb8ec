//! The tasks, one module each (a file, or a folder when the task carries an
//! exact reference), and the one place that maps a configuration to an
//! [`Environment`]. Adding a task: write its module, add a variant to
//! [`TaskConfig`] and a line to [`build`].

pub mod lattice;
pub mod set_generation;

use std::sync::Arc;

use crate::config::{ConfigError, TaskConfig};
use crate::env::Environment;

/// Builds the environment a configuration describes, validating its
/// parameters.
pub fn build(config: &TaskConfig) -> Result<Arc<dyn Environment>, ConfigError> {
    Ok(match config {
        TaskConfig::SetGeneration(c) => Arc::new(set_generation::SetGeneration::new(c)?),
        TaskConfig::Lattice(c) => Arc::new(lattice::Lattice::new(c)?),
    })
}
