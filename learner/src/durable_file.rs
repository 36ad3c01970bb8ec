//! Files written whole or not at all, and kept through a crash of the
//! machine: checkpoints, the final weights, the version floor, the run's
//! summary and an experiment's tables.
//!
//! A write goes to a temporary file in the same folder, is synced, renamed
//! over the final name, and the folder synced (where its file system can:
//! see `folder_synced`); missing folders are made first, each synced into
//! its parent. Errors name the path, and say "not
//! a folder" where a file is in the way, which the OS says only as "Not a
//! directory". Callers add their context (the checkpoint folder names
//! its key, the summary is the metrics file's).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file operation that failed, named by its path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A file where a folder should be (a folder replaced while the
    /// learner runs, say).
    #[error("{}: not a folder (a file is in the way)", path.display())]
    NotAFolder {
        /// The file in the way.
        path: PathBuf,
    },
    /// Any other failure (a full disk, a folder not writable).
    #[error("{}: {error}", path.display())]
    Io {
        /// What was being written, read or made.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
}

impl FileError {
    /// A failed operation on `path`. A "Not a directory" names the file
    /// in the way: `path`, or a folder above it.
    pub fn at(path: &Path, error: std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::NotADirectory {
            let file = path
                .ancestors()
                .find(|at| at.exists() && !at.is_dir())
                .unwrap_or(path);
            return Self::NotAFolder {
                path: file.to_path_buf(),
            };
        }
        Self::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// For callers whose errors carry an `std::io::Error`: the kind kept, the
/// message whole (path included).
impl From<FileError> for std::io::Error {
    fn from(error: FileError) -> Self {
        let kind = match &error {
            FileError::NotAFolder { .. } => std::io::ErrorKind::NotADirectory,
            FileError::Io { error, .. } => error.kind(),
        };
        std::io::Error::new(kind, error.to_string())
    }
}

/// The name the file `name` is written under before its rename: hidden,
/// and recognisable as an unfinished write. (Of any bytes: a summary
/// beside a metrics file of any name.)
pub fn temporary_name(name: impl AsRef<std::ffi::OsStr>) -> std::ffi::OsString {
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(name);
    hidden.push(".tmp");
    hidden
}

/// The folder holding `path`: `.` for a bare name ("checkpoints" has
/// the working directory as its parent, ""), None for a root.
pub fn parent_of(path: &Path) -> Option<&Path> {
    path.parent().map(|parent| {
        if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        }
    })
}

/// Makes `dir` and any missing parents, each new folder's entry synced to
/// the disk in its parent: else a crash could lose the folders with the
/// files written into the innermost. Returns the folders made, `dir` first.
pub fn create_dir_durably(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    if dir.is_dir() {
        return Ok(Vec::new());
    }
    // The folders about to be made, up to the first that exists.
    let mut missing = vec![dir];
    while let Some(parent) = missing.last().and_then(|folder| parent_of(folder))
        && !parent.is_dir()
        && parent != Path::new(".")
    {
        missing.push(parent);
    }
    fs::create_dir_all(dir).map_err(|e| {
        // "File exists" would hide what is wrong: a file (or a link to
        // one) where the folder should be.
        if e.kind() == std::io::ErrorKind::AlreadyExists
            && let Some(file) = missing.iter().find(|folder| folder.exists())
        {
            return FileError::NotAFolder {
                path: file.to_path_buf(),
            };
        }
        FileError::at(dir, e)
    })?;
    for folder in missing.iter().rev() {
        let parent = parent_of(folder).unwrap_or(Path::new("."));
        match File::open(parent).and_then(|d| d.sync_all()) {
            Ok(()) => {}
            // A parent that may be written but not read (mode 1733: a
            // shared drop folder) cannot be opened to sync; the folder is
            // made, only its durability is best effort there.
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::warn!(
                    folder = %folder.display(),
                    parent = %parent.display(),
                    "could not sync the new folder's entry in its parent (permission denied): a crash of the machine may lose the folder"
                );
            }
            Err(error) => folder_synced(parent, Err(error))?,
        }
    }
    Ok(missing.into_iter().map(Path::to_path_buf).collect())
}

/// Writes `bytes` to `dir/name` atomically: temporary file, fsync, rename,
/// fsync of the directory (made first if missing, durably). `name` need
/// not be UTF-8 (a summary beside a metrics file of any name).
pub fn write_atomically(
    dir: &Path,
    name: impl AsRef<std::ffi::OsStr>,
    bytes: &[u8],
) -> Result<PathBuf, FileError> {
    create_dir_durably(dir)?;
    let path = dir.join(name.as_ref());
    let temporary = dir.join(temporary_name(name));
    let written = File::create(&temporary).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(error) = written {
        // A full disk stays full of a file-sized part file otherwise
        // (a checkpoint's: until the next start removes it).
        let _ = fs::remove_file(&temporary);
        return Err(FileError::at(&temporary, error));
    }
    if let Err(error) = fs::rename(&temporary, &path) {
        let _ = fs::remove_file(&temporary);
        return Err(FileError::at(&path, error));
    }
    sync_folder(dir)?;
    Ok(path)
}

