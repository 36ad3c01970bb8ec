//! Shared pieces of flgfn, a distributed trainer for forward-looking
//! GFlowNets: actors sample trajectories and their local energy terms, a
//! libtorch learner trains on them (FL-DB by default; FL-SubTB, DB, SubTB
//! and TB too) and sends weights back.
//!
//! # Layout
//!
//! - [`env`](mod@env): the [`Environment`](env::Environment) trait every task
//!   implements (encoding, masks, step, local energy, terminal test).
//! - [`tasks`]: the tasks, one module each, and the registration that maps a
//!   configuration to an environment.
//! - [`trajectory`]: trajectories as sent (actions + energy terms) and as
//!   replayed and validated by the learner.
//! - [`rollout`]: lockstep sampling of many environments with a policy.
//! - [`policy`]: the MLP with P_F, P_B and log F~ heads; weights as bytes.
//! - [`objectives`]: the losses behind the
//!   [`Objective`](objectives::Objective) trait, and the tensor batch they
//!   read.
//! - [`exact`]: exact target distributions, optimal flows and policy
//!   distributions of tasks small enough to enumerate.
//! - [`config`]: the one TOML schema of every binary, with its defaults.
//! - [`auth`]: the shared bearer token (file or `FLGFN_TOKEN`) and the
//!   TLS / mutual-TLS files; `key_usage` reads the purposes a
//!   certificate is made for.
//! - [`weights`]: weights as safetensors bytes (f32 or bf16).
//! - [`wire`]: generated gRPC code from `proto/` and its conversions.
//! - [`telemetry`]: tracing setup, the binaries' exit status, console
//!   output that survives a closed stdout ([`outln!`]), and what
//!   a panic said.
//! - [`signals`]: SIGINT / SIGTERM (and a parent's death) as a
//!   graceful-stop future; a learner's SIGUSR1 as a stop for a restart.

pub mod auth;
pub mod config;
pub mod env;
pub mod exact;
mod key_usage;
pub mod objectives;
pub mod policy;
pub mod rollout;
pub mod signals;
pub mod tasks;
pub mod telemetry;
pub mod trajectory;
pub mod weights;
pub mod wire;
