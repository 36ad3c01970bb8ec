//! The trainer: one OS thread that owns the model and the optimizer.
//!
//! tch tensors are `Send` but not `Sync`, so the `VarStore`, Adam and every
//! tensor stay on this thread. A step costs its compute and little else:
//! the next batch is assembled meanwhile by the [`batcher`](crate::batcher)
//! thread; the batch is copied to the device without waiting; the loss is
//! summed on the device and read only when a report needs it; and a
//! published version is a device-side copy handed to the
//! [`Publisher`], which serialises it later, off this thread, and only if
//! an actor asks. Reports (with an evaluation) come at growing intervals
//! of training time (`first_report_s` up to `report_every_s`).
//!
//! # Layout
//!
//! - `mod.rs`: the [`Trainer`], its run (start, the training loop, the
//!   end) and a step.
//! - `checkpoints.rs`: checkpoints written (periodic, last, after an
//!   error), the final weights, the version floor, and the resumed
//!   checkpoint's state put back at start.
//! - `reports.rs`: reports (the evaluator called, metrics written), time
//!   to quality, and the stop of a run that diverged.
//! - `pulse.rs`: when the work under way began, for the run's watch on a
//!   stuck trainer.

mod checkpoints;
mod pulse;
mod reports;

pub use pulse::TrainerPulse;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flgfn_common::config::Config;
use flgfn_common::env::Environment;
use flgfn_common::objectives::Objective;
use flgfn_common::policy::Policy;
use flgfn_common::telemetry::panic_message;
use flgfn_common::weights::WeightEncoding;
use tch::{Kind, Tensor};
use tracing::{info, warn};

use crate::adam::Adam;
use crate::batcher::PreparedBatch;
use crate::checkpoint::{self, Checkpoint, ResumedTotals};
use crate::credits::CreditPool;
use crate::error::LearnerError;
use crate::evaluator::Evaluator;
use crate::ingest::IngestStats;
use crate::parameters::FlatParameters;
use crate::publisher::Publisher;
use crate::quality_probes::{Probe, QualityProbes};
use crate::report::{Machine, MetricsFile, Report};

/// Runs `compute` (step `step`'s libtorch calls), turning a panic (tch
/// panics where libtorch fails: out of GPU memory, say) into an error that
/// names the step and libtorch's message.
fn unless_libtorch_fails<T>(step: u64, compute: impl FnOnce() -> T) -> Result<T, LearnerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(compute)).map_err(|payload| {
        LearnerError::Trainer(format!(
            "libtorch failed in step {step}: {}",
            panic_message(&*payload)
        ))
    })
}

/// How long the trainer first waits for data before it says so. Each time
/// it does, the wait that is worth a line doubles, up to
/// [`LONGEST_DATA_WARNING`], for the rest of the run (a run whose every
/// batch takes longer, slow rollouts say, is told once, not every step);
/// one long wait is told at doubling intervals, at most that far apart.
const FIRST_DATA_WARNING: Duration = Duration::from_secs(10);
const LONGEST_DATA_WARNING: Duration = Duration::from_secs(300);

/// The fraction of the learning rate at step `step` (1-based) of
/// `max_steps`: 1 for the first half, then a linear decay to `last` at
/// `max_steps` (a large rate finds the target fast, a small one settles
/// log Z); `last` beyond `max_steps` (a resumed run given more steps
/// recomputes from its new `max_steps`).
fn learning_rate_fraction(step: u64, max_steps: u64, last: f64) -> f64 {
    let done = step as f64 / max_steps as f64;
    let decay = (2.0 * done - 1.0).clamp(0.0, 1.0);
    1.0 - (1.0 - last) * decay
}

/// What a finished run hands back.
#[derive(Debug, Clone)]
pub struct TrainingOutcome {
    /// Training steps done.
    pub steps: u64,
    /// Last published version.
    pub version: u64,
    /// The final weights as f32 safetensors, whatever the wire encoding
    /// (with the publisher's metadata: task, model, version); also
    /// `final.safetensors` in the checkpoint directory.
    pub weights: Bytes,
    /// The last report; [`serve`](crate::serve) brings its run-long
    /// counters (ingested, refused, stale, weights sent...) up to date once
    /// every session has ended.
    pub final_report: Report,
    /// Accepted transitions the run ended before training (in the batch
    /// builder or queued when it stopped), filled in by
    /// [`serve`](crate::serve): ingested = trained + stale + these (in a
    /// run that did not resume: a resumed run's trained count includes
    /// the checkpoint's, its ingested count this process's only).
    pub untrained_at_stop_transitions: u64,
    /// `wall_s` when quality was first reached, if it was: of the first
    /// report at quality, or of the earliest weights kept before it that
    /// are at quality ([`crate::quality_probes`]). One found only by a
    /// last report off the `eval_every_steps` grid (a stop's) is this
    /// process's: its checkpoint leaves it out, so a resumed run finds its
    /// own on the grid (or, training no step, takes that report's).
    pub time_to_quality_s: Option<f64>,
    /// Figures over the whole run.
    pub totals: RunTotals,
    /// What was counted for each actor session, filled in by
    /// [`serve`](crate::serve) once the sessions have ended: the first
    /// [`MAX_SESSION_RECORDS`](crate::ingest::MAX_SESSION_RECORDS).
    pub sessions: Vec<crate::ingest::SessionRecord>,
    /// How many sessions ended, every one, filled in with `sessions`.
    pub sessions_ended: u64,
    /// Local actor processes ([`crate::RunOptions::local_actors`]) that
    /// exited with an error, filled in by [`serve`](crate::serve).
    pub failed_local_actors: usize,
    /// What ended training, filled in by [`serve`](crate::serve).
    pub ended_by: EndedBy,
    /// Where it trained: its seconds are this machine's.
    pub machine: Machine,
    /// Whether the task sets quality thresholds: a run stopped before any
    /// report of this process has no `at_quality` to tell.
    pub judges_quality: bool,
}

