//! The experiment runner end to end: a tiny suite with real learner and
//! actor processes produces its data files and non-empty plots.
#![allow(clippy::unwrap_used)]

use std::process::Command;

mod support;

/// With its stdout and stderr closed from the start (a `| tee` that died):
/// a console it cannot write to loses the progress lines, not the suite.
#[test]
fn a_short_suite_writes_its_data_and_plots() {
    let out = std::env::temp_dir().join(format!("flgfn-experiment-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let status = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
        .args(["--suite", "smoke", "--seeds", "2", "--steps", "20", "--out"])
        .arg(&out)
        .stdout(closed())
        .stderr(closed())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");

    // Two objectives x two seeds, each with its reports.
    let runs: Vec<_> = std::fs::read_dir(out.join("runs")).unwrap().collect();
    assert_eq!(runs.len(), 4);
    let reports = std::fs::read_to_string(out.join("reports.csv")).unwrap();
    let rows: Vec<&str> = reports.lines().collect();
    let columns = rows[0].split(',').count();
    assert!(rows.len() > 4 * 2, "{} rows", rows.len());
    assert!(rows.iter().all(|r| r.split(',').count() == columns));
    assert!(reports.contains(",tb,") && reports.contains(",fl_db,"));
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| small | fl_db | ") && summary.contains("| small | tb | "));

    for stem in ["small-steps", "small-seconds"] {
        let png = std::fs::read(out.join("plots").join(format!("{stem}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{stem}.png"
        );
        let svg = std::fs::read_to_string(out.join("plots").join(format!("{stem}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("fl_db") && svg.contains("<polyline"));
    }
    // Written whole: no part file is left beside them.
    for folder in [out.clone(), out.join("plots")] {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with('.'),
                "{name:?} left in {}",
                folder.display()
            );
        }
    }

    // Re-rendering from the folder alone (the suite, seeds and steps it
    // was run with are recorded there) gives the same tables.
    let status = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
        .args(["--plot-only", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("reports.csv")).unwrap(),
        reports
    );
    // A mistyped folder is an error, and not made.
    let mistyped = out.with_extension("mistyped");
    let output = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
        .args(["--plot-only", "--out"])
        .arg(&mistyped)
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(errors.contains("--plot-only: no folder"), "{errors}");
    assert!(!mistyped.exists());
    // The folders beside it that a suite ran in are named (in a folder of
    // their own here: the temporary folder holds other tests' suites).
    let beside = out.with_extension("beside");
    std::fs::create_dir_all(beside.join("ran")).unwrap();
    std::fs::create_dir_all(beside.join("other")).unwrap();
    std::fs::copy(
        out.join(flgfn_learner::experiment::SUITE_RECORD),
        beside
            .join("ran")
            .join(flgfn_learner::experiment::SUITE_RECORD),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
        .args(["--plot-only", "--out"])
        .arg(beside.join("mistyped"))
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(
        errors.trim_end().ends_with(&format!(
            "; suites ran in: --out {}",
            beside.join("ran").display()
        )),
        "{errors}"
    );
    std::fs::remove_dir_all(&beside).unwrap();

    // The same suite again: every run is kept. With another step budget:
    // every run starts over (none resumes from the other budget's
    // checkpoints, none is kept as done), the old runs moved aside whole.
    let smoke = |args: &[&str], out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
            .args(["--suite", "smoke", "--seeds", "2"])
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let again = |steps: &str| smoke(&["--steps", steps], &out);
    assert_eq!(runs_kept(&again("20")), 4);
    // The same folder spelt another way is the same runs.
    assert_eq!(runs_kept(&smoke(&["--steps", "20"], &out.join("."))), 4);
    // A budget no learner takes is refused before anything moves.
    let too_long = again("9223372036854775808");
    assert!(!too_long.status.success());
    let errors = String::from_utf8_lossy(&too_long.stderr);
    assert!(
        errors.contains("--steps 9223372036854775808") && errors.contains("learner.max_steps"),
        "{errors}"
    );
    assert!(!out.join("replaced").exists());
    // Reports with no configuration beside them (an older runner's) are
    // never taken for this run's: set aside, and the run made again.
    std::fs::remove_file(out.join("runs/small_fl-db_seed0/config.toml")).unwrap();
    let remade = again("20");
    assert_eq!(runs_kept(&remade), 3);
    let printed = String::from_utf8_lossy(&remade.stdout);
    assert_eq!(printed.matches("starting over").count(), 1, "{printed}");
    // The runs kept are taken first, so that the tables hold them all
    // before any run trains: the suite's first run, made again, comes
    // last.
    assert!(
        printed.rfind("already done, kept")
            < printed.find("[4/4] small_fl-db_seed0: made with another configuration"),
        "{printed}"
    );
    // A run made by another build of the learner is made again (its
    // figures would not be this build's), unless --keep-other-builds;
    // the tables name the builds behind them.
    let record_path = out.join("runs/small_tb_seed1/run.json");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    let this_build = record["builds"][0].as_str().unwrap().to_owned();
    assert!(this_build.contains("commit "), "{record}");
    std::fs::write(
        &record_path,
        serde_json::json!({ "builds": ["an older build"] }).to_string(),
    )
    .unwrap();
    let kept_other = smoke(&["--steps", "20", "--keep-other-builds"], &out);
    assert_eq!(runs_kept(&kept_other), 4);
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("- an older build: 1 run")
            && summary.contains(&format!("- {this_build}: 3 runs")),
        "{summary}"
    );
    let rebuilt = again("20");
    assert_eq!(runs_kept(&rebuilt), 3);
    let printed = String::from_utf8_lossy(&rebuilt.stdout);
    assert_eq!(
        printed
            .matches("small_tb_seed1: made by another build (an older build; this learner is ")
            .count(),
        1,
        "{printed}"
    );
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains(&format!("- {this_build}: 4 runs")),
        "{summary}"
    );
    // One runner per folder: a second is refused while the first holds it.
    let lock = std::fs::File::open(out.join("runner.lock")).unwrap();
    lock.try_lock().unwrap();
    let second = again("20");
    assert!(!second.status.success());
    let errors = String::from_utf8_lossy(&second.stderr);
    assert!(
        errors.contains("another flgfn-experiment is writing to"),
        "{errors}"
    );
    drop(lock);
    // A figure of a group no longer drawn is removed at the next drawing;
    // other files in the folder stay.
    std::fs::write(out.join("plots/other-steps.png"), b"old").unwrap();
    std::fs::write(out.join("plots/notes.txt"), b"mine").unwrap();
    let longer = again("30");
    assert!(longer.status.success());
    let printed = String::from_utf8_lossy(&longer.stdout);
    assert_eq!(
        printed
            .matches("made with another configuration; starting over (the old run is now ")
            .count(),
        4,
        "{printed}"
    );
    assert!(!out.join("plots/other-steps.png").exists());
    assert!(out.join("plots/notes.txt").exists());
    assert!(out.join("plots/small-steps.png").exists());
    let replaced: Vec<_> = std::fs::read_dir(out.join("replaced"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(replaced.len(), 6, "{replaced:?}");
    for old in &replaced {
        let metrics = std::fs::read_to_string(old.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value =
            serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        assert_eq!(last["step"], 20, "{}", old.display());
        assert!(old.join("checkpoints/final.safetensors").exists());
    }
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert!(
        summary
            .lines()
            .skip(1)
            .all(|row| row.split(',').nth(4) == Some("30")),
        "{summary}"
    );
    // Back to the first budget: its finished runs set aside are moved
    // back, nothing trained (the older build's and the configuration-less
    // folders stay aside), the 30-step runs set aside in their place; and
    // back to 30 steps the same way.
    for steps in ["20", "30"] {
        let back = again(steps);
        assert_eq!(runs_kept(&back), 4);
        let printed = String::from_utf8_lossy(&back.stdout);
        assert_eq!(
            printed.matches(": moved back from ").count(),
            4,
            "{printed}"
        );
        assert!(!printed.contains("starting over"), "{printed}");
        assert_eq!(
            std::fs::read_dir(out.join("replaced")).unwrap().count(),
            6,
            "{printed}"
        );
        let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
        assert!(
            summary
                .lines()
                .skip(1)
                .all(|row| row.split(',').nth(4) == Some(steps)),
            "{summary}"
        );
    }
    // A redraw that must fail (runs missing), and what it printed: its
    // heading names what it redraws.
    let failed_redraw = |args: &[&str], heading: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
            .arg("--plot-only")
            .args(args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        let errors = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{printed}{errors}");
        assert!(
            printed.contains(&format!("redrawing suite {heading}")),
            "{printed}"
        );
        (printed, errors)
    };
    // Redrawn with more seeds than were run: the missing runs count as
    // failed, by name, and the exit status says the tables are short.
    let (printed, _) = failed_redraw(&["--seeds", "3"], "smoke (3 seeds, 30 steps per run)");
    assert_eq!(
        printed
            .matches("_seed2: never started; counted as failed")
            .count(),
        2,
        "{printed}"
    );
    // Another suite named: the folder's record (smoke's) is not applied to
    // it, and none of its runs are here.
    let (_, errors) = failed_redraw(
        &["--suite", "paper-sets"],
        "paper-sets (3 seeds, 2000 steps per run)",
    );
    assert!(errors.contains("no run of these under"), "{errors}");
    let refused = again("0");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--steps"));
    // Refused before anything runs, naming what is at fault: too many
    // seeds; a --set of a key the runner sets per run, of one the suite
    // varies, or of the task, or of a value validation refuses; a
    // --steps at fault, with a --set beside it.
    for (args, said_with) in [
        (
            &["--seeds", "100000000000"][..],
            "--seeds must be 1 to 10000",
        ),
        (
            &["--set", "learner.max_steps=5"],
            "--set learner.max_steps`: the runner sets it for each run (--steps)",
        ),
        (
            &["--set", "objective.name=\"tb\""],
            "suite smoke varies objective.name between its configurations",
        ),
        (&["--set", "task.size=\"large\""], "groups are its tasks"),
        (&["--set", "actor.epsilon=2"], "actor.epsilon"),
        (
            &[
                "--set",
                "actor.epsilon=1.0",
                "--steps",
                "9223372036854775808",
            ],
            "--steps 9223372036854775808",
        ),
    ] {
        let refused = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
            .args(["--suite", "smoke"])
            .args(args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && said.contains(said_with),
            "{args:?}: {said}"
        );
    }
    // `--plot-metrics FILES... --out DIR`.
    let plot_metrics = |files: &[&std::path::Path], dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
            .arg("--plot-metrics")
            .args(files)
            .arg("--out")
            .arg(dir)
            .output()
            .unwrap()
    };
    // Flags of a suite are refused beside it, not ignored.
    let refused = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
        .args(["--plot-metrics", "metrics.jsonl", "--steps", "5"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        refused.status.code() == Some(2) && said.contains("--steps"),
        "{said}"
    );
    // A folder given as a metrics file is named.
    let refused = plot_metrics(&[&out.join("runs")], &out.join("unused"));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("cannot read") && said.contains("runs"),
        "{said}"
    );

    // One run's metrics file on its own, as a user would plot it.
    let metrics = out.join("runs/small_fl-db_seed0/metrics.jsonl");
    let plots = out.join("single");
    let output = plot_metrics(&[&metrics], &plots);
    assert!(output.status.success());
    for name in ["metrics-steps.png", "metrics-seconds.png"] {
        let png = std::fs::read(plots.join(name)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{name}");
    }
    let svg = std::fs::read_to_string(plots.join("metrics-steps.svg")).unwrap();
    assert!(svg.contains("trained transitions per second") && svg.contains("mean policy lag"));
    // Two runs' files, both named metrics.jsonl: one figure, each curve
    // named by its run's folder (plotted one by one, the second would
    // overwrite the first's figures).
    let both = [
        out.join("runs/small_fl-db_seed0/metrics.jsonl"),
        out.join("runs/small_tb_seed0/metrics.jsonl"),
    ];
    let output = plot_metrics(&[&both[0], &both[1]], &plots);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let svg = std::fs::read_to_string(plots.join("compared-steps.svg")).unwrap();
    assert!(
        svg.contains("\nsmall_fl-db_seed0\n") && svg.contains("\nsmall_tb_seed0\n"),
        "the curves are named by their runs' folders"
    );
    // The same file twice would be one curve drawn as two: refused.
    let refused = plot_metrics(&[&both[0], &both[0]], &plots);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("is given twice"),
        "{said}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// A run that writes no report and no checkpoint for `--stall-timeout-s`
/// is killed, counted as failed (in summary.csv too), and the suite goes
/// on to the next. (A million steps: the first report, at 50,000, is many
/// seconds away, and the first checkpoint 60 s.)
#[test]
fn a_run_silent_past_the_stall_timeout_is_killed_and_counted_failed() {
    let out = std::env::temp_dir().join(format!("flgfn-experiment-stall-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
        .args(["--suite", "smoke", "--seeds", "1", "--steps", "1000000"])
        .args(["--stall-timeout-s", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{printed}");
    // Both runs of the suite were tried, and both stopped this way.
    assert_eq!(
        printed
            .matches("no report and no checkpoint for 2 s (--stall-timeout-s)")
            .count(),
        2,
        "{printed}"
    );
    eprintln!("both runs killed within {:?}", started.elapsed());
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let rows: Vec<&str> = summary.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{summary}");
    assert!(rows.iter().all(|row| row.ends_with(",1")), "{summary}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// A suite stopped midway by SIGTERM to its whole process group (as
/// systemd or Slurm stop a job; Ctrl-C at a terminal sends SIGINT alike,
/// but a shell without job control starts background commands with SIGINT
/// ignored): the runner dies of it at once, while its learner gets it and
/// its parent's death together, and checkpoints as it stops, not taking
/// the two for a forced exit. Started again, the suite resumes that run
/// from its checkpoint: its reports stay on the evaluation grid, none
/// twice, and its seconds of training go on from the checkpoint's.
#[cfg(unix)]
#[test]
fn a_suite_killed_midway_resumes_its_run_from_the_checkpoint() {
    use std::os::unix::process::CommandExt;
    let out = std::env::temp_dir().join(format!("flgfn-experiment-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // One seed, two objectives; a report every 1,000 steps.
    let args = ["--suite", "smoke", "--seeds", "1", "--steps", "2000"];
    // Killed (and its learner with it) if the test fails before it does.
    let mut runner = support::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
            .args(args)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let run = out.join("runs/small_fl-db_seed0");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(true, |m| m.is_empty()) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no first report"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let group = format!("-{}", runner.id());
    let interrupted = Command::new("kill")
        .args(["-TERM", "--", &group])
        .status()
        .unwrap();
    assert!(interrupted.success());
    runner.0.wait().unwrap();
    // Its learner stops, checkpoints and lets go of the folder.
    let checkpoints = run.join("checkpoints");
    let released = std::time::Instant::now();
    loop {
        if let Ok(lock) = flgfn_learner::checkpoint::lock(&checkpoints) {
            drop(lock);
            break;
        }
        assert!(
            released.elapsed() < std::time::Duration::from_secs(60),
            "the learner did not stop with its runner"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let stopped_at = flgfn_learner::checkpoint::list(&checkpoints)
        .unwrap()
        .last()
        .map(|(step, _)| *step)
        .expect("a checkpoint of the stop");
    assert!(
        (1000..2000).contains(&stopped_at),
        "stopped at step {stopped_at}"
    );

    let again = Command::new(env!("CARGO_BIN_EXE_flgfn-experiment"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{printed}");
    assert_eq!(runs_kept(&again), 0, "{printed}");
    let log = std::fs::read_to_string(run.join("learner.log")).unwrap();
    assert!(!log.contains("a second stop signal"), "{log}");
    assert!(log.contains("resuming from a checkpoint"), "{log}");
    let reports: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let steps: Vec<u64> = reports
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.first(), Some(&1000), "{steps:?}");
    assert_eq!(steps.last(), Some(&2000), "{steps:?}");
    let wall = |step: u64| {
        reports
            .iter()
            .find(|r| r["step"] == step)
            .and_then(|r| r["wall_s"].as_f64())
            .unwrap()
    };
    assert!(wall(2000) > wall(1000), "{reports:?}");
    // The tables hold it once, on the grid.
    let table = std::fs::read_to_string(out.join("reports.csv")).unwrap();
    let rows: Vec<&str> = table
        .lines()
        .filter(|row| row.starts_with("small_fl-db_seed0,"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// How many runs a successful runner kept as already done.
fn runs_kept(output: &std::process::Output) -> usize {
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed.matches("already done, kept").count()
}
