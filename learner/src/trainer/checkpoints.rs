//! The trainer's side of checkpoints: when one is due; writing it (the
//! tensors copied on this thread, handed to [`checkpoint::Writer`]'s
//! thread); the last one at a run's end or after an error, and the final
//! weights; the version floor raised before versions are published; and,
//! at start, the resumed checkpoint's state put back (optimizers,
//! evaluator, counters, which are checked first).

use std::time::Instant;

use flgfn_common::policy::{load_vars, vars_to_host};
use flgfn_common::weights::NamedArray;
use tracing::{debug, info, warn};

use super::{Progress, Trainer, Training, unless_libtorch_fails};
use crate::adam::Adam;
use crate::checkpoint::{self, Checkpoint, CheckpointState, ResumedTotals, SoundThrough, prefixed};
use crate::error::LearnerError;
use crate::evaluator::Evaluator;

impl Trainer {
    /// After an error in training: the state to resume from, saved where
    /// it can be. A failed write (metrics, a checkpoint, the version
    /// floor) or a diverged model still leaves it: the weights are the
    /// last finite ones (a non-finite step moves nothing), and whatever
    /// was trained since the last checkpoint would otherwise be lost.
    /// Best effort, logged: the disk that failed may fail again.
    pub(super) fn save_after_error(&self, training: &mut Training, error: &LearnerError) {
        let progress = &training.progress;
        // Not a checkpoint of the last step whose report failed: it would
        // say the run is over, and resumed, the run would train nothing
        // and write no last report (an experiment's run would fail on
        // every retry); it resumes from the last checkpoint instead and
        // trains the rest again. Nor of a last step whose policy diverged:
        // resumed, that run would count as finished and end well.
        let last_unreported = self.finished(progress) && progress.report.step != progress.step;
        let last_diverged = self.finished(progress) && progress.non_finite_draws > 0;
        if last_unreported || last_diverged {
            warn!(
                step = progress.step,
                %error,
                "no checkpoint of the last step (its report failed, or its policy diverged): a resume trains again from the last checkpoint"
            );
        } else if let Some(dir) = &self.checkpoint_dir {
            match self.save_last_checkpoint(dir, training) {
                Ok(()) => {
                    warn!(step = training.progress.step, %error, "checkpoint saved after an error")
                }
                Err(again) => {
                    tracing::error!(%error, %again, "no checkpoint could be saved after an error");
                }
            }
        }
    }

    /// The end of a run, saved: the state to resume from and the weights
    /// to use (on every way out of the loop: `max_steps`, or a stop by a
    /// signal or by every local actor gone). Nothing where checkpoints are
    /// off.
    pub(super) fn save_final(
        &self,
        training: &mut Training,
        weights: &[u8],
    ) -> Result<(), LearnerError> {
        let Some(dir) = &self.checkpoint_dir else {
            // A run's end that leaves no file behind: said at its end, where
            // a reader looks for its weights.
            info!("final weights not written: checkpoints are off (learner.checkpoint_dir = \"\")");
            return Ok(());
        };
        // The weights first: the last step's checkpoint says the run is
        // over, and a learner killed between the two writes, or failing
        // the second, would restart to a finished run without its final
        // weights (and end at once, while its actors wait in backoff).
        // This way round it resumes from the checkpoint before and trains
        // the rest with them. (At a stop, this step's checkpoint is saved
        // already: see `end_training`.)
        let path = checkpoint::write_file(dir, checkpoint::FINAL_WEIGHTS, weights)?;
        info!(path = %path.display(), version = training.progress.version, "final weights saved");
        self.save_last_checkpoint(dir, training)
    }

    /// The checkpoint a run ends with (its end, or an error), written
    /// before this returns, and the version floor brought down to it:
    /// nothing above its version was published, and it holds those
    /// weights, so a restart continues from it without a jump. (Not after
    /// libtorch failed inside a step: the weights may be one update past
    /// that version, and the floor is kept or raised above it, so that a
    /// restart jumps above it instead of issuing the version again with
    /// other weights.) An earlier
    /// write that failed is logged: this one stands in for it. libtorch
    /// failing while it reads the weights (a device gone bad after an
    /// error, say) is an error, not a panic of the trainer thread.
    fn save_last_checkpoint(
        &self,
        dir: &std::path::Path,
        training: &mut Training,
    ) -> Result<(), LearnerError> {
        if let Err(error) = wait_for_write(&mut training.writer, &mut training.progress) {
            warn!(%error, "an earlier checkpoint write failed");
        }
        unless_libtorch_fails(training.progress.step, || {
            self.save_checkpoint(training)?;
            let Training {
                progress, writer, ..
            } = training;
            wait_for_write(writer, progress)?;
            if progress.weights_may_be_ahead {
                return self.raise_version_floor(progress);
            }
            checkpoint::write_version_floor(dir, progress.step + progress.version_offset)
        })
        .and_then(|saved| saved)
    }

