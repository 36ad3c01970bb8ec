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

use std::ffi::{OsStr, OsString};
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
    /// [`ConfigError::Parse`] for the parser's `error`, with the key or
    /// name meant where it refused a misspelt one (`did you mean ...?`),
    /// TOML's limit for an integer past it, and `hint` if given. (Read
    /// from the parser's own message, not the quoted line of the file.)
    fn parse(path: String, error: &toml::de::Error, hint: Option<String>) -> Self {
        let meant = did_you_mean(error.message());
        let hints: Vec<String> = [integer_limit(error.message()), hint]
            .into_iter()
            .flatten()
            .collect();
        ConfigError::Parse {
            path,
            message: parse_message(error, meant, &hints),
        }
    }

    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
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
    /// `--seed-offset` they use `seed + 1 + offset` alone (reproduction).
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

/// A section given as something other than one table (`[[learner]]`, a
/// list of tables; `learner = 5`), which the parser reports as a type
/// without saying what was meant: a hint to add to the parse error.
fn misshapen_section(table: &toml::Table) -> Option<(String, String)> {
    let (name, value) = table.iter().find(|(name, value)| {
        schema().get(*name).is_some_and(toml::Value::is_table) && !value.is_table()
    })?;
    let given = if value
        .as_array()
        .is_some_and(|items| !items.is_empty() && items.iter().all(toml::Value::is_table))
    {
        format!("`[[{name}]]` (two pairs of brackets) makes it a list of tables")
    } else {
        format!("here it is the value {value}")
    };
    Some((
        name.clone(),
        format!(
            "(`{name}` is one section: write `[{name}]` with its keys on the lines below; {given})"
        ),
    ))
}

/// The top-level section whose table holds byte `at` of TOML `text`: the
/// last `[name]` or `[[name]]` header before it (its first dotted part),
/// None before any header.
fn section_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at).unwrap_or(text);
    before.lines().rev().find_map(|line| {
        let header = line.trim_start().strip_prefix('[')?;
        let name = header.trim_start_matches('[').split([']', '.']).next()?;
        Some(name.trim().trim_matches('"').to_owned())
    })
}

/// Where the parser's `error` is: its top-level section (None: not known;
/// Some(None): before any header), and its line of `text`. An error from
/// an edited table has no place in the text, only the key it names ("in
/// `learner.threads`"), whose first part is the section.
fn error_place<'t>(
    text: &'t str,
    error: &toml::de::Error,
) -> (Option<Option<String>>, Option<&'t str>) {
    let at = error.span().map(|span| span.start.min(text.len()));
    let section = match at {
        Some(at) => Some(section_at(text, at)),
        None => error.to_string().lines().find_map(|line| {
            let key = line.strip_prefix("in `")?.strip_suffix('`')?;
            Some(Some(key.split('.').next().unwrap_or(key).to_owned()))
        }),
    };
    (section, at.map(|at| line_at(text, at)))
}

/// The error for a `[task]` refused where it is refused, at its key's
/// line, where the parser's `error` had only the section (the task is
/// tagged by its name, and serde reads a tagged value from a buffer that
/// has no places in the text). The text is read again as the named task's
/// own keys, with `name = ...` blanked (the other lines keep their
/// places) where the text still parses so. None where `error` is not in
/// `[task]` or this reading finds nothing more precise.
fn task_key_error(
    text: &str,
    table: &toml::Table,
    error: &toml::de::Error,
) -> Option<toml::de::Error> {
    #[derive(Deserialize)]
    struct TaskOnly<T> {
        #[expect(dead_code, reason = "read for its errors only")]
        task: T,
    }
    fn read_as<T: serde::de::DeserializeOwned>(text: &str) -> Option<toml::de::Error> {
        toml::from_str::<TaskOnly<T>>(text).err()
    }
    let in_task = match error_place(text, error) {
        // The `[task]` header's line itself.
        (_, Some(line)) => {
            line.trim_start().starts_with('[')
                && section_at(line, line.len()).as_deref() == Some("task")
        }
        (section, None) => section.flatten().as_deref() == Some("task"),
    };
    let task = table.get("task")?.as_table()?;
    if !in_task {
        return None;
    }
    let name = match task.get("name") {
        Some(name) => name.as_str()?.to_owned(),
        None => TaskConfig::default().name(),
    };
    // A name whose string spans lines leaves its rest behind: nothing
    // more precise.
    let blanked = blank_task_name(text);
    if toml::from_str::<toml::Table>(&blanked).is_err() {
        return None;
    }
    let precise = TaskConfig::every_task()
        .into_iter()
        .find(|task| task.name() == name)
        .and_then(|task| match task {
            TaskConfig::SetGeneration(_) => read_as::<SetGenerationConfig>(&blanked),
            TaskConfig::Lattice(_) => read_as::<LatticeConfig>(&blanked),
        })?;
    // A `name` that blanking missed (`task.name = ...`, an inline table)
    // is refused as unknown here: nothing more precise either.
    let places_a_key = error_place(text, &precise)
        .1
        .is_some_and(|line| !line.trim_start().starts_with('['));
    (places_a_key && refused_name(precise.message()) != Some("name")).then_some(precise)
}

/// The names a key takes, where it takes one of a few names (an enum) and
/// was given another type, which the parser reports only as "wanted
/// string or table": found by reading the text again with a name that no
/// variant has in the value's place, which serde refuses listing them.
fn names_taken(text: &str, error: &toml::de::Error) -> Option<String> {
    const NO_VARIANT: &str = "?";
    if !error.message().starts_with("wanted string or table") {
        return None;
    }
    let span = error.span()?;
    let probe = format!(
        "{}\"{NO_VARIANT}\"{}",
        text.get(..span.start)?,
        text.get(span.end..)?
    );
    let table: toml::Table = toml::from_str(&probe).ok()?;
    let refused = toml::from_str::<Config>(&probe).err()?;
    let refused = task_key_error(&probe, &table, &refused).unwrap_or(refused);
    if refused.span().map(|at| at.start) != Some(span.start) {
        return None;
    }
    let expected = refused
        .message()
        .strip_prefix(&format!("unknown variant `{NO_VARIANT}`, expected "))?
        .lines()
        .next()?;
    // The key before `=`: on its own line, in an inline table, or dotted.
    let key = text
        .get(..span.start)?
        .trim_end()
        .strip_suffix('=')?
        .trim_end()
        .rsplit([',', '{', '\n', ' ', '\t'])
        .next()?;
    Some(format!("(`{key}` takes a name, in quotes: {expected})"))
}

/// TOML `text` with the `name = ...` line of its `[task]` section (and of
/// any `[task.x]`, which a task never has) turned to spaces, every other
/// byte in its place.
fn blank_task_name(text: &str) -> String {
    let mut section: Option<String> = None;
    let mut blanked = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            section = section_at(line, line.len());
        }
        let names_the_task = section.as_deref() == Some("task")
            && trimmed
                .strip_prefix("name")
                .is_some_and(|rest| rest.trim_start().starts_with('='));
        if names_the_task {
            let body = line.trim_end_matches(['\n', '\r']);
            blanked.push_str(&" ".repeat(body.len()));
            blanked.push_str(&line[body.len()..]);
        } else {
            blanked.push_str(line);
        }
    }
    blanked
}

/// The line of TOML `text` that holds byte `at`.
fn line_at(text: &str, at: usize) -> &str {
    let start = text
        .get(..at)
        .and_then(|before| before.rfind('\n'))
        .map_or(0, |newline| newline + 1);
    let rest = text.get(start..).unwrap_or_default();
    rest.lines().next().unwrap_or_default()
}

/// Why a `[task]` table that its own task refuses would be read by
/// another task (its keys are that task's, its `name` missing or other):
/// a hint to add to the parse error, if so.
fn another_tasks_keys(table: &toml::Table) -> Option<String> {
    let task = table.get("task")?.as_table()?;
    let named = task.get("name").and_then(toml::Value::as_str);
    let current = named.map_or_else(|| TaskConfig::default().name(), str::to_owned);
    let parses_as = |name: &str| {
        let mut renamed = task.clone();
        renamed.insert("name".to_owned(), toml::Value::String(name.to_owned()));
        toml::Value::Table(renamed).try_into::<TaskConfig>().is_ok()
    };
    // A name no task has (a typo) is serde's to report: the keys may be
    // right for the task meant.
    let names: Vec<String> = TaskConfig::every_task()
        .iter()
        .map(TaskConfig::name)
        .collect();
    if !names.contains(&current) || parses_as(&current) {
        return None;
    }
    let chosen = if named.is_some() { "" } else { ", the default" };
    names.into_iter().find_map(|name| {
        (name != current && parses_as(&name)).then(|| {
            format!(
                "(these are keys of the {name} task, which `name = \"{name}\"` in [task] selects; this [task] is {current}{chosen})"
            )
        })
    })
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
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            name: ObjectiveName::FlDb,
            backward_policy: BackwardPolicy::Learned,
            lambda: 0.9,
            log_z_learning_rate: 0.1,
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
    /// connects); one beyond is closed at once, before it is read, and one
    /// that has not sent its HTTP/2 preface (or TLS hello) within 10 s is
    /// closed too. Fewer where the process's open-file limit would run out
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
    /// briefly take up to ~4x that in memory when crafted (1-byte actions
    /// decode to 4 bytes; a chunk of more than `max_chunk_trajectories`
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
}