impl TrainingOutcome {
    /// Whether the run reached quality at some evaluation: yes where it
    /// has a time to quality (a resumed run's, from its checkpoint, even
    /// before its first report); no where its task judges quality and it
    /// has none (a run stopped before its first report too); None where
    /// the task sets no quality target.
    pub fn quality_reached(&self) -> Option<bool> {
        match self.time_to_quality_s {
            Some(_) => Some(true),
            None => self.judges_quality.then_some(false),
        }
    }
}

/// What ended training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// The last step (`learner.max_steps`) was trained.
    MaxSteps,
    /// A stop (Ctrl-C, SIGTERM; or an error elsewhere, such as every local
    /// actor gone) before the last step: the run is over for the actors.
    Stop,
    /// A stop for a restart (SIGUSR1) before the last step: the actors
    /// wait for the learner to be started again on its checkpoint.
    Restart,
}

impl EndedBy {
    /// As the final log line writes it (`ended_by=`).
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::MaxSteps => "max_steps",
            EndedBy::Stop => "stop",
            EndedBy::Restart => "restart",
        }
    }
}

/// Figures over the whole run (reports cover the time since the previous
/// one).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RunTotals {
    /// Seconds from the first step to the last, evaluations left out.
    pub wall_s: f64,
    /// Seconds from the trainer's start (the learner already open to
    /// actors; its evaluator and optimizers made, a checkpoint restored)
    /// to its first step: actors connecting, the first weights' transfer,
    /// the first rollout and chunk. Out of `wall_s` (0 where no step was
    /// taken; this process's only, in a resumed run).
    pub first_step_after_s: f64,
    /// Transitions trained on.
    pub trained_transitions: u64,
    /// Mean over trained transitions of the policy lag.
    pub mean_policy_lag: f64,
    /// Largest lag of any chunk trained.
    pub max_policy_lag: u64,
    /// Fraction of `wall_s` the trainer waited for a batch.
    pub data_wait_fraction: f64,
    /// Milliseconds per step, waiting left out: compute plus fixed cost.
    pub busy_ms_per_step: f64,
    /// Mean transitions per step.
    pub mean_batch_transitions: f64,
}

/// Everything the trainer thread owns.
pub struct Trainer {
    /// Model and its weights; only this thread touches them.
    pub policy: Policy,
    /// The configured loss.
    pub objective: Box<dyn Objective>,
    /// The task, for evaluation.
    pub env: Arc<dyn Environment>,
    /// All settings (the learner section drives the loop).
    pub config: Config,
    /// Batches from the batch builder; closed when the learner stops.
    pub batches: Receiver<PreparedBatch>,
    /// Why the batch builder failed, set before it closes `batches`: a
    /// closed channel is then a failure, not a stop.
    pub batcher_failure: Arc<std::sync::OnceLock<String>>,
    /// The version of the weights the next step starts from (steps done,
    /// plus the offset a resume from the version floor adds), read by the
    /// batch builder to bound lag.
    pub steps_done: Arc<AtomicU64>,
    /// Weight versions.
    pub publisher: Arc<Publisher>,
    /// Counters shared with the service.
    pub stats: Arc<IngestStats>,
    /// The credit room, for reports.
    pub pool: Arc<CreditPool>,
    /// Where JSON reports go, if anywhere.
    pub metrics: Option<MetricsFile>,
    /// Where checkpoints and the final weights go, if anywhere.
    pub checkpoint_dir: Option<PathBuf>,
    /// The checkpoint this run continues (its weights are already in
    /// `policy`; the rest is restored when the loop starts).
    pub resume: Option<Checkpoint>,
    /// The first version this process publishes (the resumed one, or the
    /// recorded floor if higher).
    pub start_version: u64,
    /// The version floor found in the checkpoint directory.
    pub version_floor: u64,
    /// The checkpoint folder's lock: released when this thread ends, not
    /// before (the learner's task may be gone while it still writes).
    pub checkpoint_lock: Option<crate::checkpoint::FolderLock>,
    /// Said busy from a batch's arrival until the next wait for data, so
    /// that the run can tell a stuck trainer from a starved one.
    pub pulse: Arc<TrainerPulse>,
}

/// Running sums between two reports.
#[derive(Debug, Default)]
struct Window {
    /// Sum of the finite losses, on the device: read only at reports.
    loss_sum: Option<Tensor>,
    /// Steps whose loss and gradients were finite, on the device; the
    /// others were skipped.
    finite_steps: Option<Tensor>,
    steps: u64,
    max_lag: u64,
    lag_weighted: f64,
    transitions: u64,
    trajectories: u64,
    truncated: u64,
    /// Time spent waiting for data after training started.
    waiting: Duration,
}

