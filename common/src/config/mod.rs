//! One configuration schema for every flgfn binary.
//!
//! A single TOML file is read by the learner, the actors and the local
//! launcher. Every default lives in this file (in the `Default` impls), so a
//! file only names what it changes; unknown keys are errors that name the
//! key, so a typo never silently falls back to a default.
//!
//! Layers, each overriding the one before: the defaults, the file
//! (`--config FILE` or `FLGFN_CONFIG`), environment variables named
//! `FLGFN_<SECTION>__<KEY>` (`FLGFN_LEARNER__LISTEN=0.0.0.0:50051`,
//! `FLGFN_ACTOR__ENVS=32`; `FLGFN_SEED` for the one top-level key; see
//! [`env_overrides`]), then command-line flags. `--print-config` prints
//! the result and the layers it came from.
//!
//! # Layout
//!
//! - `mod.rs`: the schema (one struct per section, with its defaults) and
//!   the entry points that load it (`Config::load`, `from_file`,
//!   `parse_toml`, ...).
//! - `layers.rs`: the `FLGFN_` variables as a layer over the file, the
//!   misspelt ones warned about, and which layer an error is blamed on.
//! - `diagnostics.rs`: a refused file's error on one line, with the key
//!   or name meant and a hint where the parser's message says too little.
//! - `validation.rs`: every range and combination the schema cannot
//!   express, checked once all the layers are applied.
//! - `tests.rs`: the tests of all of these, the README's configuration
//!   block among them.

mod diagnostics;
mod layers;
mod validation;

pub use layers::{
    ENV_PREFIX, ENV_SEPARATOR, EnvOverride, blame_layer, describe_layers, env_overrides,
    flgfn_variables, is_flgfn_variable, meant_variable, meant_with_section, misspelt_variables,
    setting_override,
};
pub use validation::{
    MAX_BATCH_TRANSITIONS, MAX_EVAL_SAMPLES, MAX_IN_FLIGHT_BATCHES, MAX_THREADS, MAX_WAIT_S,
    MIN_IDLE_CONNECTION_S, MIN_KEEPALIVE_S, MIN_RECONNECT_S, MIN_STALL_TIMEOUT_S, host_and_port,
    is_port,
};

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::env::Environment;
use crate::tasks::lattice::LatticeConfig;
use crate::tasks::set_generation::SetGenerationConfig;
use crate::trajectory::ReplayedTrajectory;
pub use crate::weights::WeightEncoding;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field holds a value the program cannot use.
    #[error("invalid value for `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `learner.learning_rate`.
        field: String,
        /// What is wrong with it.
        reason: String,
        /// The other key of a pair refused together (`first_report_s`
        /// above `report_every_s`): where no layer set `field`, the one
        /// that set this is blamed ([`blame_layer`]).
        partner: Option<String>,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file read.
        path: String,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Io {
        /// The file read.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
            partner: None,
        }
    }

    /// [`ConfigError::invalid`] for `field` refused with `partner`: the
    /// user may have set either.
    pub fn invalid_pair(field: &str, partner: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
            partner: Some(partner.to_owned()),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base seed. The learner's initial weights and evaluation samples use
    /// `seed`. An actor's action draws mix `seed` with its learner-assigned
    /// id and fresh OS entropy, so actors differ by default; with
    /// `--seed-offset` they use `seed + 1 + offset` alone (reproduction,
    /// on the same kind of device: CUDA draws other weights than CPU).
    pub seed: u64,
    /// Which environment to learn.
    pub task: TaskConfig,
    /// Shape of the policy network.
    pub model: ModelConfig,
    /// Which loss the learner applies.
    pub objective: ObjectiveConfig,
    /// Learner process settings.
    pub learner: LearnerConfig,
    /// Actor process settings.
    pub actor: ActorConfig,
    /// The local launcher (`flgfn-learner --local-actors`).
    pub launch: LaunchConfig,
    /// The shared bearer token.
    pub auth: crate::auth::AuthConfig,
    /// TLS and mutual TLS.
    pub tls: crate::auth::TlsConfig,
}

/// The task, tagged by its registered name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum TaskConfig {
    /// The paper's set-generation benchmark.
    SetGeneration(SetGenerationConfig),
    /// Spins on an L x L lattice with interacting energies.
    Lattice(LatticeConfig),
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig::SetGeneration(SetGenerationConfig::default())
    }
}