impl LearnerConfig {
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
    /// replayed (fewer than 16 where trajectories are that large)
    /// ([`ActorConfig::envs_for`]):
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
    /// Give up after this many failed connection attempts in a row; a
    /// session that sent a chunk and then broke starts a new count (0:
    /// never give up).
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

impl ActorConfig {
    /// Environments in lockstep (trajectories per chunk) for `env`:
    /// `envs`, or with 0 enough for [`AUTO_CHUNK_TRANSITIONS`] at full
    /// length, between 16 and 256, within [`AUTO_CHUNK_BYTES`] replayed.
    pub fn envs_for(&self, env: &dyn Environment) -> usize {
        let max_len = env.max_trajectory_len();
        match self.envs {
            0 => auto_envs(max_len, ReplayedTrajectory::max_held_bytes(env, max_len)),
            envs => envs,
        }
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

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "FLGFN_";
/// Between the section and the key in such a variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// One configuration key set by an environment variable.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvOverride {
    /// The variable, e.g. `FLGFN_LEARNER__LISTEN`.
    pub variable: String,
    /// The key it sets, e.g. `["learner", "listen"]`.
    pub key: Vec<String>,
    /// Its value: a TOML value when it reads as one (`64`, `true`,
    /// `[256, 256]`, `"text"`), else the text itself as a string
    /// (`0.0.0.0:50051`, `http://learner:50051`).
    pub value: toml::Value,
    /// The variable's text, as given: the value if a string key needs it
    /// (`123456` for a path).
    pub text: String,
}

impl EnvOverride {
    fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        let (last, sections) = self.key.split_last().expect("keys are never empty");
        let mut current = table;
        for section in sections {
            let entry = current
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = entry.as_table_mut().ok_or_else(|| {
                ConfigError::invalid(
                    &self.key.join("."),
                    format!("set by {}, but `{section}` is not a section", self.variable),
                )
            })?;
        }
        current.insert(last.clone(), self.value.clone());
        Ok(())
    }
}

/// This process's `FLGFN_` variables, name and value. No other variable
/// is read: `std::env::vars()` panics on any variable that is not UTF-8
/// (a file name in a foreign encoding, say), and one the program never
/// reads must not stop it from starting. A configuration key
/// (`FLGFN_SEED`, `FLGFN_<SECTION>__<KEY>`, or one misspelt with a single
/// underscore) or an `FLGFN_` name that is not UTF-8 is an error naming
/// it; another `FLGFN_` variable whose value is not UTF-8 (`FLGFN_CONFIG`,
/// a path) is left out, for its own reader.
pub fn flgfn_variables() -> Result<Vec<(String, String)>, ConfigError> {
    flgfn_variables_of(std::env::vars_os())
}

/// [`flgfn_variables`] of a given environment.
fn flgfn_variables_of(
    variables: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut found = Vec::new();
    for (name, value) in variables {
        if !is_flgfn_variable(&name) {
            continue;
        }
        let name = name.into_string().map_err(|name| {
            ConfigError::invalid(&name.to_string_lossy(), "the variable's name is not UTF-8")
        })?;
        match value.into_string() {
            Ok(value) => found.push((name, value)),
            // (A name one underscore away from a key, too: dropped, it
            // would not be warned about.)
            // (Not one named by a key alone, `FLGFN_NAME`: likely another
            // tool's, only warned about.)
            Err(_) if is_configuration_key(&name) || meant_with_section(&name).is_some() => {
                return Err(ConfigError::invalid(
                    &name,
                    "the variable's value is not UTF-8",
                ));
            }
            Err(_) => {}
        }
    }
    Ok(found)
}

/// Whether an `FLGFN_` variable sets a configuration key (see
/// [`env_overrides`]).
fn is_configuration_key(variable: &str) -> bool {
    variable
        .strip_prefix(ENV_PREFIX)
        .is_some_and(|name| name == "SEED" || name.contains(ENV_SEPARATOR))
}

/// Whether a variable's name starts with `FLGFN_`, UTF-8 or not.
pub fn is_flgfn_variable(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes())
}

/// The configuration keys set by `variables` (pass [`flgfn_variables`]):
/// every `FLGFN_<SECTION>__<KEY>` (upper case, `__` between the parts,
/// e.g. `FLGFN_TASK__SET_SIZE`) and `FLGFN_SEED`, in name order. Other
/// `FLGFN_` variables (`FLGFN_TOKEN`, `FLGFN_CONFIG`, `FLGFN_LOG_FORMAT`)
/// are not configuration keys and are left alone.
pub fn env_overrides(variables: impl IntoIterator<Item = (String, String)>) -> Vec<EnvOverride> {
    let mut overrides: Vec<EnvOverride> = variables
        .into_iter()
        .filter_map(|(variable, text)| {
            if !is_configuration_key(&variable) {
                return None;
            }
            let name = variable.strip_prefix(ENV_PREFIX)?;
            let key: Vec<String> = if name == "SEED" {
                vec!["seed".to_owned()]
            } else {
                name.split(ENV_SEPARATOR).map(str::to_lowercase).collect()
            };
            let value = format!("v = {text}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(text.clone()));
            Some(EnvOverride {
                variable,
                key,
                value,
                text,
            })
        })
        .collect();
    overrides.sort_by(|a, b| a.variable.cmp(&b.variable));
    overrides
}

/// Variables that look meant for a configuration key but are not read:
/// `FLGFN_<SECTION>_<KEY>`, a real section and key with one underscore
/// between them (`FLGFN_LEARNER_THREADS`; not `FLGFN_ACTOR_BIN`, which
/// names no key), and `FLGFN_<KEY>` or `FLGFN_<SECTION>` without the
/// rest (`FLGFN_LISTEN`, `FLGFN_TASK`: a container would quietly run on
/// the defaults), each with the variable meant, in name order.
pub fn misspelt_variables(names: impl IntoIterator<Item = String>) -> Vec<(String, String)> {
    let mut misspelt: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|name| {
            let meant = meant_variable(&name)?;
            Some((name, meant))
        })
        .collect();
    misspelt.sort();
    misspelt
}

/// The variable a misspelt one was meant as (`FLGFN_LEARNER__THREADS` for
/// `FLGFN_LEARNER_THREADS`; `FLGFN_LEARNER__THREADS or
/// FLGFN_ACTOR__THREADS` for `FLGFN_THREADS`; see [`misspelt_variables`]).
pub fn meant_variable(name: &str) -> Option<String> {
    meant_with_section(name)
        .or_else(|| meant_without_section(name))
        .or_else(|| meant_by_spelling(name))
}

/// The `FLGFN_` variables the binaries read that are not configuration
/// keys (and `FLGFN_SEED`, which is one).
const VARIABLES_OF_THEIR_OWN: [&str; 10] = [
    crate::auth::TOKEN_ENV,
    CONFIG_VARIABLE,
    "FLGFN_SEED",
    crate::telemetry::LOG_FORMAT_VARIABLE,
    "FLGFN_RESUME_CHANGED",
    "FLGFN_HEALTH_ADDRESS",
    "FLGFN_HEALTH_CA_FILE",
    "FLGFN_HEALTH_CERT_FILE",
    "FLGFN_HEALTH_KEY_FILE",
    "FLGFN_HEALTH_DOMAIN",
];

