//! Checkpoints: everything a learner needs to continue a run after a crash,
//! a preemption or a stop, in one safetensors file per checkpoint.
//!
//! A checkpoint holds the policy weights (`policy/<name>`), the Adam
//! moments (`adam/m/<name>`, `adam/v/<name>`), the objective's own
//! parameters and their Adam (`objective/...`, `objective_adam/...`), and
//! in the header's metadata a JSON [`CheckpointState`] (step, from which
//! the learning-rate schedule continues, weight version, whole-run totals,
//! the evaluator's running state, the whole configuration) plus a CRC-32
//! over that JSON and every tensor's name and values. A torn write or a
//! flipped byte fails the safetensors parse (which also checks that each
//! shape fills its bytes) or the checksum; loading then reports it and
//! falls back to the previous checkpoint. Two exceptions stop the learner
//! instead, naming the file: a flipped digit of the state's `format`,
//! which reads as another version's checkpoint (falling back would lose
//! its progress if it were one), and shapes rewritten with the same
//! product, which the sum does not cover and loading refuses.
//!
//! Files are written atomically: a temporary file in the same directory,
//! fsync, rename over the final name, fsync of the directory; during
//! training, by a [`Writer`] on a thread of its own. The last
//! `learner.keep_checkpoints` are kept, and beside them, where it is
//! older, the newest one at or before the last step known sound, so that
//! a run that diverges keeps one to go back to (see [`Keep`]); the step
//! travels in each checkpoint, across restarts. Names carry the step
//! (`ckpt-000000001200.safetensors`), so the newest sorts last. The final
//! weights of a run also go to `final.safetensors` (f32 whatever the wire
//! encoding, in the format actors receive, loadable with
//! `Policy::load_bytes`, PyTorch, NumPy or JAX).
//!
//! # Layout
//!
//! - `mod.rs`: the format: the state, the file's keys and checksum,
//!   saving one checkpoint and reading one back;
//! - `folder_lock.rs`: one learner at a time in a folder ([`lock`]);
//! - `writer.rs`: the background [`Writer`];
//! - `recovery.rs`: the checkpoint to resume from ([`load_latest`]),
//!   damaged ones set aside;
//! - `retention.rs`: what stays in the folder ([`prune`], [`Keep`]), the
//!   version floor, and `--fresh` ([`clear`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use flgfn_common::config::WeightEncoding;
use flgfn_common::policy::Policy;
use flgfn_common::weights::{self, NamedArray};
use serde::{Deserialize, Serialize};

use crate::durable_file::{self, FileError};
use crate::error::LearnerError;

mod folder_lock;
mod recovery;
mod retention;
mod writer;

pub use folder_lock::{FolderLock, LOCK, lock};
pub use recovery::{DAMAGED_KEPT, load_latest, load_latest_to_read, set_aside};
pub use retention::{
    Keep, clear, floor_above, newest_at_or_before, prune, read_version_floor,
    remove_unfinished_writes, write_version_floor,
};
pub use writer::Writer;

/// Version of the checkpoint layout; a different one is refused.
pub const FORMAT: u32 = 1;

/// Metadata key of the JSON state.
pub const STATE_KEY: &str = "flgfn_checkpoint";

/// Metadata key of the checksum.
const CHECKSUM_KEY: &str = "crc32";

/// Name of a run's final weights in the checkpoint directory.
pub const FINAL_WEIGHTS: &str = "final.safetensors";

/// Name of the file holding the version floor: no version above it has
/// been published (and if it was, with the newest checkpoint's weights:
/// after a clean stop the floor is the final version), so a restarted
/// learner starts there, whatever checkpoint it resumes from. While
/// training, the floor runs ahead of the published versions.
pub const VERSION_FLOOR: &str = "version-floor";

/// How far ahead of the newest version the floor is moved (one small
/// synchronous write per this many versions).
pub const VERSION_FLOOR_STRIDE: u64 = 1000;

/// The best objects an evaluator has seen and how many samples it drew.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluatorState {
    /// Evaluation samples drawn so far.
    pub samples_so_far: u64,
    /// (energy, state) of the best distinct objects.
    pub best: Vec<(f64, Vec<i8>)>,
}

