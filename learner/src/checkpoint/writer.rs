//! The background writer: checkpoints written on a thread of their own
//! while training goes on, in order, their failures reported once.

use std::path::PathBuf;

use flgfn_common::weights::NamedArray;
use tracing::{info, warn};

use crate::error::LearnerError;

use super::{CheckpointState, Keep, file_name, save};

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