/// Syncs `dir`'s entries to the disk: what was renamed or deleted in it
/// stays so after a crash of the machine (where its file system can sync
/// a folder at all: one that cannot is said once, and not an error).
pub fn sync_folder(dir: &Path) -> Result<(), FileError> {
    folder_synced(dir, File::open(dir).and_then(|d| d.sync_all()))
}

/// Whether a folder's sync went well enough: some file systems cannot
/// sync a folder at all (a FUSE or network mount that answers "invalid
/// argument" or "not supported"), and refusing every write there would
/// leave a run on such storage with no checkpoint. The file itself is
/// synced before its rename; the rename's durability is then the file
/// system's, which is said once per process. Any other failure is one.
fn folder_synced(dir: &Path, synced: std::io::Result<()>) -> Result<(), FileError> {
    use std::io::ErrorKind::{InvalidInput, Unsupported};
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    match synced {
        Ok(()) => Ok(()),
        Err(error) if matches!(error.kind(), InvalidInput | Unsupported) => {
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    folder = %dir.display(),
                    %error,
                    "this file system cannot sync a folder: files are synced before their rename, but a crash of the machine may undo a rename (said once)"
                );
            }
            Ok(())
        }
        Err(error) => Err(FileError::at(dir, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flgfn-durable-file-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// A folder that its file system cannot sync (EINVAL, ENOTSUP,
    /// ENOSYS, as some FUSE and network mounts answer) takes the write;
    /// any other failure of the sync fails it, naming the folder.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_folder_that_cannot_be_synced_takes_the_write_other_failures_do_not() {
        let dir = Path::new("/mnt/checkpoints");
        for errno in [libc_errno::EINVAL, libc_errno::ENOTSUP, libc_errno::ENOSYS] {
            let refused = std::io::Error::from_raw_os_error(errno);
            assert!(folder_synced(dir, Err(refused)).is_ok(), "errno {errno}");
        }
        for errno in [libc_errno::EIO, libc_errno::ENOSPC] {
            let failed = std::io::Error::from_raw_os_error(errno);
            let error = folder_synced(dir, Err(failed)).unwrap_err().to_string();
            assert!(error.starts_with("/mnt/checkpoints: "), "{error}");
        }
        assert!(folder_synced(dir, Ok(())).is_ok());
    }

    /// Linux's numbers for the errors above.
    #[cfg(target_os = "linux")]
    mod libc_errno {
        pub const EIO: i32 = 5;
        pub const EINVAL: i32 = 22;
        pub const ENOSPC: i32 = 28;
        pub const ENOSYS: i32 = 38;
        pub const ENOTSUP: i32 = 95;
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
        let message = FileError::at(&inside, error).to_string();
        assert!(
            message.contains(&format!("{}: not a folder", folder.display())),
            "{message}"
        );
        // Made through the folder, and written into it: the same.
        for error in [
            create_dir_durably(&folder.join("deeper")).unwrap_err(),
            write_atomically(&folder, "file", b"x").unwrap_err(),
        ] {
            assert!(
                matches!(&error, FileError::NotAFolder { path } if path == &folder),
                "{error}"
            );
        }
        fs::remove_dir_all(&parent).unwrap();
    }

    /// The names of the entries in `dir`.
    fn names_in(dir: &Path) -> Vec<std::ffi::OsString> {
        fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect()
    }

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_temporary_file() {
        let root = scratch("replace");
        let dir = root.join("made").join("deep");
        write_atomically(&dir, "notes", b"first").unwrap();
        let path = write_atomically(&dir, "notes", b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(names_in(&dir), ["notes"]);
        fs::remove_dir_all(&root).unwrap();
    }

    /// A rename that fails (here onto a folder of the file's name) leaves
    /// no temporary file behind: a checkpoint-sized one otherwise stays
    /// until the next start.
    #[test]
    fn a_failed_rename_leaves_no_temporary_file() {
        let dir = scratch("failed-rename");
        fs::create_dir_all(dir.join("notes").join("inside")).unwrap();
        let error = write_atomically(&dir, "notes", b"x").unwrap_err();
        assert!(error.to_string().contains("notes"), "{error}");
        assert_eq!(names_in(&dir), ["notes"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_error_as_io_keeps_its_kind_and_path() {
        let error: std::io::Error = FileError::NotAFolder {
            path: PathBuf::from("runs/a"),
        }
        .into();
        assert_eq!(error.kind(), std::io::ErrorKind::NotADirectory);
        assert_eq!(
            error.to_string(),
            "runs/a: not a folder (a file is in the way)"
        );
    }
}