impl TaskConfig {
    /// Every task, with its defaults.
    pub fn every_task() -> Vec<TaskConfig> {
        let every = vec![
            TaskConfig::SetGeneration(SetGenerationConfig::default()),
            TaskConfig::Lattice(LatticeConfig::default()),
        ];
        // A new task must be listed above: this match stops compiling
        // until it is handled, as a reminder.
        for task in &every {
            match task {
                TaskConfig::SetGeneration(_) | TaskConfig::Lattice(_) => {}
            }
        }
        every
    }

    /// The name that selects this task in `[task]`.
    pub fn name(&self) -> String {
        toml::Value::try_from(self)
            .ok()
            .and_then(|task| task.get("name")?.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Hidden layers of the MLP; the heads' sizes come from the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Widths of the hidden layers (LeakyReLU between them).
    pub hidden: Vec<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        // The paper's reference network.
        ModelConfig {
            hidden: vec![256, 256],
        }
    }
}

/// The training objective and its own parameters, under `[objective]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    /// Which loss.
    pub name: ObjectiveName,
    /// P_B learned by its head, or uniform over a state's parents (the
    /// P_B head is then unused).
    pub backward_policy: BackwardPolicy,
    /// Sub-trajectory weight of `sub_tb` and `fl_sub_tb`: the pair (i, j)
    /// of a trajectory counts lambda^(j - i), normalised per trajectory.
    /// Near 0 it approaches DB, large values favour whole trajectories.
    pub lambda: f64,
    /// Adam learning rate of TB's learned log Z, which moves much further
    /// than any weight (log Z is 11.9 on the small set task). Scaled by the
    /// same schedule as `learner.learning_rate`.
    pub log_z_learning_rate: f64,
    /// The learner drops truncated prefixes, whatever the objective
    /// (counted as `unusable_truncated_transitions`, as TB's always are):
    /// DB and SubTB as the paper runs them, which cannot use a prefix,
    /// where by default they train on its flow consistency; for the
    /// forward-looking objectives, an ablation.
    pub drop_truncated: bool,
}

impl ObjectiveConfig {
    /// Whether the learner trains on truncated prefixes (else it drops
    /// them, counted as `unusable_truncated_transitions`): the objective
    /// can and `drop_truncated` does not say otherwise. A prefix carries no
    /// constraint for TB, which needs the terminal reward; DB and SubTB use
    /// its flow consistency but, unlike the FL variants, learn nothing of
    /// the reward from it. One answer for the learner and for validation.
    pub fn trains_on_truncated(&self) -> bool {
        self.name != ObjectiveName::Tb && !self.drop_truncated
    }
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            name: ObjectiveName::FlDb,
            backward_policy: BackwardPolicy::Learned,
            lambda: 0.9,
            log_z_learning_rate: 0.1,
            drop_truncated: false,
        }
    }
}

/// The losses flgfn implements (`../shared/paper-notes.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveName {
    /// Forward-looking detailed balance: one residual per transition, so
    /// truncated trajectories train too.
    #[default]
    FlDb,
    /// Forward-looking sub-trajectory balance, lambda-weighted over every
    /// sub-trajectory; trains on truncated trajectories too.
    FlSubTb,
    /// Detailed balance with the reward only at terminal states.
    Db,
    /// Sub-trajectory balance, lambda-weighted.
    SubTb,
    /// Trajectory balance with a learned log Z; complete trajectories only.
    Tb,
}

/// How P_B is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackwardPolicy {
    /// Learned by the network's P_B head.
    #[default]
    Learned,
    /// Uniform over the valid backward actions.
    Uniform,
}

/// Where a process computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceConfig {
    /// CUDA when `tch::Cuda::is_available()`, CPU otherwise.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// CUDA device 0; an error when there is none.
    Cuda,
}

/// When the learner's batches grow; see [`LearnerConfig::batch_growth`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchGrowth {
    /// Supply on CUDA, lag on the CPU.
    #[default]
    Auto,
    /// Only as much as bounds the lag of the data in flight.
    Lag,
    /// Also with fresh data already waiting, up to the largest batch.
    Supply,
}

