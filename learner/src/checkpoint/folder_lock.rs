//! One learner at a time in a checkpoint folder: the lock file, who
//! holds it, and the write probe that finds a folder this learner cannot
//! write in before the first checkpoint is due.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::durable_file::{FileError, create_dir_durably, temporary_name};
use crate::error::LearnerError;

use super::checkpoint_error;

/// The file a learner writes and deletes at start, to find a folder it
/// cannot write in (see [`lock`]).
pub(super) const WRITE_PROBE: &str = "write-probe";

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
    // A file in the way is said as what it is (`checkpoint_error`), not as
    // "File exists".
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
    // (So is one removed between this learner's failing to make it and
    // opening it. Bounded: past that, refused where the file at the path
    // kept changing (other learners starting and failing there at once);
    // kept with a warning where it stayed the same file, never the one
    // opened: a file system whose file identities differ between an open
    // file and its path, which would never pass `is_at`.)
    const TRIES: u32 = 5;
    let mut tries = 0;
    let mut there_before = None;
    let (file, made_lock_file) = loop {
        tries += 1;
        let (file, made_lock_file) = match open_lock_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < TRIES => continue,
            opened => opened.map_err(|e| not_writable(&path, e))?,
        };
        match file.try_lock() {
            Ok(()) if !is_at(&file, &path) => {
                let there = identity(&path);
                if tries < TRIES {
                    there_before = there;
                    continue;
                }
                if there.is_none() || there != there_before {
                    return Err(LearnerError::Checkpoint(format!(
                        "{}: removed or replaced {TRIES} times in a row as this learner locked it (other learners starting, and refused, in learner.checkpoint_dir at this moment?): start again once they are gone",
                        path.display()
                    )));
                }
                warn!(
                    path = %path.display(),
                    "this file system gives the lock file another identity open than by its path: the lock cannot be confirmed; make sure no other learner uses this folder"
                );
                // (Not removed at the end either: it may be another's.)
                break (Ok(file), false);
            }
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
pub(super) fn open_lock_file(path: &Path) -> std::io::Result<(File, bool)> {
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
pub(super) fn is_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), identity(path)) {
        (Ok(open), Some(there)) => (open.dev(), open.ino()) == there,
        _ => false,
    }
}

/// The file at `path` (device and inode), if any.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path)
        .ok()
        .map(|there| (there.dev(), there.ino()))
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
pub(super) fn utc_time(seconds: u64) -> String {
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
