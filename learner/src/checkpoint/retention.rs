//! What stays in a checkpoint folder: the newest checkpoints and the one
//! known sound, no unfinished writes, the version floor, and `--fresh`'s
//! clean slate.

use std::fs;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use crate::durable_file::{sync_folder, temporary_name};
use crate::error::LearnerError;

use super::{FINAL_WEIGHTS, VERSION_FLOOR, checkpoint_error, io_error, list, write_file};

use super::folder_lock::WRITE_PROBE;
use super::recovery::damaged_in;

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
    // One line for all that stay: each prune tries every one again.
    let mut undeletable: Option<(PathBuf, std::io::Error)> = None;
    let mut count = 0;
    for (step, old) in all.into_iter().take(excess) {
        if Some(step) == sound {
            debug!(path = %old.display(), "kept beyond keep_checkpoints: the newest checkpoint at or before the last step known sound");
            continue;
        }
        if let Err(e) = fs::remove_file(&old) {
            count += 1;
            undeletable.get_or_insert((old, e));
        }
    }
    if let Some((oldest, error)) = undeletable {
        warn!(
            count,
            oldest = %oldest.display(),
            %error,
            "cannot delete old checkpoints: they stay, and the folder keeps growing (check the folder's permissions)"
        );
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

/// The version floor recorded in `dir` (0 when there is none). A file
/// that cannot be read is an error: guessing could reissue versions.
pub fn read_version_floor(dir: &Path) -> Result<u64, LearnerError> {
    let path = dir.join(VERSION_FLOOR);
    // Bytes, not text: bytes that are not UTF-8 are not a number either,
    // and get the remedy (`read_to_string` makes them an I/O error).
    match fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            text.trim().parse().map_err(|_| {
                LearnerError::Checkpoint(format!(
                    "{}: not a version number ({:?}); write in a number at least as high as any version the actors may have seen, or delete the file, at the risk of running actors being sent a version number twice (--fresh would delete the checkpoints too)",
                    path.display(),
                    text.trim()
                ))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error(&path, e)),
    }
}

/// Records that versions up to `floor` may have been published (a clean
/// stop writes its final version as the floor).
pub fn write_version_floor(dir: &Path, floor: u64) -> Result<(), LearnerError> {
    write_file(dir, VERSION_FLOOR, format!("{floor}\n").as_bytes()).map(|_| ())
}

/// Before `version` is published: records a floor [`super::VERSION_FLOOR_STRIDE`]
/// above it in `dir` where `floor`, the one recorded, is not above it
/// already (one small write per that many versions); the floor from now
/// on.
pub fn floor_above(dir: &Path, version: u64, floor: u64) -> Result<u64, LearnerError> {
    if version < floor {
        return Ok(floor);
    }
    let raised = version
        .checked_add(super::VERSION_FLOOR_STRIDE)
        .ok_or_else(|| {
            LearnerError::Checkpoint(format!(
                "version {version} leaves no room for a version floor; --fresh starts over"
            ))
        })?;
    write_version_floor(dir, raised)?;
    Ok(raised)
}

/// Deletes the checkpoints and final weights in `dir` (`--fresh`).
pub fn clear(dir: &Path) -> Result<usize, LearnerError> {
    let mut removed = remove_unfinished_writes(dir);
    let checkpoints = list(dir)?;
    // (Said before they go: a run's work, deleted on purpose, but often by
    // a plain re-run of a script that starts fresh by default.)
    let newest_step = checkpoints.last().map(|(step, _)| *step);
    let final_weights = dir.join(FINAL_WEIGHTS).exists();
    if !checkpoints.is_empty() || final_weights {
        warn!(
            dir = %dir.display(),
            deleted_checkpoints = checkpoints.len(),
            newest_step,
            final_weights,
            "started fresh: deleting the earlier run's checkpoints"
        );
    }
    for path in checkpoints
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
    if removed > 0 && newest_step.is_none() && !final_weights {
        info!(dir = %dir.display(), removed, "started fresh: removed what an earlier run left");
    }
    // Gone for good before this run writes: a crash of the machine before
    // its first write would otherwise bring the earlier run back, and the
    // next start without --fresh would resume it.
    if removed > 0 {
        sync_folder(dir).map_err(checkpoint_error)?;
    }
    Ok(removed)
}
