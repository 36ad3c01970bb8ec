//! Running a suite: each run a learner process with its local actors,
//! kept, resumed or started over (set aside) by what its folder holds,
//! watched until it ends or stalls; and the record of the builds behind it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flgfn_common::config::Config;

use crate::durable_file::write_atomically;
use crate::report::Report;

use super::results::{finished, on_grid};
use super::tables::describe;
use super::{RunResult, RunSpec, SuiteOutcome, read_reports, summarise};

/// What the runner knows of a run beyond its configuration and reports
/// (`runs/<run>/run.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// Every build (see [`suite_build`]) that trained part of the run, in
    /// order: a run is kept or resumed only by the build
    /// that made it (a rebuild after a fix must not reuse the old
    /// binary's figures), unless `--keep-other-builds`; then a resumed
    /// run lists both. Empty for a run of an older runner (unrecorded).
    pub builds: Vec<String>,
    /// Why its learner failed after its last report, where it did (a
    /// local actor that failed on the way: fewer actors, so its seconds
    /// are not a normal run's). Its reports are kept, and the tables say
    /// so.
    #[serde(default)]
    pub learner_failed: Option<String>,
}

/// A run's record file, in its folder.
const RUN_RECORD: &str = "run.json";

/// The build of a run an older runner made, which recorded none.
const UNRECORDED: &str = "unrecorded";

impl RunRecord {
    /// The record in run folder `dir`; None where there is none (a run
    /// of an older runner, or one never started) or it cannot be read.
    pub fn load(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(RUN_RECORD)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record into `dir` (made if missing), whole or not at all.
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        write_atomically(dir, RUN_RECORD, text.as_bytes())
            .with_context(|| format!("cannot write {}", dir.join(RUN_RECORD).display()))?;
        Ok(())
    }

    /// Whether every part of the run was trained by `build`.
    pub(super) fn only_by(&self, build: &str) -> bool {
        !self.builds.is_empty() && self.builds.iter().all(|b| b == build)
    }

    /// Its builds for a message or a table: "unrecorded" for none.
    pub fn builds_text(&self) -> String {
        if self.builds.is_empty() {
            UNRECORDED.to_owned()
        } else {
            self.builds.join(" + ")
        }
    }
}

/// How [`run_all`] runs a suite.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// The `flgfn-learner` binary.
    pub learner: PathBuf,
    /// Its build and its actors' ([`suite_build`]).
    pub build: String,
    /// A run that writes neither a report nor a checkpoint for this long
    /// is killed.
    pub stall_timeout: Duration,
    /// Keep (and resume) runs another build made, instead of starting
    /// them over.
    pub keep_other_builds: bool,
}

/// The build a suite's runs are made with: the learner binary at
/// `learner`'s, and that of the `flgfn-actor` beside it, which its local
/// actors run. The actors roll out (exploration, truncation, the energies
/// sent), and each binary's version names only the code it is built from:
/// a change to the actor alone leaves the learner's version as it was,
/// and must make the runs again all the same. Where both name the same
/// clean commit, that one version (as a learner-only record had it).
pub fn suite_build(learner: &Path) -> anyhow::Result<String> {
    let actor = crate::launcher::actor_beside(learner);
    let learner_build = binary_build(learner, "flgfn-learner")?;
    let actor_build = binary_build(&actor, "flgfn-actor")?;
    Ok(if actor_build == learner_build {
        learner_build
    } else {
        format!("{learner_build}; actor {actor_build}")
    })
}

/// Refuses to make a run with binaries other than those the suite started
/// with: a `cargo build` into the same folder midway would have its runs
/// recorded (and tabled) as the build named at the start.
fn check_build_unchanged(options: &SuiteOptions) -> anyhow::Result<()> {
    let now = suite_build(&options.learner)?;
    if now != options.build {
        bail!(
            "the binaries changed since the suite started (it started with {}, they are now {now}): no run is made with them; start the suite again to make the rest (the runs of the earlier build are set aside, or kept with --keep-other-builds)",
            options.build
        );
    }
    Ok(())
}