/// Learner settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerConfig {
    /// Address the gRPC server binds.
    pub listen: String,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// With `max_steps` set, the learning rate stays at `learning_rate` for
    /// the first half of the run, then decays linearly, reaching this
    /// fraction of it at `max_steps` (1: constant).
    pub final_learning_rate_fraction: f64,
    /// Smallest batch: the trainer takes chunks until it holds at least
    /// this many transitions before it steps, and of a larger chunk only
    /// the trajectories that reach it (the rest trains at the next steps).
    pub batch_transitions: usize,
    /// Largest batch (at most 2^20) that growth past `batch_transitions`
    /// reaches, as `batch_growth` says. A batch holds whole trajectories,
    /// so reaching the smallest batch may pass this by less than one, and
    /// data that would be too old to train by the next step joins even
    /// beyond it (it would be dropped otherwise).
    pub max_batch_transitions: usize,
    /// When a batch grows past `batch_transitions`: "lag" (only as much as
    /// keeps the data in flight within `max_in_flight_batches` steps, i.e.
    /// behind a slow network), "supply" (also takes every fresh chunk
    /// already waiting, or the part that fits: more actors mean bigger
    /// steps; best where a step costs about the same whatever its size, as
    /// on a GPU), or "auto"
    /// (supply on CUDA, lag on the CPU, where a step's time grows with its
    /// size and smaller steps learn more per second).
    pub batch_growth: BatchGrowth,
    /// Publish new weights every this many training steps. With
    /// `weights_refresh_steps`, at most `max_policy_lag` (older data is
    /// dropped, and training would stall).
    pub publish_every: u64,
    /// Data sampled more than this many training steps before the step
    /// that would train it (versions are step numbers) is never trained on:
    /// it is dropped where the batch is built, and counted. GFlowNet losses
    /// are off-policy, so stale data is valid; the bound keeps a slow actor
    /// from training the model on a long-gone policy. Credits keep lag well
    /// below it (see `max_in_flight_batches`).
    pub max_policy_lag: u64,
    /// Most data granted to actors and not yet trained on, in batches (at
    /// most `max_policy_lag`; see [`LearnerConfig::lag_bound_warning`]).
    /// The learner grants credits, each for one chunk, only while there is
    /// room. The room adapts between one
    /// `batch_transitions` and this many `max_batch_transitions`, growing
    /// while the trainer would wait for data and shrinking while data waits
    /// for the trainer; the batch grows with the data in flight (in flight /
    /// this, within the batch bounds). So what is granted is trained within
    /// about this many steps at any network latency: behind a slow link the
    /// lag grows up to about this many steps, then the batches grow. (On the
    /// CPU, where a step's time grows with its size, a small batch with some
    /// lag learns faster per second than a big one. 25 ms from the learner,
    /// 2 actors, median time to quality over alternating runs: 12 (lag 11,
    /// batches ~1,100) 1.2 s against 0.95 s at 24; 24 (lag 19, batches
    /// ~600) 0.97 s against 0.82 s at 32 (lag 24, batches ~450, with
    /// `max_policy_lag` 48); 32 0.82 s against 0.72 s at 48 (lag 29, batches
    /// ~340, `max_policy_lag` 64). Loopback: 0.55 s at 24 and 48 alike.)
    pub max_in_flight_batches: u64,
    /// An actor gets new weights with a credit only when its own are at
    /// least this many versions old (1: always the newest). Raising it
    /// trades a little policy lag for fewer weight bytes.
    pub weights_refresh_steps: u64,
    /// How weights travel to actors: "bf16" (half the bytes; rounding
    /// moves the sampler's exact distribution far less than training noise
    /// does) or "f32" (exact). Checkpoints and the final weights are f32
    /// either way.
    pub weight_encoding: WeightEncoding,
    /// libtorch intra-op threads for the trainer.
    pub threads: usize,
    /// Tokio worker threads serving gRPC (handshakes, grants, weights,
    /// health).
    pub async_threads: usize,
    /// Threads that validate and replay incoming chunks, off the async
    /// workers, so a flood of data never starves weights or health checks.
    pub ingest_threads: usize,
    /// Where the trainer computes.
    pub device: DeviceConfig,
    /// Stop after this many training steps (0: run until interrupted).
    pub max_steps: u64,
    /// Exit status of a learner stopped (SIGINT, SIGTERM, SIGUSR1) before
    /// `max_steps`, its run unfinished: 0, or 3 to 125 (1 and 2 say an
    /// error). A job system that takes an exit 0 as the work done needs
    /// another: a Kubernetes Job counts a deleted or drained pod whose
    /// learner exits 0 as complete, and restarts one that exits otherwise
    /// (the `job` overlay sets 75, EX_TEMPFAIL). With `max_steps` 0 every
    /// stop is one.
    pub unfinished_exit_status: u8,
    /// What SIGTERM asks: "end_run" (the actors are told that training is
    /// over, and exit) or "restart" (as SIGUSR1: they are told to
    /// reconnect, and wait for the learner started again). "restart" where
    /// whatever sends SIGTERM starts the learner again on its checkpoint:
    /// a Kubernetes StatefulSet or Job, whose SIGTERM means that the pod
    /// moves (a drained node, a new image), not that the run is over.
    /// Ctrl-C always ends the run.
    pub sigterm: crate::signals::StopRequest,
    /// Fresh on-policy samples per evaluation (held until scored: the
    /// learner refuses at start more than 4 GiB of them for its task). The
    /// quality thresholds are set for 4,096: other values change when a
    /// run counts as at quality (the learner warns).
    pub eval_samples: usize,
    /// Seconds of training before the first progress report (each report
    /// evaluates the policy). Each later gap is a quarter of the training
    /// time so far, kept between this and `report_every_s`: fine-grained
    /// early, when things change fast (and time to quality is measured),
    /// every few seconds in a long run.
    pub first_report_s: f64,
    /// Longest gap between two progress reports, in seconds of training.
    pub report_every_s: f64,
    /// Where checkpoints and the final weights (`final.safetensors`) go;
    /// on start the learner resumes from the newest intact checkpoint here
    /// (`--fresh` starts over). Empty: no checkpoints.
    pub checkpoint_dir: String,
    /// Checkpoint every this many seconds of training (0: never by time).
    pub checkpoint_every_s: f64,
    /// Checkpoint every this many steps (0: never by steps).
    pub checkpoint_every_steps: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// When above 0, report (and evaluate) every this many steps instead,
    /// ignoring `first_report_s` and `report_every_s`: experiments resolve steps and
    /// seconds to a threshold at a fixed grain, and runs stay comparable.
    pub eval_every_steps: u64,
    /// Largest gRPC message, in bytes: weights the learner sends and an
    /// actor takes. The learner decodes less where less will do: the
    /// largest valid chunk of its task (`max_chunk_trajectories`
    /// trajectories at full length), at least 64 KiB for handshakes,
    /// since a message is decoded whole before any field is checked.
    pub max_message_bytes: usize,
    /// Most actor sessions open at once; more are refused with
    /// RESOURCE_EXHAUSTED (each session holds its buffers, the message
    /// being received, and credits from the shared room).
    pub max_sessions: usize,
    /// Most TCP connections open at once (actors, probes, anything that
    /// connects); one beyond takes the place of the oldest on which no
    /// Learner call ever started, or else is closed at once, before it is
    /// read; one that has not sent its HTTP/2 preface (or TLS hello)
    /// within 10 s is closed too. Fewer where the process's open-file limit would run out
    /// first (the learner raises its soft limit to the hard one, keeps 256
    /// files, or a quarter of a smaller limit, for itself and says so in a
    /// warning).
    pub max_connections: usize,
    /// Seconds a connection may stay open with no Learner call in progress
    /// (an actor's session is one call, open while it trains; health
    /// checks and calls refused for their token do not count) before the
    /// learner closes it: an idle client, authenticated or not, must not
    /// keep a place among `max_connections` for ever. (On a connection
    /// where no Learner call has started yet: 10 s, at most this.) A client whose
    /// connection was closed reconnects when it next calls (gRPC channels
    /// do so by themselves).
    pub idle_connection_s: f64,
    /// Most trajectories one chunk may carry. A replayed transition takes
    /// ~40x its wire size and a chunk is held until its last trajectory
    /// trains, so this bounds the memory one message can claim; a message
    /// with more is refused before it is decoded.
    pub max_chunk_trajectories: usize,
    /// Most memory one actor session may hold in chunks, replayed: those
    /// its credits allow and those waiting for the trainer. Credits stop
    /// at it (except while the batch being built could not fill without
    /// one more: then by at most that batch and one chunk, learner-wide),
    /// so an actor that follows the protocol never meets it; an
    /// actor whose single chunk (its declared trajectories per chunk at
    /// full length) would not fit is refused with RESOURCE_EXHAUSTED. Besides
    /// this, a session holds the message being received and its HTTP/2
    /// buffers: a message is decoded whole before its fields are checked,
    /// so one of at most the largest valid chunk's size on the wire may
    /// briefly take up to ~8x that in memory when crafted (1-byte actions
    /// decode to 4 bytes, in a vector whose capacity doubles as it
    /// grows; a chunk of more than `max_chunk_trajectories`
    /// entries, such as one of thousands of empty trajectories, 2 bytes on
    /// the wire and ~100 decoded each, is refused from its tags before it
    /// is decoded).
    pub max_session_bytes: u64,
    /// Seconds an actor may hold credits without sending a chunk, or
    /// leave a grant untaken, before its session is ended (DEADLINE_EXCEEDED)
    /// and its credits go back to the room: a frozen actor or a cut link
    /// must not hold up training for longer. Raise it for rollouts that
    /// take longer than this (a huge chunk on a slow machine).
    pub stall_timeout_s: f64,
    /// Seconds between the learner's HTTP/2 pings on each connection; one
    /// unanswered for twice this closes the connection and ends its
    /// session (logged as a lost connection). It finds a frozen actor or a
    /// cut link whatever `stall_timeout_s` is (an actor busy rolling out
    /// still answers: its pings are served off the rollout thread), and
    /// frees its place and credits; raise it where links drop pings for
    /// longer.
    pub keepalive_s: f64,
    /// Seconds the trainer may spend on one piece of work (a step, a
    /// report with its evaluation, a checkpoint it waits for) before the
    /// health service says NOT_SERVING, so that an orchestrator's
    /// liveness probe restarts a learner stuck in a device call or on a
    /// blocked file system (it resumes from its last checkpoint); 0: never.
    /// Waiting for data is not work: a learner without actors is not stuck.
    pub stuck_after_s: f64,
}