/// Everything but tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`FORMAT`].
    pub format: u32,
    /// Training steps done.
    pub step: u64,
    /// Version of these weights: the number they were published under, or
    /// would have been (a checkpoint between two publications with
    /// `publish_every` > 1). Versions continue from it; never below
    /// `step`. (Checkpoints before this field's meaning was fixed may hold
    /// the last published version, lower: resume takes the larger of it
    /// and `step`.)
    pub version: u64,
    /// Seconds of training so far (reports continue from it).
    pub wall_s: f64,
    /// Transitions trained so far.
    pub trained_transitions: u64,
    /// When the run first reached quality, in `wall_s`.
    pub time_to_quality_s: Option<f64>,
    /// Whole-run figures that continue across a resume (absent from
    /// checkpoints written before they were kept: zero).
    #[serde(default)]
    pub totals: ResumedTotals,
    /// Adam steps of the policy optimizer.
    pub adam_steps: u64,
    /// Adam steps of the objective's own optimizer.
    pub objective_adam_steps: u64,
    /// The evaluator's running state.
    pub evaluator: EvaluatorState,
    /// The configuration of the process that wrote this checkpoint, as
    /// TOML: the run's, but for keys a resume may change (the budget, the
    /// cadence, addresses; the rest only with `--resume-changed`).
    pub config: String,
    /// Task and model, as the handshake names them: a checkpoint of another
    /// task or network is refused.
    pub task: String,
    /// See `task`.
    pub model: String,
    /// The build that wrote it ([`crate::BUILD`]), for the record: a
    /// resume from another build is allowed and logs both. Empty in
    /// checkpoints written before it was kept.
    #[serde(default)]
    pub build: String,
    /// The last step the writing run knew sound (see [`Keep`]): a
    /// restarted run goes on keeping that checkpoint, not the diverged one
    /// it resumes from.
    #[serde(default)]
    pub sound_through: SoundThrough,
}

/// The last step a run knew sound: its last report with every step and
/// draw finite, or what the checkpoint it resumed from recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SoundThrough {
    /// Not recorded (checkpoints written before it was): a run resumed
    /// from one counts that checkpoint as sound.
    #[default]
    Unknown,
    /// No step was known sound (a run that diverged before its first
    /// sound report).
    Nothing,
    /// This step.
    Step(u64),
}

impl SoundThrough {
    /// The step recorded, if one was.
    pub fn step(self) -> Option<u64> {
        match self {
            SoundThrough::Step(step) => Some(step),
            SoundThrough::Unknown | SoundThrough::Nothing => None,
        }
    }
}

/// Sums over the whole run that a resumed run goes on adding to, so that
/// its final figures cover every step, not only its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResumedTotals {
    /// Sum over trained transitions of their policy lag.
    pub lag_weighted: f64,
    /// Largest lag trained.
    pub max_lag: u64,
    /// Seconds the trainer waited for data.
    pub waiting_s: f64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_batches: u64,
}

/// A checkpoint read back and verified.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file it came from.
    pub path: PathBuf,
    /// Its state.
    pub state: CheckpointState,
    /// Its tensors, by name.
    pub arrays: Vec<NamedArray>,
    /// Newer checkpoints that read back damaged (torn, corrupt), skipped
    /// for this one: a learner resuming from it sets them aside
    /// ([`set_aside`]); a reader leaves them.
    pub damaged_newer: Vec<PathBuf>,
}

impl Checkpoint {
    /// The refusal of this checkpoint, intact (its checksum held) but not
    /// usable for `why`: named, with the way to an older one.
    pub fn unusable(&self, why: impl std::fmt::Display) -> LearnerError {
        LearnerError::Checkpoint(format!(
            "{}: {why}; {}",
            self.path.display(),
            older_one_remedy(&self.path)
        ))
    }

    /// The tensors whose names start with `prefix/`, with the prefix
    /// removed.
    pub fn group(&self, prefix: &str) -> Vec<NamedArray> {
        let start = format!("{prefix}/");
        self.arrays
            .iter()
            .filter_map(|a| {
                a.name.strip_prefix(&start).map(|name| NamedArray {
                    name: name.to_owned(),
                    shape: a.shape.clone(),
                    values: a.values.clone(),
                })
            })
            .collect()
    }