impl Window {
    /// Steps skipped as not finite (reads the device counter).
    fn skipped_steps(&self) -> u64 {
        let finite = self
            .finite_steps
            .as_ref()
            .map_or(0.0, |t| t.double_value(&[]));
        self.steps - (finite as u64).min(self.steps)
    }
}

/// What a user can do about a run that diverged: a lower learning rate,
/// from the checkpoint kept for it (pruning keeps the newest one at or
/// before [`Progress::sound_through`]); the ones after it may hold the
/// diverged model, and a resume from them diverges again.
fn divergence_remedy(progress: &Progress, checkpoint_dir: Option<&std::path::Path>) -> String {
    let lower = "a lower learner.learning_rate (or TB's objective.log_z_learning_rate)";
    let Some(dir) = checkpoint_dir else {
        return format!("start again with {lower}");
    };
    // (As Progress::sound_through, with why.)
    let (through, why) = match (progress.last_sound_report, progress.resumed_sound) {
        (Some(step), _) => (
            step,
            format!("step {step}, this run's last report with every step and draw finite"),
        ),
        // Resumed: the checkpoint may well be sound (a rate that jumped
        // with a changed max_steps), and --fresh would delete the run.
        (None, Some(step)) => (
            step,
            format!(
                "step {step}, the last known sound when this learner resumed (no report since had every step and draw finite)"
            ),
        ),
        (None, None) => {
            return format!(
                "no report of this run had every step and draw finite (or none was made): start over with --fresh and {lower}"
            );
        }
    };
    match checkpoint::newest_at_or_before(dir, through) {
        Some((step, path)) => format!(
            "checkpoints after {why}, may hold the diverged model: move those after step {step} out of {}, then resume from {} (kept for this) with {lower} and --resume-changed (should that diverge at once again, this one holds it too); or start over with --fresh",
            dir.display(),
            path.display()
        ),
        None => format!(
            "no checkpoint at or before {why} is left in {}: start over with --fresh and {lower}",
            dir.display()
        ),
    }
}

/// Where training stands; everything a report is made from.
#[derive(Debug, Default)]
struct Progress {
    step: u64,
    version: u64,
    trained_transitions: u64,
    /// Of them, the checkpoint's this run resumed from.
    resumed_trained_transitions: u64,
    diverged_reports: u32,
    /// The step of this process's last report with every step finite and
    /// every evaluation draw finite: a run that diverges names the
    /// checkpoints after it, which may hold the diverged model.
    last_sound_report: Option<u64>,
    /// The last step known sound when this learner resumed: as the
    /// checkpoint recorded it, or that checkpoint's own step where it did
    /// not (None: fresh, or none was).
    resumed_sound: Option<u64>,
    /// The last evaluation's draws at states where the logits were not
    /// finite: the final one's must be none.
    non_finite_draws: usize,
    window: Window,
    /// Set at the first training step: `wall_s` counts from there.
    started: Option<Instant>,
    /// From the trainer's start to `started` (see
    /// [`RunTotals::first_step_after_s`]).
    first_step_after: Duration,
    /// Time left out of `wall_s`: evaluations and the rest of each
    /// report, checkpoint writes, and at a stop the wait for data since
    /// the last step.
    time_left_out: Duration,
    /// Training seconds of the run before this process (resumed runs).
    wall_before: f64,
    /// Versions are `step + version_offset`: 0 in a fresh run; after a
    /// restart, whatever keeps versions above every one published before.
    version_offset: u64,
    /// No version above this has been published (recorded in the
    /// checkpoint directory before any is; after a clean stop, the final
    /// version, published with the final checkpoint's weights).
    version_floor: u64,
    /// libtorch failed inside a step: the policy may be one update past
    /// `step`, so the checkpoint saved after that error may not hold the
    /// weights published as its version, and the floor stays above it.
    weights_may_be_ahead: bool,
    /// `wall()` at the last checkpoint.
    last_checkpoint_wall: f64,
    /// The step of the last checkpoint this process wrote.
    checkpointed_step: Option<u64>,
    last_report_wall: f64,
    /// When the next report is due, in `wall_s`.
    next_report_wall: f64,
    /// Transitions trained and accepted at `last_report_wall`: where the
    /// current window's rates start. (The windows tile the run from its
    /// first step, each ingest rate counting what arrived during the
    /// evaluation before it: a window's ingest less its training is what
    /// queued or went stale meanwhile.)
    last_report_counts: (u64, u64),
    report: Report,
    time_to_quality: Option<f64>,
    /// A time to quality only the last, off-grid report found (see
    /// `end_training`), or, where a resumed run trains no step, the one
    /// the report it resumed at found: the run's outcome says it, its
    /// checkpoint does not.
    time_to_quality_off_grid: Option<f64>,
    /// Weights kept since the last report while quality is not reached
    /// yet (None: not looked for, or found).
    probes: Option<QualityProbes>,
    /// Whole-run sums (lag x transitions, largest lag, time waiting,
    /// skipped batches), kept in checkpoints as they are.
    totals: ResumedTotals,
}