/// The build of the binary `program` at `path`: its `--version`, less the
/// program's name, and for a build of uncommitted changes (or of an
/// unknown state) a hash of the binary, since the version line alone is
/// the same before and after an uncommitted fix.
fn binary_build(path: &Path, program: &str) -> anyhow::Result<String> {
    let output = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot start {} (build every binary: cargo build --release)",
                path.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next().unwrap_or("").trim();
    if !output.status.success() || line.is_empty() {
        bail!(
            "{} --version failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let version = line.strip_prefix(program).map_or(line, str::trim_start);
    if !(version.contains(", modified") || version.contains("unknown")) {
        return Ok(version.to_owned());
    }
    let binary = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{version} binary {:016x}", fnv1a64(&binary)))
}

/// FNV-1a, 64 bits: tells two binaries apart (not a defence against
/// anyone), the same on every platform and Rust release.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs `specs` one after another with the learner of `options` (those
/// already finished first), writing everything under `out`, and calls
/// `after_each` with what is done so far, in the suite's order, and the
/// runs not yet done after each run. A run whose folder
/// already holds a complete metrics file, made with the same configuration
/// by the same build, is not run again (a suite interrupted midway resumes
/// where it stopped); one made with another configuration (other steps,
/// another suite sharing the folder) or by another build (unless
/// `keep_other_builds`) starts over in a new folder, the old one moved to
/// `out/replaced/` (a mistyped `--steps` deletes nothing). A finished run
/// that this suite would keep, found there (set aside by a start with
/// another `--steps`, say), is moved back instead of trained again. A run
/// that fails, or writes neither a report nor a checkpoint for `stall_timeout`
/// (it is then killed), is recorded and the suite goes on; one whose
/// learner fails after its last report at `max_steps` (a local actor that
/// failed on the way, a final save that failed) is kept, with a warning
/// and a mark in its record, as a later start and `--plot-only` would
/// keep it.
pub fn run_all(
    specs: &[RunSpec],
    out: &Path,
    options: &SuiteOptions,
    mut after_each: impl FnMut(&SuiteOutcome, &[RunSpec]),
) -> SuiteOutcome {
    let started = Instant::now();
    let mut outcome = SuiteOutcome::default();
    // The runs finished here first (they only read their reports), so that
    // the tables and figures written after them, before any run trains,
    // hold every one: a suite started again (for more seeds, say) shows
    // what it has while the new runs train, not what it reached so far.
    let (done, to_train): (Vec<&RunSpec>, Vec<&RunSpec>) = specs
        .iter()
        .partition(|spec| finished_here(spec, &out.join("runs").join(spec.name()), options));
    let finished = done.len();
    let order: Vec<RunSpec> = done.into_iter().chain(to_train).cloned().collect();
    for (i, spec) in order.iter().enumerate() {
        let label = format!("[{}/{}] {}", i + 1, order.len(), spec.name());
        match run_or_keep(spec, i < finished, out, options, &label, started) {
            Ok(result) => outcome.results.push(result),
            Err(error) => {
                flgfn_common::outln!("{label}: FAILED: {error:#}");
                outcome.failed.push((spec.clone(), format!("{error:#}")));
            }
        }
        // In the suite's order, whatever order they ran in.
        outcome
            .results
            .sort_by_key(|result| (result.spec.position, result.spec.seed));
        outcome
            .failed
            .sort_by_key(|(spec, _)| (spec.position, spec.seed));
        after_each(&outcome, &order[i + 1..]);
    }
    outcome
}

/// Runs (or keeps) one run of a suite, `finished_here` already or not:
/// its result, or why it failed.
fn run_or_keep(
    spec: &RunSpec,
    finished_here: bool,
    out: &Path,
    options: &SuiteOptions,
    label: &str,
    started: Instant,
) -> anyhow::Result<RunResult> {
    let dir = out.join("runs").join(spec.name());
    if !finished_here {
        restore_from_replaced(spec, out, &dir, options, label)?;
    }
    let metrics = dir.join(METRICS_FILE);
    let config = run_config(spec, &dir);
    let written = written_config_matches(spec, &dir);
    let record = RunRecord::load(&dir);
    // Reports with no configuration beside them are of an unknown one
    // (an older runner's): set aside too, never taken for this run's.
    let unknown_reports = written.is_none() && metrics.exists();
    let same_run = this_suites_run(written, record.as_ref(), options);
    let other_build = written == Some(true) && !same_run;
    let why_aside = if written == Some(false) || unknown_reports {
        Some("made with another configuration".to_owned())
    } else if other_build {
        Some(format!(
            "made by another build ({}; this learner is {}; --keep-other-builds keeps such runs)",
            record
                .as_ref()
                .map_or(UNRECORDED.to_owned(), RunRecord::builds_text),
            options.build
        ))
    } else {
        None
    };
    if let Some(why) = &why_aside {
        let aside = move_to_replaced(out, &dir, &spec.name(), why)?;
        flgfn_common::outln!(
            "{label}: {why}; starting over (the old run is now {})",
            aside.display()
        );
    }
    let mut record = match record {
        Some(record) if same_run => record,
        // Kept with --keep-other-builds, from a runner that recorded no
        // build: what it trained is said to be of an unrecorded one.
        None if same_run && (metrics.exists() || dir.join("checkpoints").exists()) => RunRecord {
            builds: vec![UNRECORDED.to_owned()],
            learner_failed: None,
        },
        _ => RunRecord::default(),
    };
    let mut kept = "";
    let done = match read_reports(&metrics) {
        Ok(reports) if same_run && finished(spec, &reports) => {
            kept = "already done, kept: ";
            Ok(reports)
        }
        _ => {
            check_build_unchanged(options)?;
            if record.builds.last() != Some(&options.build) {
                record.builds.push(options.build.clone());
            }
            record.learner_failed = None;
            // Before the learner starts: a run cut short is known to be
            // this build's when the suite is started again.
            let ran = record
                .save(&dir)
                .and_then(|()| run_one(spec, &config, options, &dir, label, !same_run));
            judge(spec, label, ran, read_reports(&metrics)).and_then(|(reports, failure)| {
                if failure.is_some() {
                    record.learner_failed = failure;
                    record.save(&dir)?;
                }
                Ok(reports)
            })
        }
    };
    let result = RunResult {
        record,
        ..summarise(spec.clone(), on_grid(spec, done?))?
    };
    flgfn_common::outln!(
        "{label}: {kept}{} reports, quality at {}{}, top-100 at {} ({:.0} s elapsed)",
        result.reports.len(),
        describe(result.to_quality),
        if result.to_quality.is_some() && !result.at_quality_at_end() {
            " (not at the end)"
        } else {
            ""
        },
        describe(result.to_top_k),
        started.elapsed().as_secs_f64()
    );
    Ok(result)
}

/// What a run that was started left: its reports where they reach
/// `max_steps`, whatever its learner's exit (a failure after the last
/// report, such as a local actor that failed on the way, is printed as a
/// warning and returned with them: a later start, or `--plot-only`, reads
/// the same reports as finished, and the run's record keeps the failure),
/// else why it did not finish.
pub(super) fn judge(
    spec: &RunSpec,
    label: &str,
    ran: anyhow::Result<()>,
    reports: anyhow::Result<Vec<Report>>,
) -> anyhow::Result<(Vec<Report>, Option<String>)> {
    match (ran, reports) {
        (ran, Ok(reports)) if finished(spec, &reports) => {
            let failure = ran.err().map(|error| format!("{error:#}"));
            if let Some(failure) = &failure {
                flgfn_common::outln!(
                    "{label}: warning: its learner failed after its last report; its reports are kept (and marked in the tables): {failure}"
                );
            }
            Ok((reports, failure))
        }
        (Err(error), _) => Err(error),
        (Ok(()), Ok(reports)) => Err(anyhow::anyhow!(
            "{label} stopped at step {} of {}",
            reports.last().map_or(0, |r| r.step),
            spec.config.learner.max_steps
        )),
        (Ok(()), Err(error)) => Err(error),
    }
}

/// A run's configuration file, in its folder.
pub(super) const CONFIG_FILE: &str = "config.toml";

/// A run's reports, in its folder.
pub(super) const METRICS_FILE: &str = "metrics.jsonl";

/// Where run folders made with another configuration or by another build
/// go, under the suite's folder.
pub const REPLACED_DIR: &str = "replaced";

/// Moves run folder `dir` (named `name`; `why`: made with another
/// configuration, say) to `out/replaced/<name>-<unix seconds>`, so that
/// the run starting over in its place deletes nothing an earlier one
/// finished. Returns where it went.
fn move_to_replaced(out: &Path, dir: &Path, name: &str, why: &str) -> anyhow::Result<PathBuf> {
    let replaced = out.join(REPLACED_DIR);
    std::fs::create_dir_all(&replaced)
        .with_context(|| format!("cannot create {}", replaced.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut target = replaced.join(format!("{name}-{stamp}"));
    let mut again = 1;
    while target.exists() {
        target = replaced.join(format!("{name}-{stamp}-{again}"));
        again += 1;
    }
    std::fs::rename(dir, &target).with_context(|| {
        format!(
            "cannot move {} ({why}) to {}",
            dir.display(),
            target.display()
        )
    })?;
    Ok(target)
}

/// Whether a run folder whose configuration file matches the run's or not
/// (`written`, None where it has none) and whose record is `record` is
/// the suite's to go on with: written with the run's configuration, made
/// by this build (by any, with `keep_other_builds`).
fn this_suites_run(
    written: Option<bool>,
    record: Option<&RunRecord>,
    options: &SuiteOptions,
) -> bool {
    written == Some(true)
        && (options.keep_other_builds || record.is_some_and(|r| r.only_by(&options.build)))
}

/// Whether `dir` holds a finished run of `spec` that the suite keeps as it
/// is ([`this_suites_run`], its reports up to its last step).
fn finished_here(spec: &RunSpec, dir: &Path, options: &SuiteOptions) -> bool {
    let record = RunRecord::load(dir);
    this_suites_run(written_config_matches(spec, dir), record.as_ref(), options)
        && read_reports(&dir.join(METRICS_FILE)).is_ok_and(|reports| finished(spec, &reports))
}

/// The folders [`move_to_replaced`] made of run `name`, among `paths`,
/// newest first (by their stamp: seconds, then a count within a second).
pub(super) fn set_aside_runs(name: &str, paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let stamp_of = |path: &Path| -> Option<(u64, u64)> {
        let stamp = path
            .file_name()?
            .to_str()?
            .strip_prefix(name)?
            .strip_prefix('-')?;
        let (seconds, again) = stamp.split_once('-').unwrap_or((stamp, "0"));
        Some((seconds.parse().ok()?, again.parse().ok()?))
    };
    let mut stamped: Vec<((u64, u64), PathBuf)> = paths
        .into_iter()
        .filter_map(|path| Some((stamp_of(&path)?, path)))
        .collect();
    stamped.sort_by_key(|(stamp, _)| std::cmp::Reverse(*stamp));
    stamped.into_iter().map(|(_, path)| path).collect()
}

/// Moves back into `dir` the newest finished run of `spec` in
/// `out/replaced/` that the suite would keep ([`finished_here`]), setting
/// aside what `dir` holds in its place: a suite started with a mistyped
/// `--steps` and then with the right one trains nothing twice.
fn restore_from_replaced(
    spec: &RunSpec,
    out: &Path,
    dir: &Path,
    options: &SuiteOptions,
    label: &str,
) -> anyhow::Result<()> {
    let name = spec.name();
    let Ok(entries) = std::fs::read_dir(out.join(REPLACED_DIR)) else {
        return Ok(());
    };
    let paths = entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .collect();
    let Some(found) = set_aside_runs(&name, paths)
        .into_iter()
        .find(|path| finished_here(spec, path, options))
    else {
        return Ok(());
    };
    let mut in_its_place = String::new();
    if std::fs::symlink_metadata(dir).is_ok() {
        let moved = move_to_replaced(out, dir, &name, "to make room for a finished run")?;
        in_its_place = format!("; what was in its place is now {}", moved.display());
    } else if let Some(runs) = dir.parent() {
        std::fs::create_dir_all(runs)
            .with_context(|| format!("cannot create {}", runs.display()))?;
    }
    std::fs::rename(&found, dir)
        .with_context(|| format!("cannot move {} back to {}", found.display(), dir.display()))?;
    flgfn_common::outln!(
        "{label}: moved back from {}, finished with this configuration{}{in_its_place}",
        found.display(),
        if options.keep_other_builds {
            ""
        } else {
            " by this build"
        }
    );
    Ok(())
}

/// What a run's learner and actors read: the spec's configuration with the
/// checkpoints in the run's own folder.
pub(super) fn run_config(spec: &RunSpec, dir: &Path) -> Config {
    let mut config = spec.config.clone();
    config.learner.checkpoint_dir = dir.join("checkpoints").display().to_string();
    config
}

/// Whether the `config.toml` in run folder `dir` is `spec`'s
/// configuration, where its checkpoints are aside (the same folder spelt
/// another way, with `--out` relative or absolute, is the same run); None
/// where no configuration was written.
pub(super) fn written_config_matches(spec: &RunSpec, dir: &Path) -> Option<bool> {
    let written = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok()?;
    let Ok(mut written) = Config::parse_toml(&written, CONFIG_FILE) else {
        return Some(false);
    };
    let mut wanted = spec.config.clone();
    written.learner.checkpoint_dir.clear();
    wanted.learner.checkpoint_dir.clear();
    Some(written.to_toml() == wanted.to_toml())
}

/// Starts one learner with its local actors and waits for it, printing
/// its progress (the latest report) every few seconds. `fresh`: what the
/// folder holds was made with another configuration or by another build
/// (and is set aside); start over. A
/// learner that neither reports (its metrics file grows) nor checkpoints
/// for `stall_timeout` is killed.
fn run_one(
    spec: &RunSpec,
    config: &Config,
    options: &SuiteOptions,
    dir: &Path,
    label: &str,
    fresh: bool,
) -> anyhow::Result<()> {
    let (learner, stall_timeout) = (&options.learner, options.stall_timeout);
    let config_path = dir.join(CONFIG_FILE);
    // Each run keeps its checkpoints in its own folder: a run cut short
    // resumes from them when the suite is started again. The folder is
    // made durably (its entry synced in its parent) with the file, which is
    // written whole or not at all: a torn one reads as another
    // configuration, and the run would start over, deleting its
    // checkpoints.
    write_atomically(dir, CONFIG_FILE, config.to_toml().as_bytes())
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let metrics = dir.join(METRICS_FILE);
    // Appended to: the log of an earlier try stays for its post-mortem.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("learner.log"))?;
    let mut command = Command::new(learner);
    command
        .arg("--config")
        .arg(&config_path)
        .arg("--metrics")
        .arg(&metrics)
        .arg("--local-actors")
        .arg("--actors")
        .arg(spec.actors.to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if fresh {
        command.arg("--fresh");
    }
    // The run's configuration is its file, exactly: no FLGFN_ variable of
    // this shell changes it behind the file's back.
    for (name, _) in std::env::vars_os() {
        if flgfn_common::config::is_flgfn_variable(&name) {
            command.env_remove(name);
        }
    }
    // A runner killed outright takes its learner (and the learner its
    // actors) along.
    flgfn_common::signals::end_with_parent(&mut command);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", learner.display()))?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    // Progress is a report (the metrics file grows) or a checkpoint (a
    // newer one in the run's folder): a run with a long evaluation
    // interval that still checkpoints is not taken for a hung one.
    let checkpoints = PathBuf::from(&config.learner.checkpoint_dir);
    let progress = || {
        let reported = std::fs::metadata(&metrics).map_or(0, |m| m.len());
        let checkpointed = crate::checkpoint::list(&checkpoints)
            .ok()
            .and_then(|found| found.last().map(|(step, _)| *step));
        (reported, checkpointed)
    };
    let mut last_growth = (progress(), Instant::now());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(error) => {
                // Not left running beside the next run, skewing its
                // seconds.
                let _ = child.kill();
                let _ = child.wait();
                return Err(error).with_context(|| format!("{label}: cannot watch its learner"));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = progress();
        if now != last_growth.0 {
            last_growth = (now, Instant::now());
        } else if last_growth.1.elapsed() >= stall_timeout {
            // Its local actors end with it. What it trained since its last
            // checkpoint is lost; the next start resumes from that.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{label}: no report and no checkpoint for {:.0} s (--stall-timeout-s): killed; see {}",
                stall_timeout.as_secs_f64(),
                dir.join("learner.log").display()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            if let Some(report) = read_reports(&metrics).ok().and_then(|r| r.last().cloned()) {
                flgfn_common::outln!(
                    "{label}: step {}/{} wall {:.1} s loss {:.4} ({:.0} s)",
                    report.step,
                    spec.config.learner.max_steps,
                    report.wall_s,
                    report.loss,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    };
    if !status.success() {
        bail!(
            "{label} failed ({status}); see {}",
            dir.join("learner.log").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a stand-in `name` into `dir` that prints `version` for
    /// `--version`, with `salt` making binaries of one version differ.
    #[cfg(unix)]
    fn stand_in(dir: &Path, name: &str, version: &str, salt: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\n# {salt}\necho '{name} {version}'\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A fresh folder `name` holding a stand-in learner and actor of
    /// `version`; the folder and the learner's path.
    #[cfg(unix)]
    fn stand_in_binaries(name: &str, version: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        stand_in(&dir, "flgfn-learner", version, "");
        stand_in(&dir, "flgfn-actor", version, "");
        let learner = dir.join("flgfn-learner");
        (dir, learner)
    }

    /// A suite's build names the actor too where it differs from the
    /// learner: a change to the actor alone, which leaves the learner's
    /// version clean, still makes another build (and the runs again);
    /// two builds of uncommitted changes differ by their binaries.
    #[cfg(unix)]
    #[test]
    fn a_change_to_the_actor_alone_is_another_build() {
        let clean = "0.1.0 (commit 0123456789ab)";
        let (dir, learner) = stand_in_binaries("flgfn-suite-build", clean);
        assert_eq!(suite_build(&learner).unwrap(), clean);

        let modified = "0.1.0 (commit 0123456789ab, modified)";
        stand_in(&dir, "flgfn-actor", modified, "one change");
        let first = suite_build(&learner).unwrap();
        assert!(
            first.starts_with(&format!("{clean}; actor {modified} binary ")),
            "{first}"
        );
        stand_in(&dir, "flgfn-actor", modified, "another change");
        let second = suite_build(&learner).unwrap();
        assert_ne!(first, second);

        std::fs::remove_file(dir.join("flgfn-actor")).unwrap();
        let error = suite_build(&learner).unwrap_err().to_string();
        assert!(error.contains("flgfn-actor"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Binaries rebuilt while a suite runs make no more of its runs: they
    /// would be recorded as the build the suite started with.
    #[cfg(unix)]
    #[test]
    fn binaries_changed_midway_make_no_run() {
        let first = "0.1.0 (commit 0123456789ab)";
        let (dir, learner) = stand_in_binaries("flgfn-suite-rebuilt", first);
        let options = SuiteOptions {
            build: suite_build(&learner).unwrap(),
            learner,
            stall_timeout: Duration::from_secs(1),
            keep_other_builds: false,
        };
        check_build_unchanged(&options).unwrap();
        let rebuilt = "0.1.0 (commit ba9876543210)";
        stand_in(&dir, "flgfn-learner", rebuilt, "");
        let error = check_build_unchanged(&options).unwrap_err().to_string();
        assert!(error.contains(first) && error.contains(rebuilt), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
