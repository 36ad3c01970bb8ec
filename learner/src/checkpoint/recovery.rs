//! Finding the checkpoint to resume from: the newest that reads back
//! intact, damaged ones set aside (the newest few kept for a post-mortem).

use std::fs;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::error::LearnerError;

use super::{Checkpoint, Unusable, file_name, list, named_step, parse, read};

/// Suffix of a damaged checkpoint set aside.
pub(super) const DAMAGED_SUFFIX: &str = ".damaged";

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
        Reader::Resuming => super::older_one_remedy_in(dir),
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
            // Pruned since it was listed (a run writing meanwhile): gone,
            // name and all. A name left (a link to a file moved away, or
            // on a volume not mounted) is no such thing: while it stays
            // the newest, pruning would delete every checkpoint a
            // resumed run writes, as older than it. A reader skips it.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && (reader == Reader::Reading || fs::symlink_metadata(path).is_err()) =>
            {
                continue;
            }
            // Not damage, which could be set aside: a file this process
            // cannot read (permissions, a failing disk, a link to nothing).
            // Resuming from an older one would leave it the newest, and
            // pruning would delete every checkpoint the resumed run
            // writes before it.
            Err(e) => {
                let remedy = if e.kind() == std::io::ErrorKind::NotFound {
                    "a link to a file that is not there: bring the file back, or remove the link"
                } else {
                    "make it readable"
                };
                return Err(LearnerError::Checkpoint(format!(
                    "cannot read {}: {e}; {remedy}, or {older}",
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
    if let Some(dir) = paths
        .first()
        .and_then(|path| crate::durable_file::parent_of(path))
    {
        // Renamed for good before new checkpoints are written beside them.
        crate::durable_file::sync_folder(dir).map_err(super::checkpoint_error)?;
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
pub(super) fn damaged_in(dir: &Path) -> Vec<(u64, PathBuf)> {
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