impl Progress {
    /// The last step known sound, for pruning and the remedy of a
    /// divergence: this run's last sound report, else what the checkpoint
    /// it resumed from recorded (carried over restarts: a run restarted
    /// after diverging resumes from a diverged checkpoint).
    fn sound_through(&self) -> Option<u64> {
        self.last_sound_report.or(self.resumed_sound)
    }

    /// Seconds of training so far, evaluations left out.
    fn wall(&self) -> f64 {
        self.wall_before
            + self.started.map_or(0.0, |started| {
                started
                    .elapsed()
                    .saturating_sub(self.time_left_out)
                    .as_secs_f64()
            })
    }
}

/// What a run changes as it trains, beside the trainer's own fields.
struct Training {
    optimizer: Adam,
    /// The objective's own parameters' optimizer (TB's log Z) and its
    /// learning rate: not the policy's, and never sent to actors.
    own_optimizer: Option<(Adam, f64)>,
    evaluator: Evaluator,
    progress: Progress,
    /// Writes checkpoints beside training (None: checkpoints are off);
    /// the last one is waited for (see `Trainer::save_last_checkpoint`, in checkpoints.rs).
    writer: Option<checkpoint::Writer>,
}

impl Training {
    /// What the run ends with: its last report (where no report of this
    /// process covers the last step, `resumed_report`, the one written at
    /// that step before a resume, else its counts) and the whole run's
    /// totals.
    fn outcome(
        mut self,
        weights: Bytes,
        machine: Machine,
        resumed_report: Option<Report>,
    ) -> TrainingOutcome {
        let progress = &mut self.progress;
        if progress.report.step != progress.step
            && let Some(earlier) = resumed_report.filter(|r| r.step == progress.step)
        {
            // An off-grid report (see `end_training`) that first found
            // quality: its time is in no checkpoint, and is the report's
            // own `wall_s` (no probes run with an evaluation grid).
            if earlier.at_quality == Some(true) && progress.time_to_quality.is_none() {
                progress.time_to_quality_off_grid = Some(earlier.wall_s);
            }
            // Its evaluation and its window's rates stand; the step's
            // counts are this process's (and the ingest counts, brought
            // up to date at the end: `Report::count_from`).
            progress.report = Report {
                version: progress.version,
                trained_transitions: progress.trained_transitions,
                resumed_trained_transitions: progress.resumed_trained_transitions,
                ..earlier
            };
        }
        // The last report's time where it covers the last step: what
        // follows it (the final checkpoint's copy) is no training, and the
        // final line, the summary's totals and the report then agree.
        let wall_s = if progress.report.step == progress.step && progress.step > 0 {
            progress.report.wall_s
        } else {
            progress.wall()
        };
        if progress.report.step != progress.step {
            // No report covers the last step (a resumed run stopped
            // before its first step, none kept at its step): its counts,
            // at least, and the best objects the checkpoint kept (not an
            // evaluation's zeros).
            let (top100_mean_reward, top100_samples) = self.evaluator.top_k_so_far();
            progress.report = Report {
                step: progress.step,
                wall_s,
                version: progress.version,
                trained_transitions: progress.trained_transitions,
                resumed_trained_transitions: progress.resumed_trained_transitions,
                top100_mean_reward,
                top100_samples,
                ..Report::default()
            };
        }
        let trained = progress.trained_transitions;
        let steps = progress.step.max(1) as f64;
        let waiting = progress.totals.waiting_s;
        let totals = RunTotals {
            wall_s,
            first_step_after_s: progress.first_step_after.as_secs_f64(),
            trained_transitions: trained,
            mean_policy_lag: progress.totals.lag_weighted / trained.max(1) as f64,
            max_policy_lag: progress.totals.max_lag,
            data_wait_fraction: (waiting / wall_s.max(1e-9)).min(1.0),
            busy_ms_per_step: 1e3 * (wall_s - waiting).max(0.0) / steps,
            mean_batch_transitions: trained as f64 / steps,
        };
        TrainingOutcome {
            totals,
            sessions: Vec::new(),
            sessions_ended: 0,
            failed_local_actors: 0,
            steps: progress.step,
            version: progress.version,
            weights,
            final_report: std::mem::take(&mut progress.report),
            untrained_at_stop_transitions: 0,
            time_to_quality_s: progress
                .time_to_quality
                .or(progress.time_to_quality_off_grid),
            ended_by: EndedBy::Stop,
            machine,
            judges_quality: self.evaluator.judges_quality(),
        }
    }
}