impl LearnerConfig {
    /// The most transitions granted and not yet trained at once, the
    /// credit room's ceiling: `max_batch_transitions` x
    /// `max_in_flight_batches`. A chunk larger could never be granted.
    pub fn credit_ceiling(&self) -> u64 {
        credit_ceiling(
            self.batch_transitions as u64,
            self.max_batch_transitions as u64,
            self.max_in_flight_batches,
        )
    }

    /// Why data could be produced only to be dropped as stale, where it
    /// could: data granted is trained up to about `max_in_flight_batches`
    /// steps later (the batch follows the data in flight, and the room
    /// opens to its ceiling behind a slow link), rolled out with weights
    /// up to `publish_every + weights_refresh_steps` versions older than
    /// the trainer's. (A warning, not an error: on loopback the room stays
    /// near its floor, and fewer weight versions may be worth some drops.)
    pub fn lag_bound_warning(&self) -> Option<String> {
        let aged = self
            .max_in_flight_batches
            .saturating_add(self.publish_every)
            .saturating_add(self.weights_refresh_steps);
        (aged > self.max_policy_lag).then(|| {
            format!(
                "learner.max_in_flight_batches ({}) + publish_every ({}) + weights_refresh_steps ({}) is more than max_policy_lag ({}): where the credit room opens to its ceiling (behind a slow link), data would age past the bound and be dropped as stale; lower one of the three or raise max_policy_lag",
                self.max_in_flight_batches,
                self.publish_every,
                self.weights_refresh_steps,
                self.max_policy_lag
            )
        })
    }
}