/// The variable that sets `key` of `section`: `FLGFN_LEARNER__LISTEN`.
fn key_variable(section: &str, key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}{ENV_SEPARATOR}{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

/// A misspelling of a variable the binaries read (`FLGFN_TOKN`,
/// `FLGFN_SEEDS`, `FLGFN_LOG_FROMAT`: one letter off, two for names of
/// six letters or more), or a key's name without its underscores
/// (`FLGFN_MAXSTEPS`): the variable meant. Unread, `FLGFN_TOKN` would
/// leave a learner without its token, `FLGFN_SEDD` a run unreproducible.
/// (Not a key's name misspelt: the scripts' own variables, such as
/// `FLGFN_TASKS` or `FLGFN_PORT`, are that close to keys.)
fn meant_by_spelling(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains(ENV_SEPARATOR) || VARIABLES_OF_THEIR_OWN.contains(&name) {
        return None;
    }
    // (The prefix is the same on both sides: the distance is the rest's.)
    let allowed = typos_allowed(rest);
    if let Some(own) = VARIABLES_OF_THEIR_OWN
        .iter()
        .find(|own| strsim::levenshtein(name, own) <= allowed)
    {
        return Some((*own).to_owned());
    }
    let squeezed = rest.replace('_', "").to_ascii_lowercase();
    let mut meant: Vec<String> = schema()
        .iter()
        .filter_map(|(section, keys)| {
            let key = keys
                .as_table()?
                .keys()
                .find(|key| key.contains('_') && key.replace('_', "") == squeezed)?;
            Some(key_variable(section, key))
        })
        .collect();
    meant.sort();
    (!meant.is_empty()).then(|| meant.join(" or "))
}

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

/// `FLGFN_<SECTION>_<KEY>`, a real section and key with one underscore
/// between them: the variable meant (see [`misspelt_variables`]).
fn meant_with_section(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains(ENV_SEPARATOR) {
        return None;
    }
    let schema = schema();
    let is_key = |section: &str, key: &str| {
        schema
            .get(section)
            .and_then(toml::Value::as_table)
            .is_some_and(|keys| keys.contains_key(key))
    };
    // (ASCII only: a lower case of another length would move the split.)
    let lower = rest.to_ascii_lowercase();
    let at = lower
        .match_indices('_')
        .map(|(at, _)| at)
        .find(|&at| is_key(&lower[..at], &lower[at + 1..]))?;
    Some(format!(
        "{ENV_PREFIX}{}{ENV_SEPARATOR}{}",
        &rest[..at],
        &rest[at + 1..]
    ))
}

/// `FLGFN_<KEY>` or `FLGFN_<SECTION>` alone: every variable it may have
/// meant (see [`misspelt_variables`]).
fn meant_without_section(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if rest.contains(ENV_SEPARATOR) || rest == "SEED" {
        return None;
    }
    let lower = rest.to_ascii_lowercase();
    let mut meant: Vec<String> = schema()
        .iter()
        .filter_map(|(section, keys)| {
            let keys = keys.as_table()?;
            if *section == lower {
                Some(key_variable(section, "<KEY>"))
            } else {
                keys.contains_key(&lower)
                    .then(|| key_variable(section, &lower))
            }
        })
        .collect();
    meant.sort();
    (!meant.is_empty()).then(|| meant.join(" or "))
}

/// `error` with the layer that set its key appended, where that was not
/// the file: `(set by --threads)`, `(set by FLGFN_LEARNER__THREADS)`. For
/// errors found after validation too (a key a checkpoint refuses).
pub fn blame_layer(
    error: ConfigError,
    overrides: &[EnvOverride],
    flags: &[(&str, &str)],
) -> ConfigError {
    match error {
        ConfigError::Invalid { field, reason } => {
            let by_flag = flags
                .iter()
                .find(|(_, key)| *key == field)
                .map(|(flag, _)| *flag);
            let by_variable = || {
                overrides
                    .iter()
                    .find(|o| o.key.join(".") == field)
                    .map(|o| o.variable.as_str())
            };
            let reason = match by_flag.or_else(by_variable) {
                Some(layer) => format!("{reason} (set by {layer})"),
                None => reason,
            };
            ConfigError::Invalid { field, reason }
        }
        other => other,
    }
}

/// How a configuration path is named in messages: `-` is standard input;
/// a path that came from `FLGFN_CONFIG` (not `--config`) says so, since
/// a user who gave no path may not know where it came from.
fn path_name(path: &Path) -> String {
    if path == Path::new(STDIN_PATH) {
        return "standard input".to_owned();
    }
    let from_variable = std::env::var_os(CONFIG_VARIABLE).is_some_and(|named| named == path)
        && !std::env::args_os().any(|arg| {
            arg.to_str()
                .is_some_and(|arg| arg == "--config" || arg.starts_with("--config="))
        });
    if from_variable {
        format!("{} (named by {CONFIG_VARIABLE})", path.display())
    } else {
        path.display().to_string()
    }
}

/// The line `did you mean `learning_rate`?` for a parser's message that
/// refuses an unknown key or name (`unknown field `learning_rat`,
/// expected one of ...`; `unknown variant ...`), where one of those it
/// expected is close: one letter off (two for names of six letters or
/// more), the same but for underscores and case, a whole word of it
/// (`universe` for `universe_size`), or a word users write for it (`gpu`
/// for `cuda`, see [`SYNONYMS`]).
fn did_you_mean(message: &str) -> Option<String> {
    Some(format!("did you mean {}?", meant_name(message)?))
}

/// A parser's refusal with all that matters on its first line, for a log
/// collector or `head -1`: where (`line 2, column 1`, or the key where
/// there is no text to point in), what, the name meant and `hints`. Then
/// the parser's excerpt of the file, any further lines of its message,
/// and, where no name meant was found, the names it expected.
fn parse_message(error: &toml::de::Error, meant: Option<String>, hints: &[String]) -> String {
    let shown = error.to_string();
    let message_line = error.message().lines().next().unwrap_or_default();
    // `unknown field `x`, expected one of `a`, `b`, ...`: the list is
    // long, and the name meant says more.
    let (problem, expected) = match message_line.split_once(", expected ") {
        Some((refused, expected))
            if message_line.starts_with("unknown field")
                || message_line.starts_with("unknown variant") =>
        {
            (refused, Some(expected))
        }
        _ => (message_line, None),
    };
    // The parser's text: `TOML parse error at line 2, column 1`, the
    // excerpt, the message, then `in `learner.max_steps`` where its error
    // has a key and no place.
    let mut place = None;
    let mut excerpt = Vec::new();
    let mut rest = Vec::new();
    let mut message_seen = false;
    for line in shown.lines() {
        if let Some(at) = line.strip_prefix("TOML parse error at ") {
            place = Some(at.to_owned());
        } else if line == message_line {
            message_seen = true;
        } else if let Some(key) = line.strip_prefix("in `").and_then(|k| k.strip_suffix('`')) {
            place.get_or_insert_with(|| format!("`{key}`"));
        } else if message_seen {
            rest.push(line);
        } else if place.is_some() {
            excerpt.push(line);
        }
    }
    let mut first = match place {
        Some(place) => format!("{place}: {problem}"),
        None => problem.to_owned(),
    };
    for hint in meant.iter().chain(hints) {
        // A hint in parentheses reads on from the problem.
        first.push_str(if hint.starts_with('(') { " " } else { "; " });
        first.push_str(hint);
    }
    let mut lines = vec![first];
    lines.extend(excerpt.into_iter().chain(rest).map(str::to_owned));
    if let (None, Some(expected)) = (&meant, expected) {
        lines.push(format!("expected {expected}"));
    }
    lines.join("\n")
}

/// The line saying why an integer the parser read was refused as a
/// `i128` (the TOML parser's wording for one beyond 64 bits).
fn integer_limit(message: &str) -> Option<String> {
    message
        .contains("as i128")
        .then(|| format!("TOML integers are 64-bit: at most {}", i64::MAX))
}

/// How many letters a misspelling of `name` may be off by: one, two for
/// names of six letters or more (variables and keys alike).
fn typos_allowed(name: &str) -> usize {
    if name.chars().count() >= 6 { 2 } else { 1 }
}

/// The key or name an "unknown field" or "unknown variant" message
/// refuses.
fn refused_name(message: &str) -> Option<&str> {
    let (_, refused) = message
        .split_once("unknown field `")
        .or_else(|| message.split_once("unknown variant `"))?;
    Some(refused.split_once('`')?.0)
}

/// The names meant by a refused one (see [`did_you_mean`]), quoted and
/// joined by `or`.
fn meant_name(message: &str) -> Option<String> {
    let given = refused_name(message)?;
    let rest = message.split_once(&format!("`{given}`"))?.1;
    let expected = rest.lines().next()?.split_once("expected ")?.1;
    let candidates = expected.split('`').skip(1).step_by(2);
    // A word users write for one of ours that no spelling is near
    // (`gpu` is one letter from `cpu`, the opposite choice).
    if let Some(&(_, ours)) = SYNONYMS.iter().find(|&&(theirs, ours)| {
        given.eq_ignore_ascii_case(theirs) && candidates.clone().any(|c| c == ours)
    }) {
        return Some(format!("`{ours}`"));
    }
    let allowed = typos_allowed(given);
    let squeeze = |name: &str| name.replace('_', "").to_lowercase();
    // A whole word of three letters or more (`s` would match every
    // `..._s`).
    let word_of = |long: &str, word: &str| {
        word.chars().count() >= 3
            && (long.starts_with(&format!("{word}_")) || long.ends_with(&format!("_{word}")))
    };
    let close: Vec<(usize, &str)> = candidates
        .filter(|candidate| !candidate.is_empty())
        .map(|candidate| (strsim::levenshtein(given, candidate), candidate))
        .filter(|&(distance, candidate)| {
            distance <= allowed
                || squeeze(given) == squeeze(candidate)
                || word_of(given, candidate)
                || word_of(candidate, given)
        })
        .collect();
    let nearest = close.iter().map(|&(distance, _)| distance).min()?;
    let meant: Vec<String> = close
        .iter()
        .filter(|&&(distance, _)| distance == nearest)
        .map(|(_, candidate)| format!("`{candidate}`"))
        .collect();
    Some(meant.join(" or "))
}

/// Words for a name of ours: (theirs, ours).
const SYNONYMS: &[(&str, &str)] = &[("gpu", "cuda")];

/// Where an effective configuration came from, as TOML comment lines
/// for `--print-config`: the layers in order of precedence.
pub fn describe_layers(path: Option<&Path>, overrides: &[EnvOverride], flags: &[&str]) -> String {
    let file = path.map_or("no file".to_owned(), path_name);
    let env = if overrides.is_empty() {
        "no FLGFN_ variables".to_owned()
    } else {
        overrides
            .iter()
            .map(|o| o.variable.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let flags = if flags.is_empty() {
        "no flags".to_owned()
    } else {
        flags.join(", ")
    };
    format!(
        "# Effective configuration. Layers, later ones win:\n\
         #   defaults < {file} < environment ({env}) < command line ({flags})\n"
    )
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
        // The hint is looked for only once the text is refused (the table
        // is edited and consumed below: the text is read again).
        // The hints look at the whole file: each only where the error
        // is of its kind.
        let parse_error = |e: toml::de::Error| {
            let table: Option<toml::Table> = toml::from_str(text).ok();
            let e = table
                .as_ref()
                .and_then(|table| task_key_error(text, table, &e))
                .unwrap_or(e);
            let refused = refused_name(e.message());
            let (section, line) = error_place(text, &e);
            // Another task's key in [task] (not misspelt: no `did you
            // mean`), or a type refused in [task] that the other task
            // reads.
            let in_task = |name: &str| {
                table
                    .as_ref()
                    .and_then(|t| t.get("task"))
                    .and_then(toml::Value::as_table)
                    .is_some_and(|task| task.contains_key(name))
            };
            let task_error = match refused {
                Some(name) => in_task(name),
                None => section
                    .as_ref()
                    .is_none_or(|s| s.as_deref() == Some("task")),
            };
            if task_error && let Some(hint) = table.as_ref().and_then(another_tasks_keys) {
                return ConfigError::Parse {
                    path: origin.to_owned(),
                    message: parse_message(&e, None, &[hint]),
                };
            }
            // A section of the wrong shape, where the error points at it.
            let shape = table
                .as_ref()
                .and_then(misshapen_section)
                .filter(|(name, _)| {
                    e.message().contains("invalid type")
                        && line.is_none_or(|line| line.contains(name.as_str()))
                })
                .map(|(_, hint)| hint);
            let hint = shape.or_else(|| names_taken(text, &e));
            ConfigError::parse(origin.to_owned(), &e, hint)
        };
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

    fn layered(path: Option<&Path>, overrides: &[EnvOverride]) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(path) => {
                let origin = path_name(path);
                let text = if path == Path::new(STDIN_PATH) {
                    std::io::read_to_string(std::io::stdin())
                } else {
                    std::fs::read_to_string(path)
                };
                let text = text.map_err(|source| ConfigError::Io {
                    path: origin.clone(),
                    source,
                })?;
                (text, origin)
            }
            None => (String::new(), "the defaults".to_owned()),
        };
        if overrides.is_empty() {
            return Self::parse_toml(&text, &origin);
        }
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| ConfigError::parse(origin.clone(), &e, None))?;
        let all: Vec<&EnvOverride> = overrides.iter().collect();
        let error = match with_overrides(&table, &all)? {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        // Blame the layer at fault: the file on its own, with its line
        // numbers (unless a variable mends it), else the one variable
        // that fails on top of it alone, else all of them together.
        let alone = |layer: &EnvOverride| with_overrides(&table, &[layer]);
        match Self::parse_toml(&text, &origin) {
            Err(file_error) => {
                if !overrides
                    .iter()
                    .any(|layer| alone(layer).is_ok_and(|result| result.is_ok()))
                {
                    return Err(file_error);
                }
            }
            // The one variable without which the rest loads (a variable
            // may fail alone yet be right: a lattice key with the task set
            // by another variable).
            Ok(_) if overrides.len() > 1 => {
                for (at, layer) in overrides.iter().enumerate() {
                    let others: Vec<&EnvOverride> = overrides
                        .iter()
                        .enumerate()
                        .filter(|&(other, _)| other != at)
                        .map(|(_, o)| o)
                        .collect();
                    if with_overrides(&table, &others).is_ok_and(|result| result.is_ok()) {
                        return Err(ConfigError::parse(
                            format!("{} (applied to {origin})", layer.variable),
                            &error,
                            None,
                        ));
                    }
                }
            }
            Ok(_) => {}
        }
        let variables: Vec<&str> = overrides.iter().map(|o| o.variable.as_str()).collect();
        Err(ConfigError::parse(
            format!("{} (applied to {origin})", variables.join(", ")),
            &error,
            None,
        ))
    }

    /// The configuration as TOML, every key that has a value (unset task
    /// overrides are left out), for `--print-config`.
    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// [`Config::validate`] for a binary, whose error says which layer
    /// set the key it names when that was not the file: a flag (`flags`:
    /// each flag given, with the key it sets) or an `FLGFN_` variable
    /// (`overrides`). "0 is less than 1" for `learner.threads` sent a user
    /// to a file that said 2.
    pub fn validate_layers(
        &self,
        overrides: &[EnvOverride],
        flags: &[(&str, &str)],
    ) -> Result<(), ConfigError> {
        self.validate()
            .map_err(|error| blame_layer(error, overrides, flags))
    }

    /// Checks every field that has a restricted range. Call again after
    /// applying command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Building the task validates its parameters.
        let env = crate::tasks::build(&self.task)?;
        // TOML integers are signed: a larger value could be given by a
        // flag (--seed, --max-steps) but not written to a file, a
        // checkpoint's configuration, or the local actors' configuration.
        for (field, value) in [
            ("seed", self.seed),
            ("learner.max_steps", self.learner.max_steps),
        ] {
            if value > i64::MAX as u64 {
                return Err(ConfigError::invalid(
                    field,
                    format!(
                        "{value} is above {} (TOML integers are 64-bit signed)",
                        i64::MAX
                    ),
                ));
            }
        }
        if self.model.hidden.is_empty() || self.model.hidden.contains(&0) {
            return Err(ConfigError::invalid(
                "model.hidden",
                "needs at least one layer, each wider than 0",
            ));
        }
        positive_finite("objective.lambda", self.objective.lambda)?;
        positive_finite(
            "objective.log_z_learning_rate",
            self.objective.log_z_learning_rate,
        )?;
        let l = &self.learner;
        positive_finite("learner.learning_rate", l.learning_rate)?;
        unit_interval(
            "learner.final_learning_rate_fraction",
            l.final_learning_rate_fraction,
        )?;
        at_least("learner.batch_transitions", l.batch_transitions, 1)?;
        // The trainer holds a whole batch, replayed (~200 bytes per
        // transition on the small task), before it steps.
        at_most(
            "learner.batch_transitions",
            l.batch_transitions,
            MAX_BATCH_TRANSITIONS,
        )?;
        if l.max_batch_transitions < l.batch_transitions {
            // Either may be the one the user set: name both, and the
            // default, which a user raising batch_transitions alone meets.
            let default = LearnerConfig::default().max_batch_transitions;
            return Err(ConfigError::invalid(
                "learner.max_batch_transitions",
                format!(
                    "{} is less than learner.batch_transitions ({}): a batch starts at batch_transitions and grows up to max_batch_transitions (by default {default}); raise max_batch_transitions to at least {}, or lower batch_transitions",
                    l.max_batch_transitions, l.batch_transitions, l.batch_transitions,
                ),
            ));
        }
        at_most(
            "learner.max_batch_transitions",
            l.max_batch_transitions,
            MAX_BATCH_TRANSITIONS,
        )?;
        at_least("learner.publish_every", l.publish_every as usize, 1)?;
        at_least("learner.max_policy_lag", l.max_policy_lag as usize, 1)?;
        at_least(
            "learner.max_in_flight_batches",
            l.max_in_flight_batches as usize,
            1,
        )?;
        // The room's ceiling is max_batch_transitions times this: kept far
        // from overflow and from what a channel can be sized to.
        at_most(
            "learner.max_in_flight_batches",
            usize::try_from(l.max_in_flight_batches).unwrap_or(usize::MAX),
            MAX_IN_FLIGHT_BATCHES,
        )?;
        if l.max_in_flight_batches > l.max_policy_lag {
            let default = LearnerConfig::default().max_in_flight_batches;
            return Err(ConfigError::invalid(
                "learner.max_in_flight_batches",
                format!(
                    "{} is more than learner.max_policy_lag ({}): data granted would age past the bound before it is trained; set max_in_flight_batches at most max_policy_lag (its default, {default}, needs max_policy_lag >= {default})",
                    l.max_in_flight_batches, l.max_policy_lag,
                ),
            ));
        }
        at_least(
            "learner.weights_refresh_steps",
            l.weights_refresh_steps as usize,
            1,
        )?;
        // Data is sampled with weights up to publish_every steps older than
        // the trainer, and an actor's up to weights_refresh_steps versions
        // older than that: past max_policy_lag every chunk would be dropped
        // before new weights could reach an actor, and training would stall.
        if l.publish_every.saturating_add(l.weights_refresh_steps) > l.max_policy_lag {
            let field = if l.publish_every > l.weights_refresh_steps {
                "learner.publish_every"
            } else {
                "learner.weights_refresh_steps"
            };
            return Err(ConfigError::invalid(
                field,
                format!(
                    "learner.publish_every ({}) + learner.weights_refresh_steps ({}) is more than learner.max_policy_lag ({}): every chunk would be too old to train on before new weights reached the actors",
                    l.publish_every, l.weights_refresh_steps, l.max_policy_lag
                ),
            ));
        }
        for (field, threads) in [
            ("learner.threads", l.threads),
            ("learner.async_threads", l.async_threads),
            ("learner.ingest_threads", l.ingest_threads),
        ] {
            at_least(field, threads, 1)?;
            at_most(field, threads, MAX_THREADS)?;
        }
        at_least("learner.eval_samples", l.eval_samples, 1)?;
        // Blank is neither a folder anyone meant nor "" (no checkpoints).
        if !l.checkpoint_dir.is_empty() && l.checkpoint_dir.trim().is_empty() {
            return Err(ConfigError::invalid(
                "learner.checkpoint_dir",
                format!(
                    "{:?} is blank: give a folder, or \"\" for no checkpoints",
                    l.checkpoint_dir
                ),
            ));
        }
        at_most("learner.eval_samples", l.eval_samples, MAX_EVAL_SAMPLES)?;
        at_least("learner.keep_checkpoints", l.keep_checkpoints, 1)?;
        at_least("learner.max_sessions", l.max_sessions, 1)?;
        at_least("learner.max_connections", l.max_connections, 1)?;
        at_most(
            "learner.max_connections",
            l.max_connections,
            MAX_CONNECTIONS,
        )?;
        timer_seconds(
            "learner.idle_connection_s",
            l.idle_connection_s,
            MIN_IDLE_CONNECTION_S,
        )?;
        if !l.checkpoint_every_s.is_finite() || l.checkpoint_every_s < 0.0 {
            return Err(ConfigError::invalid(
                "learner.checkpoint_every_s",
                format!(
                    "must be 0 (off) or a positive number of seconds, got {}",
                    l.checkpoint_every_s
                ),
            ));
        }
        timer_seconds(
            "learner.stall_timeout_s",
            l.stall_timeout_s,
            MIN_STALL_TIMEOUT_S,
        )?;
        timer_seconds("learner.keepalive_s", l.keepalive_s, MIN_KEEPALIVE_S)?;
        positive_finite("learner.first_report_s", l.first_report_s)?;
        positive_finite("learner.report_every_s", l.report_every_s)?;
        if l.first_report_s > l.report_every_s {
            return Err(ConfigError::invalid(
                "learner.first_report_s",
                "must be at most learner.report_every_s",
            ));
        }
        at_least("learner.max_message_bytes", l.max_message_bytes, 1 << 20)?;
        // gRPC frames a message's length in 32 bits.
        at_most(
            "learner.max_message_bytes",
            l.max_message_bytes,
            u32::MAX as usize,
        )?;
        at_least(
            "learner.max_chunk_trajectories",
            l.max_chunk_trajectories,
            1,
        )?;
        // None would train nothing and wait for ever.
        at_least("launch.actors", self.launch.actors, 1)?;
        check_listen_address(&self.learner.listen)?;
        let a = &self.actor;
        at_least("actor.threads", a.threads, 1)?;
        at_most("actor.threads", a.threads, MAX_THREADS)?;
        unit_interval("actor.epsilon", a.epsilon)?;
        unit_interval("actor.truncate_fraction", a.truncate_fraction)?;
        // Every trajectory cut short: TB, which trains on complete ones
        // only, would wait for data for ever.
        if self.objective.name == ObjectiveName::Tb && a.truncate_fraction >= 1.0 {
            return Err(ConfigError::invalid(
                "actor.truncate_fraction",
                "1 cuts every trajectory short, and objective.name = \"tb\" trains on complete trajectories only: lower it, or use fl_db or fl_sub_tb, which train on truncated ones",
            ));
        }
        at_least("actor.truncate_cap", a.truncate_cap, 1)?;
        learner_url(&a.learner)?;
        timer_seconds(
            "actor.reconnect_initial_s",
            a.reconnect_initial_s,
            MIN_RECONNECT_S,
        )?;
        seconds_up_to_a_day("actor.reconnect_max_s", a.reconnect_max_s)?;
        timer_seconds("actor.keepalive_s", a.keepalive_s, MIN_KEEPALIVE_S)?;
        if a.progress_log_s != 0.0 {
            timer_seconds("actor.progress_log_s", a.progress_log_s, 1.0)?;
        }
        if a.reconnect_max_s < a.reconnect_initial_s {
            return Err(ConfigError::invalid(
                "actor.reconnect_max_s",
                "must be at least actor.reconnect_initial_s",
            ));
        }
        // Weights travel in one message, which gRPC frames in 32 bits: a
        // network beyond that even as bf16 (the smallest encoding) is
        // refused by every process (one too large to allocate would abort
        // an actor's rollout thread). An actor checks no more: it takes
        // weights up to the learner's limit, in the learner's encoding,
        // whatever its own; the learner checks both of its own
        // (`weights_fit`).
        self.weights_fit_in(
            env.as_ref(),
            WeightEncoding::Bf16,
            u32::MAX as usize,
            "gRPC's 4 GiB",
            "narrow model.hidden",
        )
    }

    /// Whether this network's weights, in `learner.weight_encoding`, fit in
    /// one message of `limit` bytes (`limit_name` says whose limit, in the
    /// error). `env` is this configuration's task, built.
    pub fn weights_fit(
        &self,
        env: &dyn Environment,
        limit: usize,
        limit_name: &str,
    ) -> Result<(), ConfigError> {
        let remedy = match self.learner.weight_encoding {
            WeightEncoding::F32 => {
                "narrow model.hidden, raise learner.max_message_bytes (up to 4 GiB), or set learner.weight_encoding = \"bf16\" (half the bytes)"
            }
            WeightEncoding::Bf16 => {
                "narrow model.hidden, or raise learner.max_message_bytes (up to 4 GiB)"
            }
        };
        self.weights_fit_in(env, self.learner.weight_encoding, limit, limit_name, remedy)
    }

    fn weights_fit_in(
        &self,
        env: &dyn Environment,
        encoding: WeightEncoding,
        limit: usize,
        limit_name: &str,
        remedy: &str,
    ) -> Result<(), ConfigError> {
        let model = crate::policy::ModelSpec::new(env, &self.model);
        let weight_bytes = model.weight_bytes(encoding, &model.weight_metadata(&env.spec()));
        if weight_bytes > limit as u128 {
            return Err(ConfigError::invalid(
                "model.hidden",
                format!(
                    "a network of {} parameters takes about {weight_bytes} bytes as {} weights, more than one message may carry ({limit_name} = {limit}); {remedy}",
                    model.parameter_count(),
                    encoding.name(),
                ),
            ));
        }
        Ok(())
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

/// `table` (a file's) with `overrides` applied, as a configuration: the
/// outer error is a variable that cannot be applied (its section is not
/// one), the inner one the schema's refusal. A value read as a number, a
/// date or a boolean may be meant as text
/// (FLGFN_LEARNER__CHECKPOINT_DIR=123456): such values are tried as
/// strings, the fewest first (one alone, then two, ...; the first few
/// variables only, so a long list cannot explode).
fn with_overrides(
    table: &toml::Table,
    overrides: &[&EnvOverride],
) -> Result<Result<Config, toml::de::Error>, ConfigError> {
    let mut table = table.clone();
    for layer in overrides {
        layer.apply(&mut table)?;
    }
    name_default_task(&mut table);
    let first_error = match table.clone().try_into::<Config>() {
        Ok(config) => return Ok(Ok(config)),
        Err(error) => error,
    };
    let typed: Vec<&EnvOverride> = overrides
        .iter()
        .copied()
        .filter(|o| !o.value.is_str())
        .take(MAX_RETYPED_OVERRIDES)
        .collect();
    let mut subsets: Vec<u32> = (1..1u32 << typed.len()).collect();
    subsets.sort_by_key(|subset| subset.count_ones());
    for subset in subsets {
        let mut as_text = table.clone();
        let applied = typed
            .iter()
            .enumerate()
            .filter(|(i, _)| subset & (1 << i) != 0)
            .all(|(_, layer)| {
                EnvOverride {
                    value: toml::Value::String(layer.text.clone()),
                    ..(*layer).clone()
                }
                .apply(&mut as_text)
                .is_ok()
            });
        if applied && let Ok(config) = as_text.try_into::<Config>() {
            return Ok(Ok(config));
        }
    }
    Ok(Err(first_error))
}

/// Most environment variables whose typed values (numbers, booleans,
/// dates) are retried as text together: 2^8 parses at worst.
const MAX_RETYPED_OVERRIDES: usize = 8;

/// Longest wait any setting may ask for: a day. A larger "forever" would
/// overflow the timers built from it.
pub const MAX_WAIT_S: f64 = 86_400.0;

/// Shortest `learner.idle_connection_s`: an actor's connection is idle
/// between its handshake and its session, for a round trip.
pub const MIN_IDLE_CONNECTION_S: f64 = 1.0;

/// Shortest `learner.stall_timeout_s`: below it, every actor would be
/// ended before its first chunk could arrive.
pub const MIN_STALL_TIMEOUT_S: f64 = 0.1;

/// Shortest `actor.reconnect_initial_s`: a shorter first wait retries in
/// a tight loop (the jittered wait rounds to nothing).
pub const MIN_RECONNECT_S: f64 = 0.01;

/// Shortest `actor.keepalive_s` and `learner.keepalive_s`: each side drops
/// a connection whose ping goes unanswered for twice this, so shorter
/// would drop every connection over a link with a longer round trip.
pub const MIN_KEEPALIVE_S: f64 = 1.0;

/// A timer's seconds: at least `min`, at most [`MAX_WAIT_S`] (a day), so
/// that its deadline can always be computed.
fn timer_seconds(field: &str, value: f64, min: f64) -> Result<(), ConfigError> {
    if (min..=MAX_WAIT_S).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("must be between {min} and {MAX_WAIT_S} seconds (a day), got {value}"),
        ))
    }
}