    /// Loads this checkpoint's policy into `policy` after checking that it
    /// was trained on `task` with `model` (their descriptions). The error
    /// names the file and, for another run's, both descriptions.
    pub fn load_policy(
        &self,
        policy: &mut Policy,
        task: &str,
        model: &str,
    ) -> Result<(), PolicyRefused> {
        let state = &self.state;
        if state.task != task || state.model != model {
            return Err(PolicyRefused::AnotherRun(format!(
                "{} is of task {} and model {}, this configuration's are {task} and {model}",
                self.path.display(),
                state.task,
                state.model
            )));
        }
        policy
            .load_weights(&self.group("policy"))
            .map_err(|e| PolicyRefused::Unusable(format!("the policy's (`policy/`) {e}")))
    }
}

/// Why a checkpoint's policy was not loaded: the remedies differ.
#[derive(Debug)]
pub enum PolicyRefused {
    /// Trained on another task or model: another run's folder, or this
    /// run's job file not given.
    AnotherRun(String),
    /// Its own task and model, but weights that cannot be loaded (a NaN
    /// from a diverged run, a tensor missing): an older checkpoint may do.
    /// Why, without the checkpoint's path ([`Checkpoint::unusable`] adds
    /// it, with that remedy).
    Unusable(String),
}

impl std::fmt::Display for PolicyRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyRefused::AnotherRun(why) | PolicyRefused::Unusable(why) => f.write_str(why),
        }
    }
}

/// What a resuming learner can do with an intact checkpoint it cannot
/// use: resume from the one before it.
pub fn older_one_remedy(path: &Path) -> String {
    older_one_remedy_in(path.parent().unwrap_or(Path::new(".")))
}

/// [`older_one_remedy`] for a checkpoint in `folder`.
pub(crate) fn older_one_remedy_in(folder: &Path) -> String {
    format!(
        "move it out of {} to resume from the checkpoint before it (--fresh deletes them all and starts over)",
        folder.display()
    )
}

/// `arrays` under `prefix/`.
pub fn prefixed(prefix: &str, arrays: Vec<NamedArray>) -> impl Iterator<Item = NamedArray> {
    arrays.into_iter().map(move |mut a| {
        a.name = format!("{prefix}/{}", a.name);
        a
    })
}

/// CRC-32 over the state and every tensor, taken in name order (the order
/// of the file, whatever order they were given in).
fn checksum(state_json: &str, arrays: &[NamedArray]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(state_json.as_bytes());
    let mut sorted: Vec<&NamedArray> = arrays.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for array in sorted {
        hasher.update(array.name.as_bytes());
        for value in &array.values {
            hasher.update(&value.to_le_bytes());
        }
    }
    hasher.finalize()
}

fn file_name(step: u64) -> String {
    format!("ckpt-{step:012}.safetensors")
}

/// The step a checkpoint's file name gives ([`file_name`]'s inverse: the
/// name exactly as it writes it).
fn named_step(name: &str) -> Option<u64> {
    let step = name
        .strip_prefix("ckpt-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()?;
    // Exactly as written: `ckpt-5` or `ckpt-+5` beside `ckpt-000000000005`
    // would be two checkpoints of one step.
    (file_name(step) == name).then_some(step)
}

/// A file error in the checkpoint folder, with what the user can change
/// where a file is in the way.
fn checkpoint_error(error: FileError) -> LearnerError {
    match error {
        FileError::NotAFolder { path } => LearnerError::Checkpoint(format!(
            "{}: not a folder (learner.checkpoint_dir, or one of its parents, is a file): move it away, or choose another learner.checkpoint_dir",
            path.display()
        )),
        error => LearnerError::Checkpoint(error.to_string()),
    }
}

/// A failed file operation in the checkpoint folder, named by its path.
fn io_error(path: &Path, source: std::io::Error) -> LearnerError {
    checkpoint_error(FileError::at(path, source))
}

/// Writes one file of the checkpoint folder (a checkpoint, the final
/// weights, the version floor) whole or not at all, making the folder
/// where it is missing.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, LearnerError> {
    durable_file::write_atomically(dir, name, bytes).map_err(checkpoint_error)
}