impl Default for LearnerConfig {
    fn default() -> Self {
        LearnerConfig {
            listen: "127.0.0.1:50051".to_owned(),
            learning_rate: 3e-3,
            final_learning_rate_fraction: 0.1,
            batch_transitions: 320,
            max_batch_transitions: 2560,
            batch_growth: BatchGrowth::Auto,
            publish_every: 1,
            max_policy_lag: 64,
            max_in_flight_batches: 48,
            weights_refresh_steps: 1,
            weight_encoding: WeightEncoding::Bf16,
            threads: 1,
            async_threads: 2,
            ingest_threads: 2,
            device: DeviceConfig::Auto,
            max_steps: 600,
            unfinished_exit_status: 0,
            sigterm: crate::signals::StopRequest::EndRun,
            eval_samples: 4096,
            first_report_s: 0.25,
            report_every_s: 5.0,
            eval_every_steps: 0,
            checkpoint_dir: "checkpoints".to_owned(),
            checkpoint_every_s: 60.0,
            checkpoint_every_steps: 0,
            keep_checkpoints: 3,
            max_message_bytes: 64 << 20,
            max_chunk_trajectories: 1024,
            max_sessions: 1024,
            max_connections: 4096,
            idle_connection_s: 300.0,
            max_session_bytes: 64 << 20,
            stall_timeout_s: 30.0,
            keepalive_s: 10.0,
            stuck_after_s: 600.0,
        }
    }
}