fn positive_finite(field: &str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is not a positive number"),
        ))
    }
}

/// An actor wait (`reconnect_*_s`, `keepalive_s`): positive, at most
/// [`MAX_WAIT_S`].
fn seconds_up_to_a_day(field: &str, value: f64) -> Result<(), ConfigError> {
    positive_finite(field, value)?;
    if value > MAX_WAIT_S {
        return Err(ConfigError::invalid(
            field,
            format!("{value} s is more than a day ({MAX_WAIT_S} s)"),
        ));
    }
    Ok(())
}

/// `actor.learner` must be an `http://` or `https://` URL with a host and
/// a port that is one (or none: 80 or 443): a URL that cannot connect
/// would fail every attempt, and with the default unlimited
/// `reconnect_attempts` the actor would retry forever, far from the
/// setting. (A path is ignored, and the actor says so: a shared job file
/// may name an ingress's, and the learner must start whatever it says.)
fn learner_url(url: &str) -> Result<(), ConfigError> {
    let invalid = |why: String| Err(ConfigError::invalid("actor.learner", why));
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return invalid(format!(
            "{url:?} is not an http:// or https:// URL (e.g. http://learner:50051)"
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // (Any user and password come before the host.)
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    // (An IPv6 address keeps its colons inside brackets.)
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() {
        return invalid(format!("{url:?} names no host"));
    }
    if let Some(bad) = url.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return invalid(format!("{url:?} holds {bad:?}, which no URL may"));
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|port| port > 0)
    {
        return invalid(format!("{url:?}: {port:?} is no port (1 to 65535)"));
    }
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map(drop)
        .or_else(|error| {
            invalid(format!(
                "{url:?} is no URL an actor can connect to: {error}"
            ))
        })
}

fn unit_interval(field: &str, value: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is not in [0, 1]"),
        ))
    }
}