impl CheckpointState {
    /// Refuses a state no learner writes, naming the field: counters
    /// that would wrap, real numbers that are not, a sound step past the
    /// step. Checked before a save and on a resume (the checksum proves a
    /// file is as written, not that a learner wrote it).
    pub fn check(&self) -> Result<(), String> {
        check_counters(self)?;
        check_floats(self)
    }
}

/// Largest count a checkpoint may hold (steps, transitions, samples): far
/// beyond any run (2^62 steps at a microsecond each is 146,000 years), and
/// low enough that the counters cannot wrap as a run adds to them.
pub(crate) const COUNTER_LIMIT: u64 = u64::MAX / 4;

/// Refuses a checkpoint state whose counters no learner writes: they
/// would wrap as training adds to them (a hand-made or crafted file: the
/// checksum proves a file is as written, not that a learner wrote it).
fn check_counters(state: &CheckpointState) -> Result<(), String> {
    for (field, value) in [
        ("step", state.step),
        ("trained_transitions", state.trained_transitions),
        ("evaluator.samples_so_far", state.evaluator.samples_so_far),
        // Not tied to the step: a step that libtorch failed half-way
        // through leaves the policy's optimizer one ahead, which adds up
        // across such failures and resumes (Adam's t saturates anyway).
        ("adam_steps", state.adam_steps),
        ("objective_adam_steps", state.objective_adam_steps),
        ("totals.skipped_batches", state.totals.skipped_batches),
    ] {
        if value > COUNTER_LIMIT {
            return Err(format!(
                "state field `{field}` is {value}, beyond what a learner counts ({COUNTER_LIMIT})"
            ));
        }
    }
    Ok(())
}

/// The state's real numbers and the step known sound, as a run writes
/// them: durations finite and not negative, best energies finite, the sound step not past the
/// step. JSON has no NaN (it would be written as `null` and the
/// checkpoint never read back).
fn check_floats(state: &CheckpointState) -> Result<(), String> {
    let never_negative = [
        ("wall_s", Some(state.wall_s), "a duration"),
        ("time_to_quality_s", state.time_to_quality_s, "a duration"),
        (
            "totals.waiting_s",
            Some(state.totals.waiting_s),
            "a duration",
        ),
        (
            "totals.lag_weighted",
            Some(state.totals.lag_weighted),
            "a sum of lags",
        ),
    ];
    for (field, value, what) in never_negative {
        if let Some(value) = value
            && !(value.is_finite() && value >= 0.0)
        {
            return Err(format!("state field `{field}` is {value}, not {what}"));
        }
    }
    if let Some((energy, _)) = state
        .evaluator
        .best
        .iter()
        .find(|(energy, _)| !energy.is_finite())
    {
        return Err(format!(
            "state field `evaluator.best` holds an object of energy {energy}"
        ));
    }
    if let SoundThrough::Step(sound) = state.sound_through
        && sound > state.step
    {
        return Err(format!(
            "state field `sound_through` is step {sound}, past its `step` {}",
            state.step
        ));
    }
    Ok(())
}

/// Saves one checkpoint and prunes the older ones (see [`prune`]).
pub fn save(
    dir: &Path,
    state: &CheckpointState,
    arrays: &[NamedArray],
    keep: Keep,
) -> Result<PathBuf, LearnerError> {
    let cannot = |what: String| LearnerError::Checkpoint(format!("{}: {what}", dir.display()));
    state
        .check()
        .map_err(|e| cannot(format!("cannot save step {}: {e}", state.step)))?;
    let json = serde_json::to_string(state).map_err(|e| {
        cannot(format!(
            "cannot encode the state of step {}: {e}",
            state.step
        ))
    })?;
    let metadata = BTreeMap::from([
        (CHECKSUM_KEY.to_owned(), checksum(&json, arrays).to_string()),
        (STATE_KEY.to_owned(), json),
    ]);
    let bytes = weights::encode(arrays, WeightEncoding::F32, &metadata).map_err(|e| {
        cannot(format!(
            "cannot encode the checkpoint of step {}: {e}",
            state.step
        ))
    })?;
    let path = write_file(dir, &file_name(state.step), &bytes)?;
    prune(dir, keep)?;
    Ok(path)
}