/// How the length of a truncated prefix is drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TruncateAt {
    /// Uniformly among 1..n-1 transitions.
    #[default]
    Uniform,
    /// Exactly `actor.truncate_cap` transitions (at most n - 1): a cap on
    /// the unroll length.
    Cap,
}

/// Actor settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorConfig {
    /// gRPC endpoint of the learner.
    pub learner: String,
    /// Environments rolled out in lockstep; also trajectories per chunk.
    /// 0 (the default): enough for [`AUTO_CHUNK_TRANSITIONS`] transitions
    /// at full length, between 16 and 256, and at most [`AUTO_CHUNK_BYTES`]
    /// replayed (fewer than 16 where trajectories are that large), and
    /// never more than the `[learner]` limits of the same file accept
    /// ([`Config::envs_for`]):
    /// 256 for the default task, where one thread's rollout throughput
    /// peaks (`cargo bench -p flgfn-actor --bench rollout`: 305k
    /// transitions/s at 16, 423k at 256, ~395k at 512 and 1,024) and each
    /// weight version an actor takes serves 5,120 transitions (~35 bytes
    /// of weights per trained transition in bf16, ~530 at 16 environments).
    /// Fewer for long or wide trajectories, whose chunks would not fit the
    /// learner's per-session memory (a 16x16 lattice: 20). A chunk larger
    /// than a batch trains over several steps, so this does not set the
    /// batch.
    pub envs: usize,
    /// Weight of the uniform distribution over valid actions in the
    /// behaviour policy (1 - eps) P_F + eps U.
    pub epsilon: f64,
    /// Fraction of trajectories cut off before their terminal state; only
    /// the prefix is sent (its length is drawn as `truncate_at` says).
    pub truncate_fraction: f64,
    /// Length of a truncated prefix: "uniform" (1..n-1, uniformly) or
    /// "cap" (`truncate_cap` transitions: an unroll limit).
    pub truncate_at: TruncateAt,
    /// Transitions kept by `truncate_at = "cap"` (at most n - 1).
    pub truncate_cap: usize,
    /// libtorch intra-op threads per actor.
    pub threads: usize,
    /// First reconnect delay after the learner goes away, in seconds.
    pub reconnect_initial_s: f64,
    /// Longest reconnect delay (the delay doubles up to this; each wait is
    /// drawn between half of it and all of it, so a fleet does not return
    /// in lockstep).
    pub reconnect_max_s: f64,
    /// Give up after this many attempts in a row without a working session
    /// (the learner unreachable, full, or cutting sessions short); a
    /// session that the learner answered with a grant after one of its
    /// chunks, or a learner's notice that it stops for a restart, starts
    /// a new count (0: never give up).
    pub reconnect_attempts: u32,
    /// Seconds between HTTP/2 pings to the learner; a connection whose ping
    /// goes unanswered for twice this is dropped and reconnected. Without
    /// it a connection cut silently (a partition, a vanished host) would
    /// hang until TCP gives up, minutes later.
    pub keepalive_s: f64,
    /// Seconds between the actor's `rolling out` log lines (chunks sent in
    /// all and since the last line, the policy version), so that its log
    /// shows it working, or stuck, between connecting and stopping
    /// (0: none).
    pub progress_log_s: f64,
}

