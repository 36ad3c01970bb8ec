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

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use flgfn_common::config::WeightEncoding;
use flgfn_common::policy::Policy;
use flgfn_common::weights::{self, NamedArray};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::durable_file::{self, FileError, create_dir_durably, temporary_name};
use crate::error::LearnerError;

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
        policy.load_weights(&self.group("policy")).map_err(|e| {
            PolicyRefused::Unusable(format!(
                "{}: the policy's (`policy/`) {e}",
                self.path.display()
            ))
        })
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
    let folder = path.parent().unwrap_or(Path::new("."));
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

/// The step a checkpoint's file name gives ([`file_name`]'s inverse, for
/// any number of digits).
fn named_step(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// The file a learner writes and deletes at start, to find a folder it
/// cannot write in (see [`lock`]).
const WRITE_PROBE: &str = "write-probe";

/// Name of the file a learner locks while it uses a checkpoint folder.
pub const LOCK: &str = "lock";

/// A checkpoint folder held by this learner (see [`lock`]) until dropped.
///
/// A start refused once the folder is open (a wrong `--metrics`, a
/// checkpoint of another run) leaves nothing behind: when dropped, a lock
/// file this learner made goes where it is all the folder holds, and so do
/// the folders made for it, while empty. Anything else written there (a
/// checkpoint, a version floor) keeps the folder as it is.
#[derive(Debug)]
pub struct FolderLock {
    /// The locked file, None where the file system has no locks (then
    /// nothing is removed). Closed (and the lock let go) only after
    /// `drop` has removed what it made: a learner that opened the file
    /// meanwhile finds it locked, or, locking it after, gone from its
    /// place, and locks the one there (see [`lock`]).
    file: Option<File>,
    dir: PathBuf,
    /// A lock file left by an earlier run stays: its holder text may be
    /// what someone is reading.
    made_lock_file: bool,
    /// Folders made for this one, itself first.
    made_folders: Vec<PathBuf>,
}

impl FolderLock {
    /// Whether the file system locked it (else only a warning was logged).
    pub fn is_locked(&self) -> bool {
        self.file.is_some()
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Without a lock (a file system without locks) there is no
        // knowing whether another learner uses the file.
        if !self.made_lock_file || self.file.is_none() {
            return;
        }
        let only_the_lock = fs::read_dir(&self.dir).is_ok_and(|entries| {
            let names: Vec<_> = entries
                .map(|entry| entry.map(|entry| entry.file_name()))
                .collect();
            matches!(names.as_slice(), [Ok(name)] if name == LOCK)
        });
        if !only_the_lock || fs::remove_file(self.dir.join(LOCK)).is_err() {
            return;
        }
        for folder in &self.made_folders {
            if fs::remove_dir(folder).is_err() {
                break;
            }
        }
    }
}

/// Locks `dir` (made if missing) for this learner until the returned lock
/// is dropped (or the process ends, however it ends): two learners on one
/// folder would prune each other's checkpoints and lower each other's
/// version floor. A file system without locks gets a warning, not a
/// refusal.
pub fn lock(dir: &Path) -> Result<FolderLock, LearnerError> {
    // (The key named: "File exists" alone says nothing.)
    if dir.exists() && !dir.is_dir() {
        return Err(LearnerError::Checkpoint(format!(
            "{} is not a folder (learner.checkpoint_dir)",
            dir.display()
        )));
    }
    let made_folders = create_dir_durably(dir).map_err(|error| match error {
        FileError::Io { .. } => {
            LearnerError::Checkpoint(format!("{error} (learner.checkpoint_dir)"))
        }
        error => checkpoint_error(error),
    })?;
    let not_writable = |path: &Path, e: std::io::Error| {
        LearnerError::Checkpoint(format!(
            "{}: {e} (learner.checkpoint_dir must be a folder this learner can write in)",
            path.display()
        ))
    };
    let path = dir.join(LOCK);
    // A lock file that a refused learner removed as this one locked it
    // (see `FolderLock`'s drop) holds no lock for the next: locked again,
    // at the file now there.
    let mut tries = 0;
    let (file, made_lock_file) = loop {
        tries += 1;
        let (file, made_lock_file) = open_lock_file(&path).map_err(|e| not_writable(&path, e))?;
        match file.try_lock() {
            Ok(()) if tries < 3 && !is_at(&file, &path) => continue,
            Ok(()) => break (Ok(file), made_lock_file),
            Err(error) => break (Err(error), made_lock_file),
        }
    };
    let file = match file {
        Ok(mut file) => {
            // Who holds it, for the learner refused next (best effort:
            // the lock, not this text, keeps a second learner out).
            let _ = file
                .set_len(0)
                .and_then(|()| file.write_all(lock_holder().as_bytes()));
            Some(file)
        }
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path)
                .ok()
                .map(|text| text.trim().to_owned())
                .filter(|text| !text.is_empty())
                .map_or_else(String::new, |text| format!(" ({text})"));
            return Err(LearnerError::Checkpoint(format!(
                "{} is in use by another learner{holder} (learner.checkpoint_dir): give each run its own folder (if no learner runs, as after a node died holding the lock on NFS, delete {})",
                dir.display(),
                path.display()
            )));
        }
        Err(fs::TryLockError::Error(error)) => {
            warn!(path = %path.display(), %error, "cannot lock the checkpoint folder; make sure no other learner uses it");
            None
        }
    };
    // Only now: a learner refused above made nothing of its own to
    // remove (the lock file it may have made is the holder's now).
    let held = FolderLock {
        file,
        dir: dir.to_owned(),
        made_lock_file,
        made_folders,
    };
    // A lock file left by an earlier run opens in a folder that has
    // since become read-only: found now, not at the first checkpoint.
    let probe = dir.join(temporary_name(WRITE_PROBE));
    fs::File::create(&probe)
        .and_then(|_| fs::remove_file(&probe))
        .map_err(|e| not_writable(&probe, e))?;
    Ok(held)
}

