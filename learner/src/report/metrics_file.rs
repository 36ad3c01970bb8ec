//! The metrics file: one JSON line per report, flushed; locked for the
//! run; an earlier run's reports set aside, a resumed run's cut back to
//! the step it resumes at.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Report;
use crate::error::LearnerError;

/// Appends reports to a JSON-lines file, one flushed line each, so a crash
/// loses at most the report being written.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    out: BufWriter<File>,
    /// A file of its own, not a stream, a pipe or a device: the run's
    /// summary goes beside it.
    plain_file: bool,
    /// The report a resumed run's earlier process wrote at the step it
    /// resumes at, if the file kept one: the run's last report until this
    /// process writes its own (see [`MetricsFile::take_resumed_report`]).
    resumed_report: Option<Report>,
}

/// The leading whole lines of a metrics file whose reports are at or
/// before `step` (a line that is not a report is kept).
fn reports_up_to(contents: &[u8], step: u64) -> &[u8] {
    let mut end = 0;
    for line in contents.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        let past = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|report| report.get("step").and_then(serde_json::Value::as_u64))
            .is_some_and(|at| at > step);
        if past {
            break;
        }
        end += line.len();
    }
    &contents[..end]
}

/// The last report of `reports` (whole lines), if it is of `step`.
fn last_report_at(reports: &[u8], step: u64) -> Option<Report> {
    let last = reports
        .split(|&b| b == b'\n')
        .rfind(|line| !line.is_empty())?;
    serde_json::from_slice::<Report>(last)
        .ok()
        .filter(|report| report.step == step)
}

/// How every line of a metrics file starts (`step` is a report's first
/// field).
const REPORT_START: &[u8] = b"{\"step\":";