/// Transitions per chunk, at full length, that `actor.envs = 0` aims for:
/// enough that a weight version serves thousands of transitions, few
/// enough that a chunk of the default task's trajectories replayed
/// (~3.5 KB each) holds about a megabyte.
pub const AUTO_CHUNK_TRANSITIONS: usize = 5120;

/// Most bytes a chunk replayed at the learner may take with
/// `actor.envs = 0`: a quarter of the default `learner.max_session_bytes`,
/// so that a session holds a few chunks (wide states, such as a set task
/// of thousands of elements, make each trajectory large).
pub const AUTO_CHUNK_BYTES: usize = 16 << 20;

/// The credit room's ceiling: `batches` (at least one) largest batches
/// in flight, a batch of `min_batch` to `max_batch` transitions (at least
/// one; the largest no smaller than the smallest). The learner's pool and
/// the checks made from a configuration alone (an actor's chunk size, a
/// local actor's, before the pool exists) share this one formula.
pub fn credit_ceiling(min_batch: u64, max_batch: u64, batches: u64) -> u64 {
    max_batch
        .max(min_batch.max(1))
        .saturating_mul(batches.max(1))
}

impl Config {
    /// Environments in lockstep (trajectories per chunk) for `env`:
    /// `actor.envs`, or with 0 enough for [`AUTO_CHUNK_TRANSITIONS`] at
    /// full length, between 16 and 256, within [`AUTO_CHUNK_BYTES`]
    /// replayed, and within what a learner started from this file accepts
    /// (it refuses larger chunks at the handshake): at most
    /// `learner.max_chunk_trajectories`, a chunk within its largest credit
    /// room (`max_batch_transitions` x `max_in_flight_batches`), its
    /// decode limit (`max_message_bytes`) and `max_session_bytes`. A
    /// number given is kept as it is: a learner that refuses it says why.
    pub fn envs_for(&self, env: &dyn Environment) -> usize {
        if self.actor.envs != 0 {
            return self.actor.envs;
        }
        let max_len = env.max_trajectory_len().max(1);
        let trajectory_bytes = ReplayedTrajectory::max_held_bytes(env, max_len).max(1);
        let learner = &self.learner;
        let room = learner.credit_ceiling() / max_len as u64;
        let session = learner.max_session_bytes / trajectory_bytes as u64;
        let mut envs = auto_envs(max_len, trajectory_bytes)
            .min(learner.max_chunk_trajectories)
            .min(usize::try_from(room.min(session)).unwrap_or(usize::MAX));
        while envs > 1
            && crate::wire::largest_chunk_bytes(envs, max_len) > learner.max_message_bytes
        {
            envs -= 1;
        }
        envs.max(1)
    }
}

/// `actor.envs = 0` for trajectories of at most `max_len` transitions
/// taking at most `trajectory_bytes` each, replayed.
fn auto_envs(max_len: usize, trajectory_bytes: usize) -> usize {
    let by_transitions = AUTO_CHUNK_TRANSITIONS / max_len.max(1);
    let by_bytes = AUTO_CHUNK_BYTES / trajectory_bytes.max(1);
    // The byte cap wins over the floor of 16: a chunk that does not fit
    // the learner's per-session memory is refused at the handshake.
    by_transitions.clamp(16, 256).min(by_bytes.max(1))
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            learner: "http://127.0.0.1:50051".to_owned(),
            envs: 0,
            epsilon: 0.05,
            truncate_fraction: 0.0,
            truncate_at: TruncateAt::Uniform,
            truncate_cap: 5,
            threads: 1,
            reconnect_initial_s: 0.2,
            reconnect_max_s: 5.0,
            reconnect_attempts: 0,
            keepalive_s: 10.0,
            progress_log_s: 60.0,
        }
    }
}

/// The local launcher: a learner plus actors in one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchConfig {
    /// Actors started next to the learner.
    pub actors: usize,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig { actors: 2 }
    }
}

/// The configuration path that means standard input (`--config -`): how
/// the local launcher hands its actors the learner's effective
/// configuration, flags included, without a file.
pub const STDIN_PATH: &str = "-";

/// The environment variable that names the configuration file (the
/// binaries' `--config`).
pub const CONFIG_VARIABLE: &str = "FLGFN_CONFIG";