    /// Moves the recorded version floor ahead before `progress.version`
    /// is published, so that a learner killed at any moment restarts above
    /// every version an actor may hold.
    pub(super) fn raise_version_floor(&self, progress: &mut Progress) -> Result<(), LearnerError> {
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(());
        };
        progress.version_floor =
            checkpoint::floor_above(dir, progress.version, progress.version_floor)?;
        Ok(())
    }

    /// Whether a periodic checkpoint is due after this step.
    pub(super) fn checkpoint_due(&self, progress: &Progress) -> bool {
        let learner = &self.config.learner;
        if self.checkpoint_dir.is_none() {
            return false;
        }
        let by_steps = learner.checkpoint_every_steps > 0
            && progress.step.is_multiple_of(learner.checkpoint_every_steps);
        let by_time = learner.checkpoint_every_s > 0.0
            && progress.wall() - progress.last_checkpoint_wall >= learner.checkpoint_every_s;
        by_steps || by_time
    }

    /// Starts writing a checkpoint of everything the run needs to
    /// continue: the trainer copies it, `writer` writes it. The write
    /// before is waited for first, so that one copy at a time is held.
    pub(super) fn save_checkpoint(&self, training: &mut Training) -> Result<(), LearnerError> {
        let Training {
            optimizer,
            own_optimizer,
            evaluator,
            progress,
            writer,
        } = training;
        wait_for_write(writer, progress)?;
        let Some(writer) = writer.as_mut() else {
            return Ok(());
        };
        // Queued steps finish first, as training time (reading the
        // weights below would wait for them, counted as writing).
        self.wait_for_device();
        let started = Instant::now();
        let mut arrays: Vec<NamedArray> = prefixed("policy", self.policy.weights()).collect();
        arrays.extend(prefixed("adam", optimizer.state()));
        if let Some((vars, _)) = self.objective.own_parameters() {
            arrays.extend(prefixed("objective", vars_to_host(vars)));
        }
        if let Some((own, _)) = own_optimizer {
            arrays.extend(prefixed("objective_adam", own.state()));
        }
        let wall_s = progress.wall();
        let state = CheckpointState {
            format: checkpoint::FORMAT,
            step: progress.step,
            // These weights' version, not the last published one (lower
            // between two publications): a resumed run counts from here.
            version: progress.step + progress.version_offset,
            wall_s,
            trained_transitions: progress.trained_transitions,
            time_to_quality_s: progress.time_to_quality,
            totals: ResumedTotals {
                // Skipped steps reach `totals` at reports: a checkpoint
                // between two reports adds those of the window so far.
                skipped_batches: progress.totals.skipped_batches + progress.window.skipped_steps(),
                ..progress.totals.clone()
            },
            adam_steps: optimizer.steps(),
            objective_adam_steps: own_optimizer.as_ref().map_or(0, |(own, _)| own.steps()),
            evaluator: evaluator.state(),
            config: self.config.to_toml(),
            task: self.env.spec().to_string(),
            model: self.policy.spec().to_string(),
            build: crate::BUILD.to_owned(),
            sound_through: progress
                .sound_through()
                .map_or(SoundThrough::Nothing, SoundThrough::Step),
        };
        // The reports up to this step reach the disk before it can: after
        // a power loss, a resume keeps the reports up to its checkpoint,
        // which must then all be there. (A failure only warns: the
        // checkpoint matters more, above all the one saved after an
        // error.)
        if let Some(metrics) = &self.metrics
            && let Err(error) = metrics.sync()
        {
            warn!(%error, "the metrics file could not be synced before a checkpoint");
        }
        writer.start(state, arrays)?;
        progress.last_checkpoint_wall = wall_s;
        progress.checkpointed_step = Some(progress.step);
        // The copy is not training: out of `wall_s` like evaluation.
        let copied = started.elapsed();
        progress.time_left_out += copied;
        debug!(
            step = progress.step,
            copy_us = copied.as_micros() as u64,
            "checkpoint copied for writing"
        );
        Ok(())
    }

    /// Puts the optimizers, the objective's parameters, the evaluator and
    /// the counters back as `checkpoint` left them.
    pub(super) fn restore(
        &self,
        checkpoint: &Checkpoint,
        optimizer: &mut Adam,
        own_optimizer: Option<&mut (Adam, f64)>,
        evaluator: &mut Evaluator,
        progress: &mut Progress,
    ) -> Result<(), LearnerError> {
        let state = &checkpoint.state;
        // (Its counters and figures were checked in `resume::restore`.)
        // Intact (its checksum held) but not usable: an older one may be.
        let fail = |e: String| checkpoint.unusable(e);
        optimizer
            .restore("adam", &checkpoint.group("adam"), state.adam_steps)
            .map_err(fail)?;
        if let Some((vars, _)) = self.objective.own_parameters() {
            load_vars(vars, &checkpoint.group("objective"))
                .map_err(|e| fail(format!("the objective's parameters (`objective/`): {e}")))?;
        }
        if let Some((own, _)) = own_optimizer {
            own.restore(
                "objective_adam",
                &checkpoint.group("objective_adam"),
                state.objective_adam_steps,
            )
            .map_err(fail)?;
        }
        evaluator.restore(&state.evaluator);
        progress.step = state.step;
        progress.trained_transitions = state.trained_transitions;
        progress.resumed_trained_transitions = state.trained_transitions;
        progress.resumed_sound = match state.sound_through {
            SoundThrough::Unknown => Some(state.step),
            SoundThrough::Nothing => None,
            SoundThrough::Step(step) => Some(step),
        };
        progress.totals = state.totals.clone();
        progress.time_to_quality = state.time_to_quality_s;
        progress.wall_before = state.wall_s;
        progress.last_checkpoint_wall = state.wall_s;
        progress.last_report_wall = state.wall_s;
        progress.next_report_wall = state.wall_s + self.config.learner.first_report_s;
        progress.last_report_counts = (state.trained_transitions, 0);
        Ok(())
    }
}

/// Waits for the checkpoint write in progress, if any, and returns how it
/// went; the wait is not training (out of `wall_s`).
pub(super) fn wait_for_write(
    writer: &mut Option<checkpoint::Writer>,
    progress: &mut Progress,
) -> Result<(), LearnerError> {
    let waited = Instant::now();
    let written = writer.as_mut().map_or(Ok(()), checkpoint::Writer::finish);
    progress.time_left_out += waited.elapsed();
    written
}