/// Most threads of any kind: more is a typo, and would fail later, far
/// from the setting (a thread that cannot be spawned).
pub const MAX_THREADS: usize = 4096;

/// Most connections a learner may be configured to hold: Linux's default
/// ceiling on a process's open files (`fs.nr_open`).
const MAX_CONNECTIONS: usize = 1 << 20;

/// Most evaluation samples (each evaluation holds them all in memory).
pub const MAX_EVAL_SAMPLES: usize = 1 << 24;

/// Upper bound of `learner.batch_transitions`.
pub const MAX_BATCH_TRANSITIONS: usize = 1 << 20;

/// Upper bound of `learner.max_in_flight_batches`.
pub const MAX_IN_FLIGHT_BATCHES: usize = 1 << 16;

/// `learner.listen` is `host:port` (a name, an IPv4 address or a
/// bracketed IPv6 one, and a port number): caught here, a forgotten host
/// (`50051`) is named as the key instead of failing to bind.
fn check_listen_address(listen: &str) -> Result<(), ConfigError> {
    let invalid = |why: &str| {
        ConfigError::invalid(
            "learner.listen",
            format!("{listen:?} {why}; give host:port, e.g. 127.0.0.1:50051 or 0.0.0.0:50051"),
        )
    };
    let (host, port) = listen
        .rsplit_once(':')
        .filter(|_| !listen.ends_with(']'))
        .ok_or_else(|| invalid("is not host:port"))?;
    if host.is_empty() {
        return Err(invalid("has no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(invalid("has an IPv6 address without brackets"));
    }
    port.parse::<u16>()
        .map_err(|_| invalid("has no port number (0 to 65535) after its last ':'"))?;
    Ok(())
}

fn at_most(field: &str, value: usize, max: usize) -> Result<(), ConfigError> {
    if value <= max {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is more than {max}"),
        ))
    }
}