/// Every section and key there is, every task's keys among them (the
/// default configuration prints only the default task's, and leaves out
/// unset options): read once, as every `FLGFN_` variable is asked about at
/// start.
fn schema() -> &'static toml::Table {
    static SCHEMA: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let table = |config: &Config| -> toml::Table {
            toml::from_str(&config.to_toml()).unwrap_or_default()
        };
        let mut schema = table(&Config::default());
        let every_task = [
            TaskConfig::Lattice(LatticeConfig::default()),
            TaskConfig::SetGeneration(SetGenerationConfig {
                universe: Some(1),
                set_size: Some(1),
                levels: Some(vec![0.0]),
                ..SetGenerationConfig::default()
            }),
        ];
        for task in every_task {
            let config = Config {
                task,
                ..Config::default()
            };
            if let Some(toml::Value::Table(keys)) = table(&config).remove("task")
                && let Some(toml::Value::Table(known)) = schema.get_mut("task")
            {
                known.extend(keys);
            }
        }
        schema
    })
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_toml(text, origin)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text, unvalidated: for reading a configuration written
    /// by another version (a checkpoint's), whose rules may have been
    /// looser.
    pub fn parse_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::parse(origin.to_owned(), &e, None))?;
        // (The table is edited and consumed below: a refusal reads the
        // text again, and only then.)
        let parse_error = |error| diagnostics::refusal(text, origin, error);
        // Parsed from the text where it can be, so that errors point at
        // their line; a `[task]` without a name needs the table edited.
        if name_default_task(&mut table) {
            table.try_into().map_err(parse_error)
        } else {
            toml::from_str(text).map_err(parse_error)
        }
    }

    /// The file if given (`-`: standard input, read to its end), else the
    /// defaults, with the `FLGFN_` variables of this process's environment
    /// applied; validated.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Self::load_unvalidated(path)?;
        config.validate()?;
        Ok(config)
    }

    /// [`Config::load`] without the validation: for a binary that applies
    /// its flags first, so that a flag can correct a value the file or a
    /// variable got wrong. Call [`Config::validate`] afterwards.
    pub fn load_unvalidated(path: Option<&Path>) -> Result<Self, ConfigError> {
        let variables = flgfn_variables()?;
        // A real section and key joined by one underscore can mean nothing
        // else, and a run without it would go on on the defaults (a job
        // of 600 steps, not the 5 it says): refused. Other near misses
        // are guesses, warned about below.
        if let Some((variable, meant)) = variables
            .iter()
            .find_map(|(name, _)| Some((name, meant_with_section(name)?)))
        {
            return Err(ConfigError::invalid(
                variable,
                format!(
                    "not read: a configuration variable has two underscores between section and key: {meant}"
                ),
            ));
        }
        for (variable, meant) in misspelt_variables(variables.iter().map(|(name, _)| name.clone()))
        {
            tracing::warn!(
                variable,
                "not read: no flgfn program reads this variable (a configuration variable is FLGFN_<SECTION>__<KEY>, two underscores between section and key); meant: {meant}"
            );
        }
        Self::layered(path, &env_overrides(variables))
    }

    /// The file if given, else the defaults, with `overrides` applied;
    /// validated. An override of a key the schema lacks, or of the wrong
    /// type, is an error naming its variable.
    pub fn load_layered(
        path: Option<&Path>,
        overrides: &[EnvOverride],
    ) -> Result<Self, ConfigError> {
        let config = Self::layered(path, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML, every key that has a value (unset task
    /// overrides are left out), for `--print-config`.
    pub fn to_toml(&self) -> String {
        // Plain data with string keys: only an integer above i64::MAX,
        // which TOML cannot hold, could fail. What was read from TOML
        // cannot be one, and validation refuses one from the two flags
        // that could set it (--seed, --max-steps).
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

/// Names the default task in a `[task]` section that names none, so that
/// a file or a variable (`FLGFN_TASK__SET_SIZE=3`) may change one of its
/// keys alone, like any other section's. True if it did.
fn name_default_task(table: &mut toml::Table) -> bool {
    let Some(toml::Value::Table(task)) = table.get_mut("task") else {
        return false;
    };
    if task.contains_key("name") {
        return false;
    }
    let name = TaskConfig::default().name();
    if name.is_empty() {
        return false;
    }
    task.insert("name".to_owned(), toml::Value::String(name));
    true
}

#[cfg(test)]
mod tests;