/// Opens (or makes) the lock file at `path`; whether this call made it.
fn open_lock_file(path: &Path) -> std::io::Result<(File, bool)> {
    let open = |create_new| {
        fs::OpenOptions::new()
            .create_new(create_new)
            .write(true)
            .open(path)
    };
    match open(true) {
        Ok(file) => Ok((file, true)),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((open(false)?, false))
        }
        Err(error) => Err(error),
    }
}

/// Whether `file` is still the file at `path` (not removed or replaced
/// since it was opened).
fn is_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(open), Ok(there)) => open.dev() == there.dev() && open.ino() == there.ino(),
        _ => false,
    }
}

/// This process as the lock file names it: `pid 4242 on node-7, since
/// 2025-12-05 14:13:20 UTC (unix time 1764944000)`.
fn lock_holder() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "an unnamed host".to_owned());
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "pid {} on {host}, since {} (unix time {since})\n",
        std::process::id(),
        utc_time(since)
    )
}

/// `seconds` since the Unix epoch as a UTC date and time (`2025-12-05
/// 14:13:20 UTC`), for an operator reading who holds a lock. (The civil
/// calendar from days, after Howard Hinnant's `civil_from_days`.)
fn utc_time(seconds: u64) -> String {
    let (days, of_day) = ((seconds / 86_400) as i64, seconds % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        of_day / 3_600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Deletes the temporary files of writes that never finished (a crash,
/// a full disk) in a checkpoint folder: checkpoint-sized, and nothing else
/// would ever delete the ones of checkpoint names not written again.
/// Returns how many.
pub fn remove_unfinished_writes(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let ours = |name: &str| {
        name.starts_with(".ckpt-")
            || name == temporary_name(FINAL_WEIGHTS)
            || name == temporary_name(VERSION_FLOOR)
            || name == temporary_name(WRITE_PROBE)
    };
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(ours(name) && name.ends_with(".tmp")) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => {
                warn!(path = %entry.path().display(), "removed the temporary file of an unfinished write");
                removed += 1;
            }
            Err(e) => {
                warn!(path = %entry.path().display(), error = %e, "cannot remove the temporary file of an unfinished write")
            }
        }
    }
    removed
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

/// The state's real numbers and the step known sound, as a run writes
/// them: durations finite and not negative, best energies finite, the sound step not past the
/// step. Checked on a resume, and before a save: JSON has no NaN (it
/// would be written as `null` and the checkpoint never read back).
pub fn check_floats(state: &CheckpointState) -> Result<(), String> {
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
    check_floats(state)
        .map_err(|e| LearnerError::Checkpoint(format!("cannot save step {}: {e}", state.step)))?;
    let json = serde_json::to_string(state)
        .map_err(|e| LearnerError::Checkpoint(format!("cannot encode the state: {e}")))?;
    let metadata = BTreeMap::from([
        (CHECKSUM_KEY.to_owned(), checksum(&json, arrays).to_string()),
        (STATE_KEY.to_owned(), json),
    ]);
    let bytes = weights::encode(arrays, WeightEncoding::F32, &metadata)
        .map_err(|e| LearnerError::Checkpoint(format!("cannot encode the tensors: {e}")))?;
    let path = write_file(dir, &file_name(state.step), &bytes)?;
    prune(dir, keep)?;
    Ok(path)
}

/// Which checkpoints pruning keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// The newest this many (`learner.keep_checkpoints`).
    pub newest: usize,
    /// And the newest checkpoint at or before this step, where set: the
    /// last step the run knows sound. A run that diverges goes on saving
    /// checkpoints of the diverged model until it stops; without this,
    /// they would push out every one a resume could start again from.
    pub sound_through: Option<u64>,
}

/// Deletes the checkpoints in `dir` that `keep` does not keep.
pub fn prune(dir: &Path, keep: Keep) -> Result<(), LearnerError> {
    let all = list(dir)?;
    let sound = keep
        .sound_through
        .and_then(|through| newest_of(&all, through))
        .map(|(step, _)| *step);
    let excess = all.len().saturating_sub(keep.newest.max(1));
    for (step, old) in all.into_iter().take(excess) {
        if Some(step) == sound {
            debug!(path = %old.display(), "kept beyond keep_checkpoints: the newest checkpoint at or before the last step known sound");
            continue;
        }
        if let Err(e) = fs::remove_file(&old) {
            warn!(path = %old.display(), error = %e, "cannot delete an old checkpoint");
        }
    }
    Ok(())
}

/// The newest checkpoint in `dir` at or before `step`, if any.
pub fn newest_at_or_before(dir: &Path, step: u64) -> Option<(u64, PathBuf)> {
    newest_of(&list(dir).ok()?, step).cloned()
}

/// The newest of `all` (as [`list`] sorts them) at or before `step`.
fn newest_of(all: &[(u64, PathBuf)], step: u64) -> Option<&(u64, PathBuf)> {
    all.iter().rev().find(|(saved, _)| *saved <= step)
}

/// Writes checkpoints on a thread of its own, one at a time: the trainer
/// spends on a checkpoint only the copy of what it holds, while encoding,
/// the write and its fsyncs (seconds on a busy network file system) go on
/// beside training. A failed write ends training as it did when written
/// in line: [`Writer::poll`], after every step, returns its error.
pub struct Writer {
    dir: PathBuf,
    keep: usize,
    /// The write in progress, if any: one at a time keeps the files' order
    /// that of the steps, and bounds what is held (the trainer waits for
    /// it before it copies the next).
    pending: Option<std::thread::JoinHandle<Result<(), LearnerError>>>,
}

impl Writer {
    /// Writes into `dir`, keeping the newest `keep` (see [`save`]).
    pub fn new(dir: PathBuf, keep: usize) -> Self {
        Self {
            dir,
            keep,
            pending: None,
        }
    }

    /// Starts writing a checkpoint once the write before it is done (its
    /// failure is returned instead, and this one is not written). Pruning
    /// after it keeps the newest at or before the state's `sound_through`
    /// too (see [`Keep`]).
    pub fn start(
        &mut self,
        state: CheckpointState,
        arrays: Vec<NamedArray>,
    ) -> Result<(), LearnerError> {
        self.finish()?;
        let dir = self.dir.clone();
        let keep = Keep {
            newest: self.keep,
            sound_through: state.sound_through.step(),
        };
        let write = move || {
            let started = std::time::Instant::now();
            // Said, so that the second line for one step (a stop saves
            // before its last report, then after it) does not read as a
            // repeat.
            let replaced = dir.join(file_name(state.step)).exists();
            let path = save(&dir, &state, &arrays, keep)?;
            info!(
                path = %path.display(),
                step = state.step,
                replaced = replaced.then_some(true),
                write_ms = started.elapsed().as_millis() as u64,
                "checkpoint saved"
            );
            Ok(())
        };
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".to_owned())
            .spawn(write)
            .map_err(|e| {
                LearnerError::Checkpoint(format!(
                    "cannot start a thread to write a checkpoint: {e}"
                ))
            })?;
        self.pending = Some(handle);
        Ok(())
    }

    /// The failure of a write that has ended, without waiting for one in
    /// progress.
    pub fn poll(&mut self) -> Result<(), LearnerError> {
        if self
            .pending
            .as_ref()
            .is_some_and(|handle| handle.is_finished())
        {
            self.finish()
        } else {
            Ok(())
        }
    }

    /// Waits for the write in progress, if any, and returns how it went.
    pub fn finish(&mut self) -> Result<(), LearnerError> {
        match self.pending.take() {
            None => Ok(()),
            Some(handle) => handle.join().unwrap_or_else(|payload| {
                Err(LearnerError::Checkpoint(format!(
                    "the checkpoint writer panicked: {}",
                    flgfn_common::telemetry::panic_message(&*payload)
                )))
            }),
        }
    }
}

impl Drop for Writer {
    /// A learner never leaves a write behind: the folder's lock (held by
    /// the trainer thread) outlives it, and so does the process.
    fn drop(&mut self) {
        if let Err(error) = self.finish() {
            warn!(%error, "a checkpoint write failed");
        }
    }
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

/// Reads and verifies one checkpoint file.
pub fn read(path: &Path) -> Result<Checkpoint, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    parse(path, &bytes).map_err(|unusable| match unusable {
        Unusable::Damaged(reason) | Unusable::OtherVersion(reason) => reason,
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

/// Suffix of a damaged checkpoint set aside.
const DAMAGED_SUFFIX: &str = ".damaged";

/// The newest checkpoint in `dir` that reads back intact, skipping (and
/// reporting) any torn or corrupt one. `Ok(None)` when there is none at
/// all; an error when every one is damaged (starting over would silently
/// lose the run: the user decides, with `--fresh`).
///
/// It does not change the folder: the damaged newer ones it skipped are
/// in [`Checkpoint::damaged_newer`]. A checkpoint that cannot be read at
/// all (an I/O error, not damage) is an error that names it.
pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>, LearnerError> {
    load_latest_for(dir, Reader::Resuming)
}

/// [`load_latest`] for a reader that only reads (`flgfn-sample`): its
/// errors give a reader's remedies, not a resuming learner's.
pub fn load_latest_to_read(dir: &Path) -> Result<Option<Checkpoint>, LearnerError> {
    load_latest_for(dir, Reader::Reading)
}

/// Who reads a checkpoint folder, for the remedies its errors give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// A learner resuming its run.
    Resuming,
    /// A tool that reads the policy.
    Reading,
}

fn load_latest_for(dir: &Path, reader: Reader) -> Result<Option<Checkpoint>, LearnerError> {
    // (A reader must not move files in a run's folder: that changes what
    // the run resumes from and prunes.)
    let older = match reader {
        Reader::Resuming => format!(
            "move it out of {} to resume from an older checkpoint",
            dir.display()
        ),
        Reader::Reading => {
            "copy an older checkpoint into a folder of its own and read that".to_owned()
        }
    };
    let all = list(dir)?;
    // Newer ones that read back damaged, skipped so far.
    let mut damaged = Vec::new();
    for (named_step, path) in all.iter().rev() {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            // Pruned since it was listed (a run writing meanwhile).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // Not damage, which could be set aside: a file this process
            // cannot read (permissions, a failing disk). Resuming from an
            // older one would leave it the newest, and pruning would
            // delete every checkpoint the resumed run writes before it.
            Err(e) => {
                return Err(LearnerError::Checkpoint(format!(
                    "cannot read {}: {e}; make it readable, or {older}",
                    path.display()
                )));
            }
        };
        match parse(path, &bytes) {
            Ok(mut checkpoint) => {
                // Pruning and the choice of the newest go by the name: a
                // renamed or copied one would have the run's new
                // checkpoints pruned as older than it.
                let step = checkpoint.state.step;
                if step != *named_step {
                    let named = format!(
                        "{} holds step {step} but is named for step {named_step} (renamed or copied by hand?)",
                        path.display()
                    );
                    match reader {
                        Reader::Resuming => {
                            // (Renamed over a good checkpoint of the step
                            // it holds, it would replace that one.)
                            let right = file_name(step);
                            let there = dir.join(&right);
                            let remedy = if read(&there).is_ok_and(|c| c.state.step == step) {
                                format!("delete it ({right} is already there and reads back)")
                            } else if there.exists() {
                                format!(
                                    "rename it over {right} (which does not read back as step {step})"
                                )
                            } else {
                                format!("rename it {right}")
                            };
                            return Err(LearnerError::Checkpoint(format!(
                                "{named}: {remedy} (this run would prune the checkpoints it writes as older), or {older}"
                            )));
                        }
                        Reader::Reading => warn!("{named}"),
                    }
                }
                if !damaged.is_empty() {
                    let damaged = damaged.len();
                    warn!(path = %path.display(), damaged, "using an older checkpoint");
                }
                checkpoint.damaged_newer = damaged;
                return Ok(Some(checkpoint));
            }
            Err(Unusable::Damaged(reason)) => {
                warn!(path = %path.display(), %reason, "refusing a damaged checkpoint");
                damaged.push(path.clone());
            }
            Err(Unusable::OtherVersion(reason)) => {
                let with = match reader {
                    Reader::Resuming => "resume with that version",
                    Reader::Reading => "read it with that version",
                };
                return Err(LearnerError::Checkpoint(format!(
                    "{}: {reason}: written by another version of flgfn (or edited by hand); {with}, or {older}",
                    path.display()
                )));
            }
        }
    }
    if !damaged.is_empty() {
        let remedy = match reader {
            Reader::Resuming => "start over with --fresh",
            Reader::Reading => {
                "no policy can be read from it (give another folder, or the run's final.safetensors as --weights)"
            }
        };
        return Err(LearnerError::Checkpoint(format!(
            "every checkpoint in {} is damaged ({}); {remedy}",
            dir.display(),
            damaged.len()
        )));
    }
    Ok(None)
}

/// Renames damaged checkpoints out of [`list`]'s sight
/// (`*.safetensors.damaged`, kept for a post-mortem). A learner resuming
/// from an older checkpoint must: left in place, they would sort after
/// every checkpoint the resumed run writes, and pruning to
/// `keep_checkpoints` would delete the good new ones first. So one that
/// cannot be renamed is an error that names it: the learner does not
/// start rather than prune its own checkpoints away.
/// Of those set aside, the newest [`DAMAGED_KEPT`] stay (each is
/// checkpoint-sized: a failing disk would otherwise fill the folder).
pub fn set_aside(paths: &[PathBuf]) -> Result<(), LearnerError> {
    paths.iter().try_for_each(|path| set_aside_one(path))?;
    if let Some(dir) = paths.first().and_then(|path| path.parent()) {
        let damaged = damaged_in(dir);
        let surplus = damaged.len().saturating_sub(DAMAGED_KEPT);
        for (_, path) in damaged.into_iter().take(surplus) {
            match fs::remove_file(&path) {
                Ok(()) => {
                    warn!(path = %path.display(), kept = DAMAGED_KEPT, "deleted an older damaged checkpoint")
                }
                Err(error) => {
                    warn!(path = %path.display(), %error, "cannot delete an older damaged checkpoint")
                }
            }
        }
    }
    Ok(())
}

/// Damaged checkpoints set aside that stay for a post-mortem.
pub const DAMAGED_KEPT: usize = 2;

/// The damaged checkpoints set aside in `dir`, oldest first by when they
/// were written (a rename keeps that; steps alone would keep a stale one
/// of a later step, from before a resume further back, over new ones),
/// with the steps their names give.
fn damaged_in(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(Option<std::time::SystemTime>, u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let step = named_step(name.to_str()?.strip_suffix(DAMAGED_SUFFIX)?)?;
            let written = entry.metadata().and_then(|m| m.modified()).ok();
            Some((written, step, entry.path()))
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .map(|(_, step, path)| (step, path))
        .collect()
}

fn set_aside_one(path: &Path) -> Result<(), LearnerError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(DAMAGED_SUFFIX);
    match fs::rename(path, &aside) {
        Ok(()) => {
            warn!(path = %Path::new(&aside).display(), "set a damaged checkpoint aside");
            Ok(())
        }
        // Gone meanwhile: nothing left to outrank the new ones.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LearnerError::Checkpoint(format!(
            "cannot set the damaged checkpoint {} aside ({e}): left there, it would outrank every checkpoint this run writes and pruning would delete them; move it out of the folder by hand",
            path.display()
        ))),
    }
}