fn at_least(field: &str, value: usize, min: usize) -> Result<(), ConfigError> {
    if value >= min {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is less than {min}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's configuration block, which claims to list every key
    /// with its default.
    fn readme_block() -> &'static str {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml block") + 8;
        let len = readme[start..].find("```").expect("the block ends");
        &readme[start..start + len]
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_task_key_refused_is_shown_at_its_own_line() {
        let error = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
        let shown_at = |message: &str, line: usize, quoted: &str| {
            assert!(
                message.contains(&format!("line {line}, column"))
                    && message.contains(&format!("{line} | {quoted}")),
                "not at line {line} `{quoted}`: {message}"
            );
        };
        // A value of the wrong type, the task named or by default.
        let message = error("[task]\nname = \"set_generation\"\nset_size = \"x\"\n");
        shown_at(&message, 3, "set_size = \"x\"");
        assert!(message.contains("expected usize"), "{message}");
        let message = error("seed = 1\n\n[task]\nsize = 3\n");
        shown_at(&message, 4, "size = 3");
        // Another task's, after other sections; a negative side.
        let message = error(
            "[learner]\nthreads = 1\n[task]\n  name = \"lattice\"\nside = -3\n[actor]\nenvs = 4\n",
        );
        shown_at(&message, 5, "side = -3");
        // A misspelt key keeps its hint, and so does another task's key.
        let message = error("# job\n[task]\nname = \"set_generation\"\nsizee = \"small\"\n");
        shown_at(&message, 4, "sizee = \"small\"");
        assert!(message.contains("did you mean `size`?"), "{message}");
        let message = error("[task]\nside = 3\n");
        shown_at(&message, 2, "side = 3");
        assert!(message.contains("keys of the lattice task"), "{message}");
        // A key that takes a name, given another type: its names.
        let message = error("[task]\nname = \"set_generation\"\nsize = 3\n");
        shown_at(&message, 3, "size = 3");
        assert!(
            message.contains("(`size` takes a name, in quotes: one of `small`, `medium`, `large`)"),
            "{message}"
        );
        // A name over two lines cannot be blanked: the parser's own error.
        let message = error("[task]\nname = \"\"\"\nlattice\"\"\"\nside = -3\n");
        assert!(
            message.contains("expected usize") && !message.contains("expected '='"),
            "{message}"
        );
        // An inline table cannot be blanked: the parser's own error stays.
        let message = error("task = { name = \"lattice\", side = -3 }\n");
        assert!(message.contains("expected usize"), "{message}");
    }

    /// TOML reports a key that takes one of a few names, given a number or
    /// a boolean, as "wanted string or table": the names are added.
    #[test]
    fn a_name_key_given_another_type_lists_its_names() {
        let error = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
        let message = error("[objective]\nname = 3\n");
        assert!(message.contains("wanted string or table"), "{message}");
        assert!(
            message.contains("(`name` takes a name, in quotes: one of `fl_db`, `fl_sub_tb`, `db`, `sub_tb`, `tb`)"),
            "{message}"
        );
        let message = error("[learner]\nthreads = 1\ndevice = true\n");
        assert!(
            message.contains("(`device` takes a name, in quotes: "),
            "{message}"
        );
        let message = error("objective = { name = 1.5 }\n");
        assert!(
            message.contains("(`name` takes a name, in quotes: "),
            "{message}"
        );
        // Another type error is left as it is.
        let message = error("[learner]\nthreads = \"one\"\n");
        assert!(!message.contains("takes a name"), "{message}");
    }

    #[test]
    fn another_tasks_keys_get_a_hint_naming_that_task() {
        let error = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
        // The default task given a lattice key.
        let message = error("[task]\nside = 3\n");
        assert!(message.contains("unknown field `side`"), "{message}");
        assert!(
            message.contains("keys of the lattice task, which `name = \"lattice\"` in [task] selects; this [task] is set_generation, the default"),
            "{message}"
        );
        // A misspelt name: serde names it, no hint about keys.
        let message = error("[task]\nname = \"latice\"\n");
        assert!(
            message.contains("latice") && !message.contains("keys of the"),
            "{message}"
        );
        // A named task given the other's keys.
        let message = error("[task]\nname = \"lattice\"\nuniverse = 30\n");
        assert!(
            message.contains("keys of the set_generation task")
                && message.contains("this [task] is lattice)"),
            "{message}"
        );
        // A key no task has, or an error outside [task]: no hint.
        for text in [
            "[task]\nsidee = 3\n",
            "[task]\nside = 3\nname = \"lattice\"\n[learner]\nthreds = 1\n",
        ] {
            let message = error(text);
            assert!(
                message.contains("unknown field") && !message.contains("keys of the"),
                "{message}"
            );
        }
    }

    #[test]
    fn misspelt_keys_and_names_get_the_one_meant() {
        let refusal = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
        let meant = |text: &str| {
            let message = refusal(text);
            // On the first line, with the problem.
            let line = message
                .lines()
                .next()
                .and_then(|line| line.split_once("did you mean "))
                .and_then(|(_, meant)| Some(format!("{}?", meant.split_once('?')?.0)));
            (line, message)
        };
        for (text, expected) in [
            // One letter off; two for longer names; a section.
            ("[learner]\nthreds = 1\n", "`threads`?"),
            ("[actor]\nepsilom = 0.1\n", "`epsilon`?"),
            ("[learnr]\nthreads = 1\n", "`learner`?"),
            // Underscores and case.
            ("[learner]\nmaxsteps = 1\n", "`max_steps`?"),
            ("[learner]\nMax_Steps = 1\n", "`max_steps`?"),
            // A word of it.
            ("[task]\nuniverse_size = 30\n", "`universe`?"),
            // Names of tasks and objectives.
            ("[task]\nname = \"latice\"\n", "`lattice`?"),
            ("[objective]\nname = \"fl_subtb\"\n", "`fl_sub_tb`?"),
            // A word for one (`gpu` is one letter from `cpu`).
            ("[learner]\ndevice = \"gpu\"\n", "`cuda`?"),
        ] {
            let (line, message) = meant(text);
            assert_eq!(line.as_deref(), Some(expected), "{text}: {message}");
        }
        // A section given twice the brackets, or a value; an integer past
        // 64 bits.
        let message = refusal("[[learner]]\nthreads = 1\n");
        assert!(
            message.contains("write `[learner]`") && message.contains("`[[learner]]`"),
            "{message}"
        );
        let message = refusal("learner = 5\n");
        assert!(
            message.contains("write `[learner]`") && message.contains("the value 5"),
            "{message}"
        );
        let message = refusal("[learner]\nmax_steps = 99999999999999999999\n");
        assert!(
            message.contains("max_steps") && message.contains("at most 9223372036854775807"),
            "{message}"
        );
        // Each hint where its error is: a misspelt key keeps its guess
        // beside a misshapen section or another task's keys elsewhere.
        for text in [
            "[learner]\nthreds = 1\n[[tls]]\n",
            "[learner]\nthreds = 1\n[task]\nside = 3\n",
        ] {
            let (line, message) = meant(text);
            assert_eq!(line.as_deref(), Some("`threads`?"), "{text}: {message}");
            assert!(
                !message.contains("one section") && !message.contains("keys of the"),
                "{message}"
            );
        }
        // A type error outside [task] or away from a misshapen section
        // gets neither hint.
        for text in [
            "[learner]\nthreads = \"x\"\n[task]\nside = 3\n",
            "[learner]\nthreads = \"x\"\n[[tls]]\n",
        ] {
            let message = refusal(text);
            assert!(
                message.contains("threads")
                    && !message.contains("one section")
                    && !message.contains("keys of the"),
                "{text}: {message}"
            );
        }
        // Hints read the parser's message, not the file's line it quotes.
        let message = refusal("[learner]\nthreads = \"x\" # as i128\n");
        assert!(!message.contains("64-bit"), "{message}");
        // Nothing close: no guess.
        for text in [
            // (`s` is no word of `report_every_s`.)
            "[learner]\ns = 1\n",
            "[learner]\ncolour = 1\n",
            "[task]\nname = \"chess\"\n",
            // Another task's key gets that task's hint instead (`side` is
            // one letter from `size`).
            "[task]\nside = 3\n",
        ] {
            let (line, message) = meant(text);
            assert_eq!(line, None, "{text}: {message}");
        }
    }

    #[test]
    fn values_toml_cannot_hold_are_refused_by_name() {
        // A flag can set them (--seed, --max-steps); a file or the local
        // actors' configuration could not carry them.
        let mut config = Config::default();
        config.learner.max_steps = u64::MAX;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("learner.max_steps"), "{error}");
        config.learner.max_steps = i64::MAX as u64;
        config.validate().unwrap();
        let text = config.to_toml();
        assert_eq!(Config::from_toml(&text, "test").unwrap(), config);
    }

    #[test]
    fn combinations_that_could_never_train_are_refused_by_name() {
        // TB with every trajectory cut short would wait for data for ever.
        let mut config = Config::default();
        config.objective.name = ObjectiveName::Tb;
        config.actor.truncate_fraction = 1.0;
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("actor.truncate_fraction") && error.contains("tb"),
            "{error}"
        );
        config.actor.truncate_fraction = 0.5;
        config.validate().unwrap();
        config.objective.name = ObjectiveName::FlDb;
        config.actor.truncate_fraction = 1.0;
        config.validate().unwrap();
        // gRPC cannot frame a message over 4 GiB.
        config.learner.max_message_bytes = u32::MAX as usize + 1;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("learner.max_message_bytes"), "{error}");
    }

    /// Weights travel in one message. Every process refuses a network
    /// beyond any message (an actor too: one too wide to allocate would
    /// abort its rollout thread); the learner also checks its own limit,
    /// which an actor's configuration may set lower (it takes weights up to
    /// the learner's).
    #[test]
    fn a_network_too_large_for_one_message_names_model_hidden() {
        let mut config = Config::default();
        let env = crate::tasks::build(&config.task).unwrap();
        let env = env.as_ref();
        // 2,048 x 2,048 is 4.2 M parameters: 8.4 MB as bf16, 16.8 MB as f32.
        config.model.hidden = vec![2048, 2048];
        let limit = 10 << 20;
        config
            .weights_fit(env, limit, "learner.max_message_bytes")
            .unwrap();
        config.learner.weight_encoding = WeightEncoding::F32;
        let error = config
            .weights_fit(env, limit, "learner.max_message_bytes")
            .unwrap_err()
            .to_string();
        assert!(error.contains("model.hidden"), "{error}");
        assert!(error.contains("learner.max_message_bytes"), "{error}");
        config.learner.max_message_bytes = limit;
        config.validate().unwrap();
        // 32,768 x 32,768 is 1.07 G parameters: 4.3 GB as f32, too large
        // for this f32 learner, but 2.1 GB as bf16, which another learner
        // may send: an actor's configuration says nothing of the learner's
        // encoding, so only that is refused everywhere.
        config.model.hidden = vec![32_768, 32_768];
        config.validate().unwrap();
        let error = config
            .weights_fit(env, u32::MAX as usize, "learner.max_message_bytes")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("learner.weight_encoding = \"bf16\""),
            "{error}"
        );
        config.learner.weight_encoding = WeightEncoding::Bf16;
        let error = config
            .weights_fit(env, 1 << 30, "learner.max_message_bytes")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("weight_encoding"), "{error}");
        config.learner.weight_encoding = WeightEncoding::F32;
        // 49,152 x 49,152 is 2.4 G parameters: 4.8 GB even as bf16.
        config.model.hidden = vec![49_152, 49_152];
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("model.hidden") && error.contains("4 GiB"),
            "{error}"
        );
        config.model.hidden = vec![usize::MAX / 2, usize::MAX / 2];
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("model.hidden"), "{error}");
    }

    #[test]
    fn environment_variables_set_keys_over_the_file_and_name_themselves_in_errors() {
        let dir = std::env::temp_dir().join(format!("flgfn-env-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(
            &file,
            "seed = 3\n[learner]\nlisten = \"127.0.0.1:1\"\nmax_steps = 10\n",
        )
        .unwrap();
        let overrides = env_overrides(vars(&[
            ("FLGFN_LEARNER__LISTEN", "0.0.0.0:50051"),
            ("FLGFN_MODEL__HIDDEN", "[32, 16]"),
            ("FLGFN_ACTOR__LEARNER", "http://learner:50051"),
            ("FLGFN_SEED", "9"),
            ("FLGFN_TOKEN", "not a key"),
            ("FLGFN_LOG_FORMAT", "json"),
            ("HOME", "/root"),
        ]));
        let names: Vec<&str> = overrides.iter().map(|o| o.variable.as_str()).collect();
        assert_eq!(
            names,
            [
                "FLGFN_ACTOR__LEARNER",
                "FLGFN_LEARNER__LISTEN",
                "FLGFN_MODEL__HIDDEN",
                "FLGFN_SEED"
            ]
        );
        let config = Config::load_layered(Some(&file), &overrides).unwrap();
        assert_eq!(
            config.learner.listen, "0.0.0.0:50051",
            "environment over file"
        );
        assert_eq!(config.learner.max_steps, 10, "the file's other keys stay");
        assert_eq!(config.model.hidden, [32, 16]);
        assert_eq!(config.actor.learner, "http://learner:50051");
        assert_eq!(config.seed, 9);
        // No file: over the defaults.
        let config = Config::load_layered(None, &overrides[..1]).unwrap();
        assert_eq!(config.actor.learner, "http://learner:50051");
        assert_eq!(config.learner, Config::default().learner);

        let typo = env_overrides(vars(&[("FLGFN_LEARNER__LISTN", "x")]));
        let error = Config::load_layered(Some(&file), &typo)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("FLGFN_LEARNER__LISTN")
                && error.contains("listn")
                && error.contains("did you mean `listen`?"),
            "{error}"
        );
        let wrong_type = env_overrides(vars(&[("FLGFN_LEARNER__MAX_STEPS", "many")]));
        let error = Config::load_layered(None, &wrong_type)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("FLGFN_LEARNER__MAX_STEPS") && error.contains("max_steps"),
            "{error}"
        );
        let out_of_range = env_overrides(vars(&[("FLGFN_LEARNER__LEARNING_RATE", "-1")]));
        let error = Config::load_layered(None, &out_of_range)
            .unwrap_err()
            .to_string();
        assert!(error.contains("learner.learning_rate"), "{error}");
        let not_a_section = env_overrides(vars(&[("FLGFN_SEED__X", "1")]));
        let error = Config::load_layered(None, &not_a_section)
            .unwrap_err()
            .to_string();
        assert!(error.contains("FLGFN_SEED__X"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A value refused by validation names the flag or variable that set
    /// it (the flag when both did: it wins); one from the file, nothing.
    #[test]
    fn a_refused_value_names_the_flag_or_variable_that_set_it() {
        let mut config = Config::default();
        config.learner.threads = 0;
        let overrides = env_overrides(vars(&[("FLGFN_LEARNER__THREADS", "0")]));
        let by_variable = config
            .validate_layers(&overrides, &[])
            .unwrap_err()
            .to_string();
        assert!(
            by_variable.contains("`learner.threads`")
                && by_variable.ends_with("(set by FLGFN_LEARNER__THREADS)"),
            "{by_variable}"
        );
        let by_flag = config
            .validate_layers(&overrides, &[("--threads", "learner.threads")])
            .unwrap_err()
            .to_string();
        assert!(by_flag.ends_with("(set by --threads)"), "{by_flag}");
        let from_file = config.validate_layers(&[], &[]).unwrap_err().to_string();
        assert!(!from_file.contains("set by"), "{from_file}");
    }

    /// With several variables, an error names the one at fault, not all;
    /// a file at fault keeps its line numbers whatever variables are set.
    #[test]
    fn a_layered_error_names_the_layer_at_fault() {
        let dir = std::env::temp_dir().join(format!("flgfn-blame-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[learner]\nmax_steps = 10\n").unwrap();
        let one_bad = env_overrides(vars(&[
            ("FLGFN_LEARNER__DEVICE", "cpu"),
            ("FLGFN_LEARNER__THREADS", ""),
            ("FLGFN_SEED", "4"),
        ]));
        let error = Config::load_layered(Some(&good), &one_bad)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("FLGFN_LEARNER__THREADS (applied to ")
                && error.contains("learner.threads"),
            "{error}"
        );
        assert!(
            !error.contains("DEVICE") && !error.contains("SEED"),
            "{error}"
        );

        // A variable that fails alone but is right with the others (a
        // lattice key, the task set by a variable) is not the one blamed.
        let lattice = env_overrides(vars(&[
            ("FLGFN_TASK__NAME", "lattice"),
            ("FLGFN_TASK__COUPLING", "1.0"),
            ("FLGFN_TASK__SIDE", "abc"),
        ]));
        let error = Config::load_layered(None, &lattice)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("FLGFN_TASK__SIDE (applied to the defaults): "),
            "{error}"
        );

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "seed = 1\n[learner]\nthreads = \"x\"\n").unwrap();
        let fine = env_overrides(vars(&[("FLGFN_LEARNER__DEVICE", "cpu")]));
        let error = Config::load_layered(Some(&bad), &fine)
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 3"), "{error}");
        assert!(!error.contains("FLGFN_"), "{error}");
        // A variable that mends the file: no error at all.
        let mends = env_overrides(vars(&[("FLGFN_LEARNER__THREADS", "2")]));
        let config = Config::load_layered(Some(&bad), &mends).unwrap();
        assert_eq!(config.learner.threads, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_readme_lists_every_key_with_its_default() {
        let documented = Config::from_toml(readme_block(), "README.md").unwrap();
        assert_eq!(
            documented,
            Config::default(),
            "a README value differs from the code"
        );
        let documented: toml::Table = toml::from_str(readme_block()).unwrap();
        let actual: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        for (section, value) in &actual {
            let Some(table) = value.as_table() else {
                assert!(documented.contains_key(section), "README lacks `{section}`");
                continue;
            };
            for key in table.keys() {
                assert!(
                    documented[section].as_table().unwrap().contains_key(key),
                    "README lacks `{section}.{key}`"
                );
            }
        }
    }

    #[test]
    fn environments_per_actor_default_to_a_fixed_number_of_transitions() {
        // The default task: 20 transitions, ~3.5 KB per trajectory.
        assert_eq!(auto_envs(20, 3_500), 256);
        assert_eq!(auto_envs(80, 14_000), 64);
        // A 16x16 lattice: 20 by transitions (186 MB for 256).
        assert_eq!(auto_envs(256, 728_000), 20);
        // A set task of 4,096 elements: ~520 KB per trajectory of 20.
        assert_eq!(auto_envs(20, 520_000), 32, "held within 16 MB");
        assert_eq!(auto_envs(4096, 1_000), 16, "never fewer than 16");
        assert_eq!(auto_envs(1, 100), 256, "never more than 256");
        // ~4.9 MB per trajectory (4,096 elements, sets of 200): 16 would
        // be a 79 MB chunk, above the default 64 MiB per session.
        assert_eq!(auto_envs(200, 4_940_000), 3, "the byte cap wins over 16");
        assert_eq!(auto_envs(20, 1 << 30), 1, "at least one");
        let default_task = crate::tasks::build(&TaskConfig::default()).unwrap();
        let mut actor = ActorConfig::default();
        assert_eq!(actor.envs_for(default_task.as_ref()), 256);
        actor.envs = 7;
        assert_eq!(
            actor.envs_for(default_task.as_ref()),
            7,
            "a number given is kept"
        );
    }

    #[test]
    fn printed_configuration_reads_back_the_same() {
        let mut config = Config::default();
        config.actor.envs = 3;
        config.learner.device = DeviceConfig::Cpu;
        assert_eq!(
            Config::from_toml(&config.to_toml(), "printed").unwrap(),
            config
        );
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = Config::from_toml("", "test").unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml("[learner]\nlearning_rat = 0.1\n", "test").unwrap_err();
        assert!(err.to_string().contains("learning_rat"), "{err}");
        // What, where and the key meant, on the first line; the file's line
        // below it.
        let message = err.to_string();
        let mut lines = message.lines();
        assert_eq!(
            lines.next(),
            Some(
                "test: line 2, column 1: unknown field `learning_rat`; did you mean `learning_rate`?"
            ),
            "{message}"
        );
        assert!(
            lines.any(|line| line == "2 | learning_rat = 0.1"),
            "{message}"
        );
        let err = Config::from_toml(
            "[task]\nname = \"set_generation\"\nsizes = \"small\"\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("sizes"), "{err}");
        let err = Config::from_toml("[task]\nname = \"chess\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("chess"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let err = Config::from_toml("[actor]\nepsilon = 1.5\n", "t").unwrap_err();
        assert!(err.to_string().contains("actor.epsilon"), "{err}");
        let err = Config::from_toml("[learner]\nlearning_rate = -1.0\n", "t").unwrap_err();
        assert!(err.to_string().contains("learner.learning_rate"), "{err}");
        let err =
            Config::from_toml("[learner]\nbatch_transitions = 1099511627776\n", "t").unwrap_err();
        assert!(
            err.to_string().contains("learner.batch_transitions"),
            "{err}"
        );
        let err = Config::from_toml("[learner]\nfirst_report_s = 9.0\n", "t").unwrap_err();
        assert!(err.to_string().contains("learner.first_report_s"), "{err}");
        // A seed a flag can give but TOML (a file, FLGFN_SEED) cannot hold.
        let huge_seed = Config {
            seed: u64::MAX,
            ..Config::default()
        };
        let err = huge_seed.validate().unwrap_err();
        assert!(err.to_string().contains("`seed`"), "{err}");
        for stall in ["0.0", "-1.0", "1e-9", "1e30", "nan"] {
            let toml = format!("[learner]\nstall_timeout_s = {stall}\n");
            let err = Config::from_toml(&toml, "t").unwrap_err();
            assert!(
                err.to_string().contains("learner.stall_timeout_s"),
                "{stall}: {err}"
            );
        }
        for idle in ["0.5", "1e30", "nan"] {
            let toml = format!("[learner]\nidle_connection_s = {idle}\n");
            let err = Config::from_toml(&toml, "t").unwrap_err();
            assert!(
                err.to_string().contains("learner.idle_connection_s"),
                "{idle}: {err}"
            );
        }
        let err = Config::from_toml("[model]\nhidden = []\n", "t").unwrap_err();
        assert!(err.to_string().contains("model.hidden"), "{err}");
        // Both huge: the room's ceiling would overflow.
        let huge = "[learner]\nmax_policy_lag = 4611686018427387904\nmax_in_flight_batches = 4611686018427387904\n";
        let err = Config::from_toml(huge, "t").unwrap_err();
        assert!(
            err.to_string().contains("learner.max_in_flight_batches"),
            "{err}"
        );
        // A lag bound below the default room: the error says which default.
        let err = Config::from_toml("[learner]\nmax_policy_lag = 16\n", "t").unwrap_err();
        assert!(
            err.to_string().contains("learner.max_in_flight_batches")
                && err.to_string().contains("its default, 48"),
            "{err}"
        );
        // The room in batches plus how old the actors' weights may be,
        // past the bound: accepted, with a warning saying what to change.
        let warned = |text: &str| {
            Config::from_toml(text, "t")
                .unwrap()
                .learner
                .lag_bound_warning()
        };
        assert_eq!(warned("[learner]\nmax_policy_lag = 50\n"), None);
        let warning = warned("[learner]\nmax_policy_lag = 49\n").unwrap();
        assert!(
            warning.contains("max_in_flight_batches (48) + publish_every (1) + weights_refresh_steps (1) is more than max_policy_lag (49)"),
            "{warning}"
        );
        assert!(warned("[learner]\nweights_refresh_steps = 16\n").is_some());
    }

    #[test]
    fn a_task_section_without_a_name_changes_the_default_task() {
        let set_size = |config: &Config| match &config.task {
            TaskConfig::SetGeneration(set) => set.set_size,
            other => panic!("the default task, got {other:?}"),
        };
        let config = Config::from_toml("[task]\nset_size = 3\n", "t").unwrap();
        assert_eq!(set_size(&config), Some(3));
        let overrides = env_overrides(vars(&[("FLGFN_TASK__SET_SIZE", "3")]));
        let config = Config::load_layered(None, &overrides).unwrap();
        assert_eq!(set_size(&config), Some(3));
        // Another task's key on the default task is an error naming it.
        let error = Config::from_toml("[task]\nside = 4\n", "t")
            .unwrap_err()
            .to_string();
        assert!(error.contains("side"), "{error}");
        // A named task is left as it is.
        let config = Config::from_toml("[task]\nname = \"lattice\"\n", "t").unwrap();
        assert!(matches!(config.task, TaskConfig::Lattice(_)), "{config:?}");
    }

    #[test]
    fn an_unusable_learner_url_or_an_endless_wait_is_refused_by_name() {
        for (toml, field, says) in [
            (
                "[actor]\nlearner = \"10.0.0.5:50051\"\n",
                "actor.learner",
                "http://",
            ),
            (
                "[actor]\nlearner = \"http://\"\n",
                "actor.learner",
                "no host",
            ),
            (
                "[actor]\nlearner = \"https://:50051\"\n",
                "actor.learner",
                "no host",
            ),
            (
                "[actor]\nlearner = \"http://127.0.0.1:99999\"\n",
                "actor.learner",
                "\"99999\" is no port",
            ),
            (
                "[actor]\nlearner = \"http://learner:0\"\n",
                "actor.learner",
                "is no port",
            ),
            (
                "[actor]\nlearner = \"http://learner:\"\n",
                "actor.learner",
                "is no port",
            ),
            (
                "[actor]\nlearner = \"http://127.0.0.1 :50051\"\n",
                "actor.learner",
                "holds ' '",
            ),
            (
                "[actor]\nkeepalive_s = 1e20\n",
                "actor.keepalive_s",
                "a day",
            ),
            ("[actor]\nkeepalive_s = 0.001\n", "actor.keepalive_s", "1"),
            ("[learner]\nkeepalive_s = 0.5\n", "learner.keepalive_s", "1"),
            (
                "[learner]\nbatch_transitions = 5000\n",
                "learner.max_batch_transitions",
                "2560 is less than learner.batch_transitions (5000): a batch starts at batch_transitions and grows up to max_batch_transitions (by default 2560)",
            ),
            (
                "[learner]\nkeepalive_s = 1e20\n",
                "learner.keepalive_s",
                "a day",
            ),
            (
                "[actor]\nprogress_log_s = 0.5\n",
                "actor.progress_log_s",
                "1",
            ),
            (
                "[actor]\nreconnect_initial_s = 1e-12\n",
                "actor.reconnect_initial_s",
                "0.01",
            ),
            (
                "[actor]\nreconnect_max_s = 1e19\n",
                "actor.reconnect_max_s",
                "a day",
            ),
        ] {
            let error = Config::from_toml(toml, "t").unwrap_err().to_string();
            assert!(
                error.contains(field) && error.contains(says),
                "{toml}: {error}"
            );
        }
        for url in [
            "http://learner:50051",
            "https://10.0.0.5:443/",
            "http://[::1]:50051",
            "http://[::1]",
            "https://learner.example.org",
            "https://ingress.example.org/flgfn",
            "http://user:secret@learner:50051",
        ] {
            let toml = format!("[actor]\nlearner = \"{url}\"\n");
            assert!(Config::from_toml(&toml, "t").is_ok(), "{url}");
        }
    }

    #[test]
    fn a_blank_checkpoint_folder_is_refused() {
        let error = Config::from_toml("[learner]\ncheckpoint_dir = \"   \"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("learner.checkpoint_dir") && error.contains("blank"),
            "{error}"
        );
        assert!(Config::from_toml("[learner]\ncheckpoint_dir = \"\"\n", "t").is_ok());
    }

    #[test]
    fn settings_that_would_stall_training_are_refused_by_name() {
        let error = Config::from_toml("[learner]\npublish_every = 100\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("learner.publish_every") && error.contains("max_policy_lag (64)"),
            "{error}"
        );
        let error = Config::from_toml(
            "[learner]\nweights_refresh_steps = 40\npublish_every = 30\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("learner.weights_refresh_steps"), "{error}");
        let error = Config::from_toml("[launch]\nactors = 0\n", "t")
            .unwrap_err()
            .to_string();
        assert!(error.contains("launch.actors"), "{error}");
        // The listen address: host:port, named when it is not.
        for listen in [
            "0.0.0.0:50051",
            "[::]:50051",
            "localhost:1",
            "learner.internal:0",
        ] {
            let toml = format!("[learner]\nlisten = \"{listen}\"\n");
            assert!(Config::from_toml(&toml, "t").is_ok(), "{listen}");
        }
        for (listen, why) in [
            ("50051", "is not host:port"),
            ("[::1]", "is not host:port"),
            (":50051", "has no host"),
            ("::1:50051", "without brackets"),
            ("localhost:http", "no port number"),
            ("localhost:70000", "no port number"),
        ] {
            let toml = format!("[learner]\nlisten = \"{listen}\"\n");
            let error = Config::from_toml(&toml, "t").unwrap_err().to_string();
            assert!(
                error.contains("learner.listen") && error.contains(why),
                "{listen}: {error}"
            );
        }
        for (toml, field) in [
            ("[learner]\nthreads = 1000000\n", "learner.threads"),
            (
                "[learner]\neval_samples = 1000000000\n",
                "learner.eval_samples",
            ),
            ("[actor]\nthreads = 100000\n", "actor.threads"),
        ] {
            let error = Config::from_toml(toml, "t").unwrap_err().to_string();
            assert!(
                error.contains(field) && error.contains("more than"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_variable_that_reads_as_a_number_may_set_a_text_key() {
        let overrides = env_overrides(vars(&[
            ("FLGFN_LEARNER__CHECKPOINT_DIR", "123456"),
            ("FLGFN_LEARNER__MAX_STEPS", "77"),
        ]));
        let config = Config::load_layered(None, &overrides).unwrap();
        assert_eq!(config.learner.checkpoint_dir, "123456");
        assert_eq!(config.learner.max_steps, 77);
        // Two of them at once.
        let overrides = env_overrides(vars(&[
            ("FLGFN_LEARNER__CHECKPOINT_DIR", "123456"),
            ("FLGFN_AUTH__TOKEN_FILE", "2024"),
            ("FLGFN_LEARNER__MAX_STEPS", "77"),
        ]));
        let config = Config::load_layered(None, &overrides).unwrap();
        assert_eq!(config.learner.checkpoint_dir, "123456");
        assert_eq!(config.auth.token_file, "2024");
        assert_eq!(config.learner.max_steps, 77);
        // A number for a number key is still refused when it is text.
        let overrides = env_overrides(vars(&[("FLGFN_LEARNER__MAX_STEPS", "many")]));
        let error = Config::load_layered(None, &overrides)
            .unwrap_err()
            .to_string();
        assert!(error.contains("FLGFN_LEARNER__MAX_STEPS"), "{error}");
    }

    #[test]
    fn single_underscore_section_variables_are_named_as_misspelt() {
        let names = [
            "FLGFN_LEARNER_THREADS",
            "FLGFN_ACTOR_ENVS",
            "FLGFN_LEARNER__THREADS",
            "FLGFN_TOKEN",
            "FLGFN_HEALTH_ADDRESS",
            "FLGFN_ACTOR_BIN",
            "FLGFN_TASKS",
            "PATH",
        ]
        .map(str::to_owned);
        let named = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|&(a, b)| (a.to_owned(), b.to_owned()))
                .collect()
        };
        assert_eq!(
            misspelt_variables(names),
            named(&[
                ("FLGFN_ACTOR_ENVS", "FLGFN_ACTOR__ENVS"),
                ("FLGFN_LEARNER_THREADS", "FLGFN_LEARNER__THREADS")
            ])
        );
        for (name, meant) in [
            ("FLGFN_AUTH_TOKEN_FILE", "FLGFN_AUTH__TOKEN_FILE"),
            ("FLGFN_TLS_CA_FILE", "FLGFN_TLS__CA_FILE"),
            // A key without its section, or a section alone.
            ("FLGFN_LISTEN", "FLGFN_LEARNER__LISTEN"),
            ("FLGFN_MAX_STEPS", "FLGFN_LEARNER__MAX_STEPS"),
            (
                "FLGFN_THREADS",
                "FLGFN_ACTOR__THREADS or FLGFN_LEARNER__THREADS",
            ),
            ("FLGFN_TASK", "FLGFN_TASK__<KEY>"),
            // Every task's keys, set or not in the defaults.
            ("FLGFN_TASK_SET_SIZE", "FLGFN_TASK__SET_SIZE"),
            ("FLGFN_SIDE", "FLGFN_TASK__SIDE"),
            (
                "FLGFN_LEARNER",
                "FLGFN_ACTOR__LEARNER or FLGFN_LEARNER__<KEY>",
            ),
            // Misspelt variables of their own, and keys without underscores.
            ("FLGFN_TOKN", "FLGFN_TOKEN"),
            ("FLGFN_SEDD", "FLGFN_SEED"),
            ("FLGFN_SEEDS", "FLGFN_SEED"),
            ("FLGFN_LOG_FROMAT", "FLGFN_LOG_FORMAT"),
            ("FLGFN_RESUME_CHANGE", "FLGFN_RESUME_CHANGED"),
            ("FLGFN_HEALTH_ADRESS", "FLGFN_HEALTH_ADDRESS"),
            ("FLGFN_MAXSTEPS", "FLGFN_LEARNER__MAX_STEPS"),
        ] {
            assert_eq!(meant_variable(name).as_deref(), Some(meant), "{name}");
        }
        // Variables of their own, and the scripts', name no key.
        for name in [
            "FLGFN_ACTOR_BIN",
            "FLGFN_SEED",
            "FLGFN_TOKEN",
            "FLGFN_CONFIG",
            "FLGFN_LOG_FORMAT",
            "FLGFN_RESUME_CHANGED",
            "FLGFN_PORT",
            "FLGFN_JOB",
            "FLGFN_BUILD_COMMIT",
            "FLGFN_CACHE_DIR",
        ] {
            assert_eq!(meant_variable(name), None, "{name}");
        }
    }

    /// A variable that is not UTF-8 is skipped unless it is an `FLGFN_`
    /// configuration key, which is an error naming it; a path in
    /// `FLGFN_CONFIG` may be in any encoding.
    #[cfg(unix)]
    #[test]
    fn only_flgfn_variables_must_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let os = |text: &str| OsString::from(text);
        let latin1 = || OsString::from_vec(b"caf\xe9".to_vec());
        let found = flgfn_variables_of([
            (os("LC_NAME"), latin1()),
            (OsString::from_vec(b"NAME_\xe9".to_vec()), os("x")),
            (os("FLGFN_SEED"), os("7")),
            (os("FLGFN_CONFIG"), latin1()),
            (os("PATH"), os("/bin")),
        ])
        .unwrap();
        assert_eq!(found, vars(&[("FLGFN_SEED", "7")]));
        for key in [
            "FLGFN_SEED",
            "FLGFN_TASK__SET_SIZE",
            "FLGFN_LEARNER_CHECKPOINT_DIR",
        ] {
            let error = flgfn_variables_of([(os(key), latin1())])
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{error}");
            assert!(error.contains("not UTF-8"), "{error}");
        }
        let error = flgfn_variables_of([(OsString::from_vec(b"FLGFN_\xe9".to_vec()), os("1"))])
            .unwrap_err()
            .to_string();
        assert!(error.contains("FLGFN_"), "{error}");
        assert!(error.contains("name is not UTF-8"), "{error}");
    }

    #[test]
    fn a_flag_can_correct_what_the_file_got_wrong() {
        let path = std::env::temp_dir().join(format!("flgfn-flag-fix-{}.toml", std::process::id()));
        std::fs::write(&path, "[actor]\nlearner = \"learner:50051\"\n").unwrap();
        let error = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("actor.learner") && error.contains("http://"),
            "{error}"
        );
        let mut config = Config::load_unvalidated(Some(&path)).unwrap();
        config.actor.learner = "http://learner:50051".to_owned();
        config.validate().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_overrides_only_what_it_names() {
        let config = Config::from_toml(
            "seed = 7\n[task]\nname = \"set_generation\"\nsize = \"medium\"\n[launch]\nactors = 5\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.seed, 7);
        assert_eq!(config.launch.actors, 5);
        assert_eq!(config.learner, LearnerConfig::default());
        let TaskConfig::SetGeneration(set) = &config.task else {
            panic!("a set task")
        };
        assert_eq!(set.size, crate::tasks::set_generation::SetSize::Medium);
    }
}