impl Trainer {
    /// Trains until `max_steps`, or until the batch builder stops (the
    /// learner was asked to stop); then publishes the final weights, saves
    /// them, and only then tells the sessions that training is over.
    ///
    /// An error in training (from the first step to the final weights'
    /// publication) ends training, not the run at once: what was trained
    /// is saved first where it can be (see `Trainer::save_after_error`, in checkpoints.rs).
    pub fn run(mut self) -> Result<TrainingOutcome, LearnerError> {
        let run_started = Instant::now();
        let mut training = self.start()?;
        // libtorch may fail (tch panics) outside a step too: in an
        // evaluation, a copy of the weights to publish, a checkpoint's read
        // of them (out of GPU memory, say). Caught here, such a failure
        // takes the error path below, which saves what was trained,
        // instead of ending the thread with nothing saved.
        let trained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.train(&mut training, run_started)?;
            self.end_training(&mut training)
        }))
        .unwrap_or_else(|payload| {
            Err(LearnerError::Trainer(format!(
                "the trainer panicked after step {} (libtorch failing, out of GPU memory, say): {}",
                training.progress.step,
                panic_message(&*payload)
            )))
        });
        let weights = match trained {
            Ok(weights) => weights,
            Err(error) => {
                self.save_after_error(&mut training, &error);
                return Err(error);
            }
        };
        // A final save that fails leaves the actors waiting for the
        // learner's restart, which resumes from the last checkpoint saved
        // and trains the rest with them.
        self.save_final(&mut training, &weights)?;
        self.publisher.finish(self.finished(&training.progress));
        let machine = Machine::of(self.policy.device(), self.config.learner.threads);
        let resumed_report = self
            .metrics
            .as_mut()
            .and_then(MetricsFile::take_resumed_report);
        Ok(training.outcome(weights, machine, resumed_report))
    }

    /// Whether the last step (`max_steps`) is done.
    fn finished(&self, progress: &Progress) -> bool {
        let max_steps = self.config.learner.max_steps;
        max_steps > 0 && progress.step >= max_steps
    }

    /// The optimizers, the evaluator and the counters, as the checkpoint
    /// this run resumes from left them (fresh without one), with versions
    /// numbered on above every one published before.
    fn start(&mut self) -> Result<Training, LearnerError> {
        let learner = self.config.learner.clone();
        let flat =
            |vars: &tch::nn::VarStore| FlatParameters::new(vars).map_err(LearnerError::Trainer);
        let optimizer = Adam::new(flat(&self.policy.vars)?, learner.learning_rate);
        let own_optimizer = match self.objective.own_parameters() {
            Some((vars, rate)) => Some((Adam::new(flat(vars)?, rate), rate)),
            None => None,
        };
        let evaluator = Evaluator::new(
            self.env.clone(),
            learner.eval_samples,
            self.config.objective.backward_policy,
            self.config.seed,
        );
        let progress = Progress {
            next_report_wall: learner.first_report_s,
            version_floor: self.version_floor,
            ..Progress::default()
        };
        let mut training = Training {
            optimizer,
            own_optimizer,
            evaluator,
            progress,
            writer: None,
        };
        if let Some(checkpoint) = self.resume.take() {
            self.restore(
                &checkpoint,
                &mut training.optimizer,
                training.own_optimizer.as_mut(),
                &mut training.evaluator,
                &mut training.progress,
            )?;
        }
        let progress = &mut training.progress;
        // Start above every version a previous process may have published
        // (it may have been killed after its last checkpoint).
        progress.version_offset =
            self.start_version
                .checked_sub(progress.step)
                .ok_or_else(|| {
                    LearnerError::Checkpoint(format!(
                        "start version {} is below the checkpoint's step {}",
                        self.start_version, progress.step
                    ))
                })?;
        progress.version = self.start_version;
        // Time to quality is refined between reports spaced in time; with
        // reports every so many steps (experiments), the steps are the grain.
        if progress.time_to_quality.is_none()
            && learner.eval_every_steps == 0
            && training.evaluator.judges_quality()
        {
            let mut probes = QualityProbes::default();
            probes.plan(progress.last_report_wall, progress.next_report_wall);
            progress.probes = Some(probes);
        }
        // Checkpoints are encoded and written beside training.
        training.writer = self
            .checkpoint_dir
            .clone()
            .map(|dir| checkpoint::Writer::new(dir, learner.keep_checkpoints));
        Ok(training)
    }

    /// Steps until `max_steps`, or until the batch builder stops: each
    /// step published (every `publish_every`), then reported, or kept for
    /// time to quality, and checkpointed when due.
    fn train(&mut self, training: &mut Training, run_started: Instant) -> Result<(), LearnerError> {
        let learner = self.config.learner.clone();
        let mut data_warning_after = FIRST_DATA_WARNING;
        while !self.finished(&training.progress) {
            // Borrowed afresh each step: a checkpoint below takes the
            // whole `training`.
            let Training {
                optimizer,
                own_optimizer,
                evaluator,
                progress,
                writer,
            } = &mut *training;
            let wait_started = Instant::now();
            self.pulse.idle();
            let next = self.next_batch(&mut data_warning_after);
            self.pulse.busy();
            let Some(batch) = next else {
                // Stopped while waiting for data: the wait since the
                // last step is not training, and counted as such it
                // would read as busy time in the last report, and
                // carry into a resumed run's wall_s and time to
                // quality (a learner starved for a minute, then
                // stopped).
                progress.time_left_out += wait_started.elapsed();
                // Or no batch will ever come: the error path saves
                // what was trained, and the actors are not told that
                // training is done.
                if let Some(failure) = self.batcher_failure.get() {
                    return Err(LearnerError::Trainer(failure.clone()));
                }
                return Ok(());
            };
            if progress.started.is_some() {
                progress.window.waiting += wait_started.elapsed();
                progress.totals.waiting_s += wait_started.elapsed().as_secs_f64();
            }
            if progress.started.is_none() {
                progress.started = Some(Instant::now());
                progress.first_step_after = run_started.elapsed();
                // The first window's span starts here: what arrived before
                // (the first credit room filling while the actors started)
                // is not in its ingest rate. A session queues a chunk
                // before it counts it, so the count can still miss part
                // of this very batch: all of it arrived before, at least.
                let counted = IngestStats::get(&self.stats.accepted_transitions);
                progress.last_report_counts.1 = counted.max(batch.transitions as u64);
            }

            self.train_step(optimizer, own_optimizer.as_mut(), batch, progress)?;
            self.steps_done
                .store(progress.step + progress.version_offset, Ordering::Release);
            // A checkpoint that failed to write ends training, as it
            // did when written in line.
            if let Some(Err(error)) = writer.as_mut().map(checkpoint::Writer::poll) {
                return Err(error);
            }
            if progress.step.is_multiple_of(learner.publish_every) {
                progress.version = progress.step + progress.version_offset;
                self.raise_version_floor(progress)?;
                self.publisher
                    .publish(progress.version, optimizer.parameters().snapshot());
            }
            let wall = progress.wall();
            let due = if learner.eval_every_steps > 0 {
                progress.step.is_multiple_of(learner.eval_every_steps)
            } else {
                wall >= progress.next_report_wall
            };
            // The last step's report, when not due, comes after the
            // loop: off an experiment's grid, it must stay out of the
            // checkpoint (see `end_training`).
            if due {
                self.report(evaluator, progress)?;
            } else if progress
                .probes
                .as_mut()
                .is_some_and(|probes| probes.due(wall))
            {
                // Between reports: the weights, for time to quality,
                // dated when they exist (on a GPU, not when their step
                // was queued).
                self.wait_for_device();
                let wall = progress.wall();
                let step = progress.step;
                if let Some(probes) = progress.probes.as_mut() {
                    probes.keep(Probe {
                        wall_s: wall,
                        step,
                        weights: optimizer.parameters().snapshot(),
                        learned_log_z: self.objective.learned_log_z(),
                    });
                }
            }
            // After the report of the same step, so that the checkpoint
            // holds what it found (best objects, time to quality). Not
            // at the last step: every way out of the loop saves one,
            // after the last report (see `end_training`).
            if !self.finished(progress) && self.checkpoint_due(progress) {
                self.save_checkpoint(training)?;
            }
        }
        Ok(())
    }

    /// After the last step, or a stop: at a stop, what was trained since
    /// the last checkpoint saved; then the last report, the final policy
    /// checked, the version floor raised and the final weights published.
    /// Returns them encoded as f32: the run's model.
    fn end_training(&mut self, training: &mut Training) -> Result<Bytes, LearnerError> {
        self.pulse.busy();
        let learner = self.config.learner.clone();
        // The report below evaluates, which may take long, and a stop
        // is often followed by a kill after a grace period: what was
        // trained is saved first. Not at `max_steps`: a checkpoint of
        // the last step says the run is over, and a kill during this
        // report would leave a run that resumes to nothing, its last
        // report never written (an experiment's run would fail on
        // every retry); the save after the report is the final one.
        // (Written, not only started: the kill may come during the
        // report.) A periodic write still in progress is waited for
        // first: one of this very step would otherwise pass for written,
        // and one that fails is only warned about, as at `max_steps`
        // (`save_last_checkpoint`): a checkpoint of a later step, this
        // one's or the run's final one, stands in for it.
        if let Err(error) =
            checkpoints::wait_for_write(&mut training.writer, &mut training.progress)
        {
            warn!(%error, "an earlier checkpoint write failed; a checkpoint of the run's last step is saved in its place");
            training.progress.checkpointed_step = None;
        }
        let progress = &training.progress;
        if progress.window.steps > 0
            && !self.finished(progress)
            && progress.checkpointed_step != Some(progress.step)
        {
            self.save_checkpoint(training)?;
            checkpoints::wait_for_write(&mut training.writer, &mut training.progress)?;
        }
        let Training {
            optimizer,
            evaluator,
            progress,
            ..
        } = training;
        // A run that ends between two reports (a stop, or `max_steps`
        // off the report grid) still ends with one, so the last report
        // (and the metrics file) covers every step. (Counters that move
        // after it, while sessions end, reach the final summary only:
        // `serve` refreshes it.)
        // With reports every so many steps (experiments), that last one
        // is off their grid: its samples must not join the best objects
        // the checkpoint carries, or a run stopped and resumed would
        // rest on one more evaluation than one that was not.
        // (Nor may a time to quality only it found.) Put back whether
        // the report succeeds or not: a failure saves a checkpoint too.
        // A stopped run waits on this evaluation before it ends (seconds
        // with many samples or a slow CPU): said, so that the wait after
        // "shutdown requested" does not read as a hang.
        if progress.window.steps > 0 && !self.finished(progress) {
            info!(
                step = progress.step,
                eval_samples = learner.eval_samples,
                "stopped: evaluating the last steps before the run ends"
            );
        }
        let grid_state =
            (learner.eval_every_steps > 0).then(|| (evaluator.state(), progress.time_to_quality));
        // (libtorch failing in it is caught here, so that the state
        // is put back before the error path saves.)
        let reported = if progress.window.steps > 0 {
            unless_libtorch_fails(progress.step, || self.report(evaluator, progress))
                .and_then(|reported| reported)
        } else {
            Ok(())
        };
        if let Some((state, time_to_quality)) = grid_state {
            evaluator.restore(&state);
            progress.time_to_quality_off_grid =
                std::mem::replace(&mut progress.time_to_quality, time_to_quality);
        }
        reported?;
        // The run's product is its final policy: one that is no
        // distribution somewhere is a failed run, not a finished one,
        // even where it diverged too late for the reports in a row
        // that stop a run (a short run, or its last steps).
        if progress.non_finite_draws > 0 {
            return Err(LearnerError::Trainer(format!(
                "the model diverged: the final policy's logits are not finite at states its last evaluation reached ({} draws), so it is no sampler there; {}",
                progress.non_finite_draws,
                divergence_remedy(progress, self.checkpoint_dir.as_deref())
            )));
        }
        progress.version = progress.step + progress.version_offset;
        self.raise_version_floor(progress)?;
        // Published, not yet said to be the last: the sessions hear that
        // training is over once it is saved (see `run`).
        self.publisher
            .publish(progress.version, optimizer.parameters().snapshot());
        // The run's model, exact: f32 whatever actors receive, with the
        // metadata an actor's copy of this version carries.
        self.publisher
            .encode_newest_as(WeightEncoding::F32)
            .map(Bytes::from)
            .map_err(LearnerError::from)
    }

    /// Waits for the device to finish the work queued so far: CUDA runs
    /// the steps asynchronously, so a time stamp taken without it dates
    /// steps when queued, not when done (on the CPU they are done already).
    fn wait_for_device(&self) {
        if let tch::Device::Cuda(index) = self.policy.device() {
            tch::Cuda::synchronize(index as i64);
        }
    }

    /// The next batch, however long it takes (`None` once the learner
    /// stops). A learner nobody feeds (no actor started, every one refused
    /// for its token or task) would otherwise say nothing at all: a wait
    /// longer than `worth_a_line` is logged (a warning with no actor
    /// connected, else at info), and makes the next one worth a line only
    /// when twice as long (see [`FIRST_DATA_WARNING`]).
    fn next_batch(&self, worth_a_line: &mut Duration) -> Option<PreparedBatch> {
        use std::sync::mpsc::RecvTimeoutError;
        let started = Instant::now();
        let unusable_before = IngestStats::get(&self.stats.unusable_truncated_transitions);
        let mut line_at = *worth_a_line;
        loop {
            match self
                .batches
                .recv_timeout(line_at.saturating_sub(started.elapsed()))
            {
                Ok(batch) => return Some(batch),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    let waited_s = started.elapsed().as_secs();
                    let rejections = self.stats.rejections();
                    match self.stats.connected_actors.load(Ordering::Relaxed) {
                        0 => warn!(
                            waited_s,
                            actors_connected = 0,
                            ?rejections,
                            "waiting for training data: no actor is connected. Are actors running, with this learner's address, token and task? (refusals are counted in rejections)"
                        ),
                        actors_connected => {
                            // TB drops truncated trajectories: actors that
                            // cut every one short feed it nothing.
                            let unusable_truncated_transitions =
                                IngestStats::get(&self.stats.unusable_truncated_transitions)
                                    - unusable_before;
                            if unusable_truncated_transitions > 0 {
                                warn!(
                                    waited_s,
                                    actors_connected,
                                    unusable_truncated_transitions,
                                    ?rejections,
                                    "waiting for training data: the actors' trajectories are cut short (actor.truncate_fraction), and this objective trains on complete ones only"
                                );
                            } else {
                                info!(
                                    waited_s,
                                    actors_connected,
                                    ?rejections,
                                    "waiting for training data from the connected actors (slow rollouts? an actor holding credits without sending is cut off after learner.stall_timeout_s)"
                                );
                            }
                        }
                    }
                    *worth_a_line = (*worth_a_line * 2).min(LONGEST_DATA_WARNING);
                    line_at = (line_at * 2).min(line_at + LONGEST_DATA_WARNING);
                }
            }
        }
    }

    /// One optimizer step on `batch`, without waiting on the device. A
    /// batch whose loss or gradients are not finite (the model diverged:
    /// ingest bounds the energies) is skipped, leaving the weights and
    /// Adam's moments as they were, instead of turning every weight into
    /// NaN; reports count such steps as `skipped_batches`.
    ///
    /// libtorch failing inside the step (out of GPU memory, say: tch
    /// panics) is an error that ends training, with the checkpoint every
    /// such error gets. Almost always nothing has moved then: the step
    /// allocates everything it needs (the proposals, each optimizer's
    /// selection, the report's running sums) before it changes a weight or
    /// moment; only a failure between the policy's update and TB's log Z's
    /// leaves the policy one step ahead. One in the in-place sums, after
    /// the step is counted, leaves the weights at the counted step and
    /// that report window's loss half-summed.
    fn train_step(
        &self,
        optimizer: &mut Adam,
        own_optimizer: Option<&mut (Adam, f64)>,
        batch: PreparedBatch,
        progress: &mut Progress,
    ) -> Result<(), LearnerError> {
        let step = progress.step + 1;
        let stepped = unless_libtorch_fails(step, || {
            self.step_unguarded(optimizer, own_optimizer, batch, progress);
        });
        progress.weights_may_be_ahead = stepped.is_err();
        stepped
    }

    /// [`Trainer::train_step`], where libtorch failing panics.
    fn step_unguarded(
        &self,
        optimizer: &mut Adam,
        mut own_optimizer: Option<&mut (Adam, f64)>,
        batch: PreparedBatch,
        progress: &mut Progress,
    ) {
        let learner = &self.config.learner;
        // Lags behind the version this step makes, as trained: not taken
        // from the batch builder's reckoning of the step, so that a batch
        // trained later than it was built for would show its true lag.
        let (lag_weighted, max_lag) = batch.lags_at(progress.step + 1 + progress.version_offset);
        let tensors = batch.tensors.to_device(self.policy.device());
        let output = self.policy.net.forward(&tensors.states);
        let loss = self.objective.loss(&output, &tensors);
        let finite = loss.isfinite();
        if learner.max_steps > 0 {
            let fraction = learning_rate_fraction(
                progress.step + 1,
                learner.max_steps,
                learner.final_learning_rate_fraction,
            );
            optimizer.set_lr(learner.learning_rate * fraction);
            if let Some((own, rate)) = own_optimizer.as_mut() {
                own.set_lr(*rate * fraction);
            }
        }
        optimizer.zero_grad();
        if let Some((own, _)) = own_optimizer.as_mut() {
            own.zero_grad();
        }
        loss.backward();
        // A step whose loss or gradients are not finite, or whose update
        // would leave a weight that is not, is skipped: nothing moves.
        // Decided on the device, without waiting for it.
        let mut finite = finite.logical_and(&optimizer.gradients_finite());
        if let Some((own, _)) = own_optimizer.as_mut() {
            finite = finite.logical_and(&own.gradients_finite());
        }
        // The objective's own parameters (TB's log Z) and the policy move
        // together or not at all.
        let skip = finite.logical_not();
        let policy_step = optimizer.propose(&skip);
        let own_step = own_optimizer.as_mut().map(|(own, _)| own.propose(&skip));
        let mut finite = finite.logical_and(policy_step.finite());
        if let Some(own_step) = &own_step {
            finite = finite.logical_and(own_step.finite());
        }
        // What the bookkeeping below allocates is allocated before a weight
        // moves: a failure after `apply` would leave the weights a step
        // ahead of the step count (and of the checkpoint's step).
        let _no_grad = tch::no_grad_guard();
        let skip = finite.logical_not();
        // Skipped steps count as 0 (and as skipped, below).
        let guarded = loss.detach().masked_fill(&skip, 0.0);
        let finite_steps = finite.to_kind(Kind::Int64);
        optimizer.apply(policy_step, &finite);
        if let (Some((own, _)), Some(own_step)) = (own_optimizer, own_step) {
            own.apply(own_step, &finite);
        }

        progress.step += 1;
        progress.trained_transitions += batch.transitions as u64;
        let window = &mut progress.window;
        // Accumulated in place: one call each per step.
        match &mut window.loss_sum {
            Some(sum) => {
                let _ = sum.g_add_(&guarded);
            }
            None => window.loss_sum = Some(guarded),
        }
        match &mut window.finite_steps {
            Some(count) => {
                let _ = count.g_add_(&finite);
            }
            None => window.finite_steps = Some(finite_steps),
        }
        window.steps += 1;
        window.lag_weighted += lag_weighted;
        window.max_lag = window.max_lag.max(max_lag);
        progress.totals.lag_weighted += lag_weighted;
        progress.totals.max_lag = progress.totals.max_lag.max(max_lag);
        window.transitions += batch.transitions as u64;
        window.trajectories += batch.trajectories as u64;
        window.truncated += batch.truncated as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::{learning_rate_fraction, unless_libtorch_fails};

    #[test]
    fn libtorch_failing_in_a_step_is_an_error_naming_the_step_and_why() {
        use tch::{Device, Kind, Tensor};
        // tch panics where libtorch refuses: here a shape that cannot be.
        let error = unless_libtorch_fails(7, || {
            Tensor::zeros([2], (Kind::Float, Device::Cpu)).view([3])
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("step 7") && error.contains("[3]"), "{error}");
        assert_eq!(unless_libtorch_fails(8, || 42).unwrap(), 42);
    }

    #[test]
    fn the_learning_rate_holds_for_half_the_run_then_decays_to_its_final_fraction() {
        let at = |step| learning_rate_fraction(step, 1000, 0.1);
        assert_eq!(at(1), 1.0);
        assert_eq!(at(500), 1.0);
        assert!((at(750) - 0.55).abs() < 1e-12, "{}", at(750));
        assert!((at(1000) - 0.1).abs() < 1e-12, "{}", at(1000));
        assert!((at(2000) - 0.1).abs() < 1e-12, "{}", at(2000));
        // Never rising along the way.
        assert!(
            (1..=1000)
                .map(at)
                .collect::<Vec<_>>()
                .windows(2)
                .all(|w| w[1] <= w[0])
        );
        // A final fraction of 1: constant.
        assert_eq!(learning_rate_fraction(900, 1000, 1.0), 1.0);
    }
}
