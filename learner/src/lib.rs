//! The flgfn learner: grants credits to actors, receives their
//! trajectories over gRPC, trains the policy with the configured
//! objective, and sends weights to actors about to use them.
//!
//! # Layout
//!
//! - `run/`: a run from its configuration to its end ([`serve`]): loaded
//!   (the gRPC server, the checkpoint), started (the credit controller,
//!   the batcher and trainer threads, local actors, the live progress
//!   line), ended (the drain and the summary).
//! - `preflight.rs`: checks before serving (the run fits its messages and
//!   memory, a token where the learner is exposed, local actors fit).
//! - `transport.rs`: TLS, the token check, the HTTP/2 settings, the
//!   largest messages and handshakes accepted.
//! - [`connections`]: the listener's cap on open TCP connections.
//! - [`service`]: the `flgfn.v1.Learner` gRPC service (handshake, and a
//!   session per actor).
//! - [`session`]: one actor's session: credits and weights out, chunks in.
//! - [`credits`]: the credit pool and the task that grants from it: how
//!   production follows consumption and lag stays bounded.
//! - [`ingest`]: validation and replay of incoming chunks, and the counters.
//! - [`batcher`]: the thread that builds the next batch (stale data is
//!   dropped here) while the trainer runs the current step.
//! - [`trainer`]: the thread that owns the model and optimizer.
//! - [`parameters`]: the trainer's parameters and gradients in one flat
//!   buffer each, so per-parameter work is one libtorch call per step.
//! - [`adam`]: Adam with its state in our hands (checkpoints save it).
//! - [`checkpoint`]: atomic, checksummed checkpoints; resume picks the
//!   newest intact one.
//! - [`durable_file`]: files written whole or not at all, and synced
//!   (checkpoints, the run's summary, an experiment's tables).
//! - [`resume`]: a run taking up its checkpoint folder: the lock, the
//!   checks that a checkpoint is this run's, the versions continued.
//! - [`publisher`]: weight versions as device-side copies, serialised once,
//!   lazily, when an actor needs them.
//! - [`evaluator`]: fresh on-policy samples scored against the exact target.
//! - [`quality_probes`]: weights kept between two reports, so that time to
//!   quality is found at a finer grain than the reports.
//! - [`report`]: tracing lines and JSON-lines metrics.
//! - [`error`]: errors, and their one conversion to gRPC statuses.
//! - [`launcher`]: `--local-actors`, actor processes next to the learner.
//! - [`delay_proxy`]: a TCP proxy that delays each direction, for tests and
//!   benchmarks of the learner behind a slow network.
//! - [`experiment`]: `flgfn-experiment`'s suites of runs, their tables and
//!   plots.
//!
//! Data path: credits -> session (grant, weights) -> actor -> session
//! (validate, replay) -> queue -> batcher -> trainer -> publisher.
//! [`serve`] wires it up.

pub mod adam;
pub mod batcher;
pub mod checkpoint;
pub mod connections;
pub mod credits;
pub mod delay_proxy;
pub mod durable_file;
pub mod error;
pub mod evaluator;
pub mod experiment;
pub mod ingest;
pub mod launcher;
pub mod parameters;
pub mod publisher;
pub mod quality_probes;
pub mod report;
pub mod resume;
pub mod service;
pub mod session;
pub mod trainer;

mod preflight;
mod run;
mod transport;

use std::path::PathBuf;

pub use crate::error::LearnerError;
pub use crate::preflight::{check_listen_exposure, check_startup};
pub use crate::run::serve;
pub use crate::trainer::{EndedBy, RunTotals, TrainingOutcome};
pub use crate::transport::{
    HEALTH_REQUEST_BYTES, MAX_LOCAL_ERROR_RESETS, MAX_STREAMS_PER_CONNECTION, secured_transport,
};
pub use flgfn_common::signals::StopRequest;

/// What this learner is built from: its version and commit, with
/// ", modified" when the code differs from the commit (see
/// `common/build_support/provenance.rs`). Logged at start, shown by
/// `--version`, kept in checkpoints and final weights.
pub const BUILD: &str = env!("FLGFN_BUILD");
/// The weights' metadata key holding the [`BUILD`] that published them.
pub const BUILD_METADATA_KEY: &str = "flgfn_build";

/// Settings that are not part of the shared configuration file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// JSON-lines metrics file, one object per report (appended to when
    /// the run resumes from a checkpoint).
    pub metrics_path: Option<PathBuf>,
    /// Delete the checkpoints in `learner.checkpoint_dir` and start over
    /// instead of resuming.
    pub fresh: bool,
    /// Resume even where the checkpoint was trained with another seed,
    /// objective settings, learning rate or batch size (refused otherwise:
    /// most likely another run's folder); never with another objective
    /// name or backward policy.
    pub resume_changed: bool,
    /// Actor processes to start on this machine (`--local-actors`), once
    /// the learner listens and has something to train; waited for (or
    /// killed after a grace period) before [`serve`] returns.
    pub local_actors: Option<launcher::LocalActorsPlan>,
}