/// Checkpoint files in `dir`, oldest first, with their steps.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LearnerError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(named_step) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Reads and verifies one checkpoint file; an error names it.
pub fn read(path: &Path) -> Result<Checkpoint, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(path, &bytes).map_err(|unusable| match unusable {
        Unusable::Damaged(reason) | Unusable::OtherVersion(reason) => {
            format!("{}: {reason}", path.display())
        }
    })
}

/// Why a checkpoint file cannot be resumed from.
enum Unusable {
    /// Torn or corrupt: an older checkpoint can stand in for it.
    Damaged(String),
    /// In another format than this learner reads (named in a state that
    /// parses, whatever its checksum, which that format may sum
    /// otherwise), or intact but not readable: another version of flgfn
    /// wrote it. Not damage: resuming from
    /// an older checkpoint instead would quietly lose its progress, and
    /// setting it aside would hide it.
    OtherVersion(String),
}

/// Only the format number of a checkpoint's state, read before the rest
/// (whose fields another format may change).
#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

/// Verifies the bytes of checkpoint file `path`.
fn parse(path: &Path, bytes: &[u8]) -> Result<Checkpoint, Unusable> {
    let damaged = Unusable::Damaged;
    let unreadable = |e: weights::WeightsError| format!("not a readable safetensors file: {e}");
    // The header first: another format may store tensors this learner
    // cannot decode (another dtype), which must not read as damage.
    let metadata = weights::decode_metadata(bytes).map_err(|e| damaged(unreadable(e)))?;
    let json = metadata
        .get(STATE_KEY)
        .ok_or_else(|| damaged("no checkpoint state in its metadata".to_owned()))?;
    let decoded = weights::decode(bytes);
    // Another format is named before the checksum is checked: the
    // version that wrote it may sum otherwise, and calling it damage
    // would resume from an older checkpoint, quietly losing its progress.
    // (A torn state does not parse, and is checked as damage below.)
    let other = Unusable::OtherVersion;
    let stored: Option<u32> = metadata.get(CHECKSUM_KEY).and_then(|c| c.parse().ok());
    let format = serde_json::from_str::<FormatOnly>(json);
    if let Ok(FormatOnly { format }) = format
        && format != FORMAT
    {
        // Formats start at 1: a 0 is a flipped digit.
        if format == 0 {
            return Err(damaged(
                "checkpoint format 0, which no version writes: corrupt".to_owned(),
            ));
        }
        // Still another version's, but a person deciding should know
        // that a flipped digit reads the same.
        let hint = match &decoded {
            Ok(decoded) if stored == Some(checksum(json, &decoded.arrays)) => String::new(),
            Ok(_) => ", and its checksum does not hold by this learner's sum: if no other version wrote it, it is damaged".to_owned(),
            Err(e) => format!("; its tensors are not readable here: {e}"),
        };
        return Err(other(format!(
            "checkpoint format {format} (this learner reads {FORMAT}{hint})"
        )));
    }
    let decoded = decoded.map_err(|e| damaged(unreadable(e)))?;
    let actual = checksum(json, &decoded.arrays);
    let stored = stored.ok_or_else(|| damaged("no checksum in its metadata".to_owned()))?;
    if stored != actual {
        return Err(damaged(format!(
            "checksum mismatch (stored {stored:08x}, contents {actual:08x}): torn or corrupt"
        )));
    }
    // Past the checksum, the state is as it was written: one whose format
    // number does not parse comes from another version.
    format.map_err(|e| other(format!("state without a format number: {e}")))?;
    let state: CheckpointState = serde_json::from_str(json)
        .map_err(|e| other(format!("state this learner cannot read: {e}")))?;
    Ok(Checkpoint {
        path: path.to_owned(),
        state,
        arrays: decoded.arrays,
        damaged_newer: Vec::new(),
    })
}

#[cfg(test)]
mod tests;