/// The version floor recorded in `dir` (0 when there is none). A file
/// that cannot be read is an error: guessing could reissue versions.
pub fn read_version_floor(dir: &Path) -> Result<u64, LearnerError> {
    let path = dir.join(VERSION_FLOOR);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            LearnerError::Checkpoint(format!(
                "{}: not a version number ({:?}); write in a number at least as high as any version the actors may have seen, or delete the file, at the risk of running actors being sent a version number twice (--fresh would delete the checkpoints too)",
                path.display(),
                text.trim()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error(&path, e)),
    }
}

/// Records that versions up to `floor` may have been published (a clean
/// stop writes its final version as the floor).
pub fn write_version_floor(dir: &Path, floor: u64) -> Result<(), LearnerError> {
    write_file(dir, VERSION_FLOOR, format!("{floor}\n").as_bytes()).map(|_| ())
}

/// Deletes the checkpoints and final weights in `dir` (`--fresh`).
pub fn clear(dir: &Path) -> Result<usize, LearnerError> {
    let mut removed = remove_unfinished_writes(dir);
    for path in list(dir)?
        .into_iter()
        .chain(damaged_in(dir))
        .map(|(_, path)| path)
    {
        fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
        removed += 1;
    }
    for name in [FINAL_WEIGHTS, VERSION_FLOOR] {
        let path = dir.join(name);
        if path.exists() {
            fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        info!(dir = %dir.display(), removed, "started fresh: removed earlier checkpoints");
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrays(scale: f32) -> Vec<NamedArray> {
        vec![
            NamedArray {
                name: "policy/w".to_owned(),
                shape: vec![2, 3],
                values: (0..6).map(|i| i as f32 * scale).collect(),
            },
            NamedArray {
                name: "adam/m/w".to_owned(),
                shape: vec![2, 3],
                values: vec![0.5; 6],
            },
        ]
    }

    /// The newest `newest`, nothing known sound.
    fn keep(newest: usize) -> Keep {
        Keep {
            newest,
            sound_through: None,
        }
    }

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            format: FORMAT,
            step,
            version: step,
            config: "seed = 3\n".to_owned(),
            evaluator: EvaluatorState {
                samples_so_far: 4096,
                best: vec![(-1.5, vec![1, 0, 1])],
            },
            sound_through: SoundThrough::Step(step.saturating_sub(10)),
            ..CheckpointState::default()
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flgfn-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_checkpoint_reads_back_exactly_and_only_the_last_k_stay() {
        let dir = scratch("round-trip");
        for step in [100, 200, 300, 400] {
            save(&dir, &state(step), &arrays(step as f32), keep(2)).unwrap();
        }
        let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [300, 400]);
        let latest = load_latest(&dir).unwrap().unwrap();
        assert_eq!(latest.state, state(400));
        assert_eq!(latest.group("policy")[0].values, arrays(400.0)[0].values);
        assert_eq!(latest.group("adam/m")[0].name, "w");
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Pruning keeps the newest checkpoint at or before the last step
    /// known sound beside the newest `keep_checkpoints`, and lets it go
    /// once a sounder one is among those.
    #[test]
    fn pruning_keeps_the_newest_checkpoint_known_sound() {
        let dir = scratch("sound");
        let steps =
            |dir: &Path| -> Vec<u64> { list(dir).unwrap().into_iter().map(|(s, _)| s).collect() };
        let sound_through = |step| Keep {
            newest: 2,
            sound_through: Some(step),
        };
        for step in [100, 200, 300, 400, 500] {
            save(&dir, &state(step), &arrays(1.0), sound_through(250)).unwrap();
        }
        assert_eq!(steps(&dir), [200, 400, 500]);
        assert_eq!(newest_at_or_before(&dir, 399).map(|(s, _)| s), Some(200));
        assert_eq!(newest_at_or_before(&dir, 99), None);
        // Sound again, and among the newest: nothing more is kept.
        save(&dir, &state(600), &arrays(1.0), sound_through(600)).unwrap();
        assert_eq!(steps(&dir), [500, 600]);
        // Nothing at or before it: the newest two, as without it.
        save(&dir, &state(700), &arrays(1.0), sound_through(50)).unwrap();
        assert_eq!(steps(&dir), [600, 700]);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A writer writes in the order started, one at a time, and what
    /// [`Writer::finish`] returns has been written.
    #[test]
    fn a_writer_writes_in_order_and_keeps_the_newest() {
        let dir = scratch("writer");
        let mut writer = Writer::new(dir.clone(), 2);
        for step in [100, 200, 300, 400] {
            writer.start(state(step), arrays(step as f32)).unwrap();
        }
        writer.finish().unwrap();
        let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [300, 400]);
        let latest = load_latest(&dir).unwrap().unwrap();
        assert_eq!(latest.state, state(400));
        assert_eq!(latest.group("policy")[0].values, arrays(400.0)[0].values);
        // Nothing left to wait for.
        writer.finish().unwrap();
        writer.poll().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A failed write comes back from `poll` once it has ended (and only
    /// once), or from the next `start`, which then writes nothing.
    #[test]
    fn a_failed_write_comes_back_once() {
        let parent = scratch("writer-fails");
        fs::create_dir_all(&parent).unwrap();
        // A file where the folder should be: every write fails.
        let dir = parent.join("checkpoints");
        fs::write(&dir, "not a folder").unwrap();
        let mut writer = Writer::new(dir.clone(), 2);
        writer.start(state(100), arrays(1.0)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let error = loop {
            match writer.poll() {
                Err(error) => break error.to_string(),
                Ok(()) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the write never ended"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        };
        assert!(error.contains(&dir.display().to_string()), "{error}");
        writer.poll().unwrap();
        writer.finish().unwrap();

        writer.start(state(200), arrays(2.0)).unwrap();
        let error = writer
            .start(state(300), arrays(3.0))
            .unwrap_err()
            .to_string();
        assert!(error.contains(&dir.display().to_string()), "{error}");
        // The 300 was not started: nothing is pending.
        writer.finish().unwrap();
        fs::remove_dir_all(&parent).unwrap();
    }

    /// Checkpoints written before builds and the step known sound were
    /// recorded still resume, with both unknown.
    #[test]
    fn a_state_without_a_build_or_sound_step_reads_as_unknown() {
        let state = CheckpointState {
            build: crate::BUILD.to_owned(),
            ..state(70)
        };
        let mut json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["build"], crate::BUILD);
        assert_eq!(json["sound_through"], serde_json::json!({"step": 60}));
        json.as_object_mut().unwrap().remove("build");
        json.as_object_mut().unwrap().remove("sound_through");
        let read: CheckpointState = serde_json::from_value(json).unwrap();
        assert_eq!(
            read,
            CheckpointState {
                build: String::new(),
                sound_through: SoundThrough::Unknown,
                ..state.clone()
            }
        );
        let nothing = CheckpointState {
            sound_through: SoundThrough::Nothing,
            ..state
        };
        let json = serde_json::to_string(&nothing).unwrap();
        assert_eq!(
            serde_json::from_str::<CheckpointState>(&json).unwrap(),
            nothing
        );
    }

    #[test]
    fn a_file_for_a_checkpoint_folder_is_refused_naming_the_key() {
        let parent = scratch("lock-file");
        fs::create_dir_all(&parent).unwrap();
        let file = parent.join("a-file");
        fs::write(&file, "").unwrap();
        for dir in [file.clone(), file.join("below")] {
            let error = lock(&dir).unwrap_err().to_string();
            assert!(
                error.contains("learner.checkpoint_dir")
                    && error.contains(&*file.to_string_lossy()),
                "{error}"
            );
        }
        fs::remove_dir_all(&parent).unwrap();
    }

    /// A learner refused while another holds a new folder leaves the
    /// holder's lock file (and folder) alone; a lock file removed or
    /// replaced under an open one is found out.
    #[test]
    fn a_refused_learner_leaves_the_holders_lock_alone() {
        let parent = scratch("lock-holder");
        let dir = parent.join("new");
        let held = lock(&dir).unwrap();
        assert!(lock(&dir).is_err());
        assert!(dir.join(LOCK).exists(), "the holder's lock file stays");
        let (file, made) = open_lock_file(&dir.join(LOCK)).unwrap();
        assert!(!made);
        assert!(is_at(&file, &dir.join(LOCK)));
        fs::remove_file(dir.join(LOCK)).unwrap();
        assert!(!is_at(&file, &dir.join(LOCK)), "removed");
        let (_, made) = open_lock_file(&dir.join(LOCK)).unwrap();
        assert!(made);
        assert!(!is_at(&file, &dir.join(LOCK)), "replaced");
        drop(held);
        let _ = fs::remove_dir_all(&parent);
    }

    /// The lock's holder is dated as a person reads a date.
    #[test]
    fn unix_times_read_as_utc_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_764_944_000), "2025-12-05 14:13:20 UTC");
        assert_eq!(utc_time(1_798_761_599), "2026-12-31 23:59:59 UTC");
        // 2100 is no leap year.
        assert_eq!(utc_time(4_107_542_400), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn one_learner_at_a_time_uses_a_checkpoint_folder() {
        let dir = scratch("lock").join("made");
        let held = lock(&dir).unwrap();
        assert!(held.is_locked(), "this file system locks");
        let error = lock(&dir).unwrap_err().to_string();
        assert!(
            error.contains("in use by another learner") && error.contains("learner.checkpoint_dir"),
            "{error}"
        );
        // The holder is named.
        assert!(
            error.contains(&format!("(pid {} on ", std::process::id())),
            "{error}"
        );
        drop(held);
        assert!(lock(&dir).unwrap().is_locked(), "free again once released");
        let _ = fs::remove_dir_all(dir.parent().unwrap());
    }

    /// A learner refused at start-up, its folder opened, leaves nothing
    /// behind: not the folders made for it, nor its lock file. A folder
    /// that holds anything else keeps the lock file.
    #[test]
    fn a_folder_that_holds_only_the_lock_is_removed_when_let_go() {
        let parent = scratch("lock-left");
        fs::create_dir_all(&parent).unwrap();
        let dir = parent.join("runs/a");
        drop(lock(&dir).unwrap());
        assert!(!parent.join("runs").exists(), "the folders made are gone");
        assert!(parent.exists(), "a folder that was there stays");
        // Where something else was written, the lock file stays too.
        let held = lock(&dir).unwrap();
        fs::write(dir.join(VERSION_FLOOR), "7").unwrap();
        drop(held);
        assert!(dir.join(LOCK).exists() && dir.join(VERSION_FLOOR).exists());
        // A lock file this learner did not make stays, even alone.
        fs::remove_file(dir.join(VERSION_FLOOR)).unwrap();
        drop(lock(&dir).unwrap());
        assert!(dir.join(LOCK).exists());
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn every_float_of_the_state_reads_back_bit_for_bit() {
        // Decimal text parsed back must give the same f64, not one a last
        // bit away: a resumed run continues exactly.
        let mut bits = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            bits = bits
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = ((bits >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 100.0;
            let mut state = state(1);
            state.wall_s = x;
            state.time_to_quality_s = Some(x / 3.0);
            state.totals.lag_weighted = x * 1e7;
            let json = serde_json::to_string(&state).unwrap();
            let back: CheckpointState = serde_json::from_str(&json).unwrap();
            assert_eq!(back.wall_s.to_bits(), x.to_bits(), "{x:e} as {json}");
            assert_eq!(back, state);
        }
    }

    #[test]
    fn a_checkpoint_goes_into_folders_made_for_it_several_levels_deep() {
        let dir = scratch("nested");
        let deep = dir.join("a").join("b").join("c");
        save(&deep, &state(100), &arrays(1.0), keep(2)).unwrap();
        assert_eq!(load_latest(&deep).unwrap().unwrap().state.step, 100);
        assert_eq!(
            durable_file::parent_of(Path::new("checkpoints")),
            Some(Path::new("."))
        );
        assert_eq!(durable_file::parent_of(Path::new("/")), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unfinished_writes_are_removed_and_nothing_else() {
        let dir = scratch("unfinished");
        save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
        for leftover in [
            ".ckpt-000000000200.safetensors.tmp",
            ".final.safetensors.tmp",
        ] {
            fs::write(dir.join(leftover), b"half").unwrap();
        }
        fs::write(dir.join(".notes.tmp"), b"not ours").unwrap();
        assert_eq!(remove_unfinished_writes(&dir), 2);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".notes.tmp", &file_name(100)]);
        assert_eq!(load_latest(&dir).unwrap().unwrap().state.step, 100);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// JSON has no NaN: a state holding one would be written as `null`
    /// and never read back. Refused by name instead.
    #[test]
    fn a_state_with_a_non_finite_number_is_not_saved() {
        let dir = scratch("non-finite");
        let mut bad = state(100);
        bad.totals.waiting_s = f64::NAN;
        let error = save(&dir, &bad, &arrays(1.0), keep(2))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cannot save step 100") && error.contains("`totals.waiting_s` is NaN"),
            "{error}"
        );
        assert!(list(&dir).unwrap().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    /// A checkpoint renamed by hand (a rollback done by copying) is
    /// refused at a resume, which would prune every checkpoint it writes
    /// as older than the name; read as it is by a reader.
    #[test]
    fn a_checkpoint_named_for_another_step_is_refused_at_a_resume() {
        let dir = scratch("renamed");
        let at_100 = save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
        save(&dir, &state(200), &arrays(2.0), keep(5)).unwrap();
        fs::rename(&at_100, dir.join(file_name(300))).unwrap();
        let error = load_latest(&dir).unwrap_err().to_string();
        assert!(
            error.contains(&file_name(300))
                && error.contains("holds step 100 but is named for step 300")
                && error.contains(&format!("rename it {}", file_name(100))),
            "{error}"
        );
        let read = load_latest_to_read(&dir).unwrap().unwrap();
        assert_eq!(read.state.step, 100);
        // A copy of one whose right name is taken: not renamed over it.
        save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
        let error = load_latest(&dir).unwrap_err().to_string();
        assert!(
            error.contains(&format!(
                "delete it ({} is already there and reads back)",
                file_name(100)
            )),
            "{error}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A folder the learner cannot write in, though its lock file opens
    /// (made read-only since), is refused at the lock, naming the key,
    /// not at the first checkpoint. (Here the probe's name is taken by a
    /// folder: root writes in read-only folders.)
    #[test]
    fn a_folder_where_the_probe_cannot_be_written_is_refused_at_start() {
        let dir = scratch("read-only");
        fs::create_dir_all(&dir).unwrap();
        let held = lock(&dir).unwrap();
        // The probe leaves nothing behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [LOCK]);
        drop(held);
        fs::create_dir(dir.join(temporary_name(WRITE_PROBE))).unwrap();
        let error = lock(&dir).unwrap_err().to_string();
        assert!(
            error.contains("learner.checkpoint_dir must be a folder this learner can write in"),
            "{error}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Damaged checkpoints set aside are kept for a post-mortem, the
    /// newest few: each is checkpoint-sized.
    #[test]
    fn only_the_newest_damaged_checkpoints_stay_set_aside() {
        let dir = scratch("damaged-kept");
        fs::create_dir_all(&dir).unwrap();
        // By when they were written: a stale one of a later step (from
        // before a resume further back) goes before new ones.
        let written = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for (at, step) in [500, 100, 200, 300].into_iter().enumerate() {
            let path = dir.join(file_name(step));
            fs::write(&path, b"torn").unwrap();
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(written + std::time::Duration::from_secs(at as u64))
                .unwrap();
            set_aside(&[path]).unwrap();
        }
        let kept: Vec<u64> = damaged_in(&dir).into_iter().map(|(step, _)| step).collect();
        assert_eq!(kept, [200, 300]);
        assert_eq!(DAMAGED_KEPT, 2);
        // --fresh removes them too.
        clear(&dir).unwrap();
        assert!(damaged_in(&dir).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A write into a folder that a file has replaced names that file as
    /// not a folder (the full suite once caught a checkpoint write failing
    /// so, as "Not a directory (os error 20)" alone).
    #[test]
    fn a_write_under_a_file_names_the_file_as_not_a_folder() {
        let parent = scratch("replaced-folder");
        fs::create_dir_all(&parent).unwrap();
        let folder = parent.join("checkpoints");
        fs::write(&folder, "not a folder").unwrap();
        let inside = folder.join("ckpt.tmp");
        let error = fs::write(&inside, b"x").unwrap_err();
        let message = io_error(&inside, error).to_string();
        assert!(
            message.contains(&format!(
                "{}: not a folder (learner.checkpoint_dir, or one of its parents, is a file)",
                folder.display()
            )),
            "{message}"
        );
        // And where the folder is to be made, or a file written in it.
        for error in [
            lock(&folder.join("deeper")).err().unwrap(),
            write_file(&folder, FINAL_WEIGHTS, b"x").unwrap_err(),
        ] {
            assert!(
                error.to_string().contains(&format!(
                    "{}: not a folder (learner.checkpoint_dir",
                    folder.display()
                )),
                "{error}"
            );
        }
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_truncated_or_flipped_checkpoint_is_refused_and_the_previous_one_used() {
        let dir = scratch("damaged");
        save(&dir, &state(100), &arrays(1.0), keep(5)).unwrap();
        let newest = save(&dir, &state(200), &arrays(2.0), keep(5)).unwrap();
        let good = fs::read(&newest).unwrap();

        // Torn: the last bytes never reached the disk.
        fs::write(&newest, &good[..good.len() - 7]).unwrap();
        assert!(read(&newest).is_err());
        let resumed = load_latest(&dir).unwrap().unwrap();
        assert_eq!(resumed.state.step, 100);
        assert_eq!(resumed.damaged_newer, std::slice::from_ref(&newest));
        assert!(newest.exists(), "reading changes nothing");
        // A damaged one that cannot be moved aside (here a folder holds
        // its new name) stops the learner, named: left in place, it would
        // outrank the resumed run's checkpoints, and pruning delete them.
        let aside = dir.join(format!("{}{DAMAGED_SUFFIX}", file_name(200)));
        fs::create_dir_all(aside.join("blocker")).unwrap();
        let error = set_aside(&resumed.damaged_newer).unwrap_err().to_string();
        assert!(
            error.contains(&newest.display().to_string()) && error.contains("by hand"),
            "{error}"
        );
        fs::remove_dir_all(&aside).unwrap();
        set_aside(&resumed.damaged_newer).unwrap();
        // Set aside: the resumed run's next checkpoint is the newest, and
        // pruning keeps it.
        assert!(aside.exists() && !newest.exists());
        let resumed = save(&dir, &state(150), &arrays(1.5), keep(2)).unwrap();
        let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [100, 150]);
        fs::remove_file(&resumed).unwrap();

        // One flipped byte anywhere: in the tensor data, or in the JSON.
        for at in [good.len() - 3, good.len() / 2, 40] {
            let mut flipped = good.clone();
            flipped[at] ^= 0x10;
            fs::write(&newest, &flipped).unwrap();
            let error = read(&newest).unwrap_err();
            // Damaged (set aside, the previous one used), not another
            // format (which would stop the resume).
            assert!(
                matches!(parse(&newest, &flipped), Err(Unusable::Damaged(_))),
                "byte {at}: {error}"
            );
            assert_eq!(
                load_latest(&dir).unwrap().unwrap().state.step,
                100,
                "byte {at}"
            );
        }

        // An intact checkpoint of another format is not damage, for which
        // an older one would stand in (losing its progress): it stops the
        // resume, named.
        let mut future = state(200);
        future.format = FORMAT + 1;
        save(&dir, &future, &arrays(2.0), keep(5)).unwrap();
        let error = load_latest(&dir).unwrap_err().to_string();
        assert!(
            error.contains(&file_name(200)) && error.contains("format 2"),
            "{error}"
        );
        assert!(!error.contains("it is damaged"), "{error}");
        // Also where that format sums otherwise (its checksum does not
        // hold by this learner's reckoning).
        let path = dir.join(file_name(200));
        let mut decoded = weights::decode(&fs::read(&path).unwrap()).unwrap();
        decoded
            .metadata
            .insert(CHECKSUM_KEY.to_owned(), "12345".to_owned());
        let resummed =
            weights::encode(&decoded.arrays, WeightEncoding::F32, &decoded.metadata).unwrap();
        fs::write(&path, resummed).unwrap();
        let error = load_latest(&dir).unwrap_err().to_string();
        assert!(
            error.contains(&file_name(200)) && error.contains("format 2"),
            "{error}"
        );
        // ...which a flipped digit reads the same as: the error says so.
        assert!(
            error.contains("checksum does not hold") && error.contains("it is damaged"),
            "{error}"
        );
        // ...and where that format stores tensors this learner cannot
        // decode (another dtype, here I32 in F32's place): still another
        // version's, not damage.
        save(&dir, &future, &arrays(2.0), keep(5)).unwrap();
        let as_i32 = |bytes: Vec<u8>| {
            let at = bytes.windows(5).position(|w| w == b"\"F32\"").unwrap();
            let mut bytes = bytes;
            bytes[at + 1..at + 4].copy_from_slice(b"I32");
            bytes
        };
        fs::write(&path, as_i32(fs::read(&path).unwrap())).unwrap();
        let error = load_latest(&dir).unwrap_err().to_string();
        assert!(
            error.contains(&file_name(200))
                && error.contains("format 2")
                && error.contains("not readable here")
                && error.contains("I32"),
            "{error}"
        );
        // In this learner's own format, the same is damage.
        save(&dir, &state(200), &arrays(2.0), keep(5)).unwrap();
        fs::write(&path, as_i32(fs::read(&path).unwrap())).unwrap();
        assert!(matches!(
            parse(&path, &fs::read(&path).unwrap()),
            Err(Unusable::Damaged(_))
        ));
        // A format no version writes is damage: the one before is used.
        let mut zero = state(200);
        zero.format = 0;
        save(&dir, &zero, &arrays(2.0), keep(5)).unwrap();
        assert!(matches!(
            parse(&path, &fs::read(&path).unwrap()),
            Err(Unusable::Damaged(_))
        ));
        assert_eq!(load_latest(&dir).unwrap().unwrap().state.step, 100);
        fs::write(&newest, &good[..good.len() - 7]).unwrap();

        // Every checkpoint damaged: an error, not a silent fresh start.
        let oldest = dir.join(file_name(100));
        fs::write(&oldest, b"garbage").unwrap();
        let error = load_latest(&dir).unwrap_err().to_string();
        assert!(error.contains("--fresh"), "{error}");
        // A reader is given a reader's remedy.
        let error = load_latest_to_read(&dir).unwrap_err().to_string();
        assert!(
            error.contains("is damaged") && !error.contains("--fresh"),
            "{error}"
        );
        write_version_floor(&dir, 1200).unwrap();
        assert_eq!(read_version_floor(&dir).unwrap(), 1200);
        // A floor that is not a number: named, with what to write there
        // (not --fresh, which would delete every checkpoint too).
        fs::write(dir.join(VERSION_FLOOR), "12x\n").unwrap();
        let error = read_version_floor(&dir).unwrap_err().to_string();
        assert!(
            error.contains(VERSION_FLOOR)
                && error.contains("\"12x\"")
                && error.contains("write in a number"),
            "{error}"
        );
        write_version_floor(&dir, 1200).unwrap();

        // A newest one that cannot be read at all (here a folder by its
        // name: EISDIR, as EIO or EACCES would be) is named, not skipped.
        let unreadable = dir.join(file_name(300));
        fs::create_dir(&unreadable).unwrap();
        let error = load_latest(&dir).unwrap_err().to_string();
        assert!(error.contains(&file_name(300)), "{error}");
        fs::remove_dir(&unreadable).unwrap();
        // The oldest, the newest (flipped, not set aside: only reading),
        // the one set aside, and the floor.
        assert_eq!(clear(&dir).unwrap(), 4);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(read_version_floor(&dir).unwrap(), 0);
        assert!(load_latest(&dir).unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