/// Whether `path` names a stream rather than a file of its own:
/// `/dev/stdout`, `/dev/fd/N` and the like, or a link into `/dev` or
/// `/proc` (each link followed, up to a few).
fn is_stream(path: &Path) -> bool {
    let mut at = path.to_path_buf();
    for _ in 0..8 {
        if at.starts_with("/dev") || at.starts_with("/proc") {
            return true;
        }
        match std::fs::read_link(&at) {
            Ok(target) => {
                at = match at.parent() {
                    Some(parent) => parent.join(target),
                    None => target,
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// Writes `contents` (an earlier run's reports) beside the file they came
/// from (a link's target: its history stays in one place), as
/// `<file>.<n>`, one past the highest number there (the highest is the
/// newest), synced before that file is cut. Returns where.
fn keep_earlier_reports(path: &Path, contents: &[u8]) -> std::io::Result<PathBuf> {
    let file = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let folder = crate::durable_file::parent_of(&file)
        .unwrap_or(Path::new("."))
        .to_owned();
    // Numbers of plain ASCII digits after `<file>.`, compared as bytes
    // (a name need not be UTF-8).
    let name = file.file_name().unwrap_or_default().as_bytes().to_vec();
    let highest = std::fs::read_dir(&folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.file_name();
            let digits = entry
                .as_bytes()
                .strip_prefix(name.as_slice())?
                .strip_prefix(b".")?;
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(digits).ok()?.parse::<u32>().ok()
        })
        .max()
        .unwrap_or(0);
    let cannot = |beside: &Path, why: std::io::Error| {
        std::io::Error::new(
            why.kind(),
            format!(
                "cannot keep the reports it holds in {} ({why}), and leaves them: give --metrics a new path",
                beside.display()
            ),
        )
    };
    let first = highest.checked_add(1).ok_or_else(|| {
        std::io::Error::other(format!(
            "{}.{highest} is the highest number there: give --metrics a new path",
            file.display()
        ))
    })?;
    for number in first..=u32::MAX {
        let mut numbered = file.as_os_str().to_owned();
        numbered.push(format!(".{number}"));
        let beside = PathBuf::from(numbered);
        let mut copy = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&beside)
        {
            Ok(copy) => copy,
            // (Made meanwhile.)
            Err(taken) if taken.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(other) => return Err(cannot(&beside, other)),
        };
        if let Err(error) = copy.write_all(contents).and_then(|()| copy.sync_all()) {
            // No half copy left to be taken for the reports.
            drop(copy);
            let _ = std::fs::remove_file(&beside);
            return Err(cannot(&beside, error));
        }
        return Ok(beside);
    }
    Err(std::io::Error::other("no free name to keep its reports in"))
}

impl MetricsFile {
    /// Opens the file: with `resumed_at` (a run resuming at that step), it
    /// keeps the reports up to that step and appends; otherwise it
    /// moves what it holds to `<path>.<n>` (see `keep_earlier_reports`) and
    /// empties it. Reports past the step a run resumes at describe
    /// training that is done again (the learner stopped after its last
    /// checkpoint): they go, so steps only ever increase. A last line torn
    /// by a crash goes too, so every line stays one JSON object.
    ///
    /// A plain file (or a link to one) is locked for the run, and checked
    /// before anything in it is cut: a second learner given the same path
    /// would empty the first one's reports while the first wrote on at its
    /// old offset, and a path given by mistake (`--metrics job.toml`) would
    /// lose the file. A pipe, a device or a stream (`/dev/stdout`, even
    /// where it is redirected to a file: `>> runs.jsonl` holds other runs'
    /// reports, a batch job's output other lines) is appended to as it is:
    /// reading it would block or read the terminal, and two runs may well
    /// share one.
    pub fn open(path: &Path, resumed_at: Option<u64>) -> Result<Self, LearnerError> {
        let error = |source| LearnerError::Metrics {
            path: path.display().to_string(),
            source,
        };
        let plain_file = match std::fs::metadata(path) {
            Ok(_) if is_stream(path) => false,
            Ok(metadata) => metadata.is_file(),
            // Created below, as a plain file, in folders made for it (as
            // the checkpoint folder is).
            Err(missing) if missing.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(error)?;
                }
                true
            }
            Err(other) => return Err(error(other)),
        };
        if !plain_file {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(error)?;
            return Ok(MetricsFile {
                path: path.to_owned(),
                out: BufWriter::new(file),
                plain_file,
                resumed_report: None,
            });
        }
        // Not truncated on opening: the lock and the contents come first.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(error(std::io::Error::other(
                    "another process is writing its reports to this file (a second learner given the same --metrics?): give each run its own metrics file",
                )));
            }
            // A file system without working locks (NFS without its lock
            // daemon: ENOLCK): written unguarded, as the checkpoint
            // folder's lock does.
            Err(std::fs::TryLockError::Error(why)) => {
                tracing::warn!(path = %path.display(), error = %why, "cannot lock the metrics file; make sure no other learner writes to it");
            }
        }
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).map_err(error)?;
        // Every report is a JSON object whose first field is its step.
        if !contents.is_empty() && !contents.starts_with(REPORT_START) {
            return Err(error(std::io::Error::other(
                "it holds something other than metrics (it does not start with a report, `{\"step\":`), and is left as it is: give --metrics a new path, or remove the file",
            )));
        }
        let kept = resumed_at.map_or(0, |step| reports_up_to(&contents, step).len());
        let resumed_report = resumed_at.and_then(|step| last_report_at(&contents[..kept], step));
        let mut set_aside_as = None;
        // In place (one truncation, the kept reports untouched), so that
        // the lock and any link stay.
        if kept < contents.len() {
            let dropped = contents[kept..].iter().filter(|&&b| b == b'\n').count();
            match resumed_at {
                // Training that is done again: its reports are replaced
                // by the new ones.
                Some(step) => {
                    tracing::info!(path = %path.display(), dropped, "metrics: dropped the reports after step {step}, where the run resumed")
                }
                // Another run's reports (`deploy/local.sh` always starts
                // fresh; a mistyped --checkpoint-dir finds nothing to
                // resume): kept, beside, before the file is cut.
                None => {
                    let beside = keep_earlier_reports(path, &contents).map_err(error)?;
                    tracing::warn!(path = %path.display(), reports = dropped, moved_to = %beside.display(), "metrics: a fresh run starts this file over; the reports it held were moved, with any summary of theirs (give each run its own --metrics path)");
                    set_aside_as = beside.extension().map(ToOwned::to_owned);
                }
            }
            file.set_len(kept as u64).map_err(error)?;
        }
        file.seek(std::io::SeekFrom::End(0)).map_err(error)?;
        let metrics = MetricsFile {
            path: path.to_owned(),
            out: BufWriter::new(file),
            plain_file,
            resumed_report,
        };
        metrics.retire_summary(set_aside_as.as_deref())?;
        Ok(metrics)
    }

    /// The report the file kept at the step the run resumed at (written
    /// by the process before), once: a resumed run that trains no step
    /// (finished already, or stopped at once) ends with it, not with a
    /// report of zeros.
    pub fn take_resumed_report(&mut self) -> Option<Report> {
        self.resumed_report.take()
    }

    /// Takes an earlier run's summary out of the way, so that a summary
    /// found beside the file is always this run's end (a learner killed
    /// outright writes none): numbered as its reports were set aside
    /// (`run.summary.json.3` beside `run.jsonl.3`), or removed (a resumed
    /// run's end writes it again; a file that held no reports had no run
    /// worth it).
    fn retire_summary(&self, set_aside_as: Option<&std::ffi::OsStr>) -> Result<(), LearnerError> {
        let Some(summary) = self.summary_path() else {
            return Ok(());
        };
        let retired = match set_aside_as {
            Some(number) => {
                let mut numbered = summary.clone().into_os_string();
                numbered.push(".");
                numbered.push(number);
                std::fs::rename(&summary, numbered)
            }
            None => std::fs::remove_file(&summary),
        };
        match retired {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LearnerError::Metrics {
                path: summary.display().to_string(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Where the reports go, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the run's summary is written: beside a plain file,
    /// `run.jsonl` giving `run.summary.json` (beside a link's target, where
    /// earlier reports are set aside: each summary stays with its
    /// reports); nowhere for a stream, a pipe or a device (`/dev/stdout`),
    /// whose folder is not the run's.
    pub fn summary_path(&self) -> Option<PathBuf> {
        self.plain_file.then(|| {
            std::fs::canonicalize(&self.path)
                .unwrap_or_else(|_| self.path.clone())
                .with_extension("summary.json")
        })
    }

    /// Makes the reports written so far durable (each is flushed as it is
    /// written; this waits for the disk). A stream is not synced.
    pub fn sync(&self) -> Result<(), LearnerError> {
        match self.out.get_ref().sync_data() {
            Ok(()) => Ok(()),
            // A pipe, a terminal, /dev/null: nothing to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            Err(source) => Err(LearnerError::Metrics {
                path: self.path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes one JSON object and a newline.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<(), LearnerError> {
        let error = |source| LearnerError::Metrics {
            path: self.path.display().to_string(),
            source,
        };
        serde_json::to_writer(&mut self.out, record).map_err(|e| error(e.into()))?;
        self.out.write_all(b"\n").map_err(error)?;
        self.out.flush().map_err(error)
    }
}
