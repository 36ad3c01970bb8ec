use std::path::{Path, PathBuf};

use crate::error::LearnerError;

use super::*;

/// A failed run's summary names its error with the causes, as the
/// exit line does (`{:#}`), and where it got to.
#[test]
fn a_failed_run_summary_names_the_error_and_its_causes() {
    let dir = std::env::temp_dir().join(format!("flgfn-failed-summary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.summary.json");
    let error = LearnerError::Metrics {
        path: "run.jsonl".to_owned(),
        source: std::io::Error::other("No space left on device"),
    };
    write_failed_summary(&path, 812, &error).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        summary["error"],
        format!("{:#}", anyhow::Error::from(error)),
        "{summary}"
    );
    assert_eq!(
        summary["error"],
        "cannot write metrics file run.jsonl: No space left on device"
    );
    assert_eq!(summary["ended_by"], "error");
    assert_eq!(summary["steps"], 812);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_non_finite_number_reads_back_as_nan() {
    let report = Report {
        loss: 0.5,
        logz_est: f64::NAN,
        busy_ms_per_step: f64::INFINITY,
        ..Report::default()
    };
    let line = serde_json::to_string(&report).unwrap();
    assert!(line.contains("\"logz_est\":null"), "{line}");
    let back: Report = serde_json::from_str(&line).unwrap();
    assert_eq!(back.loss, 0.5);
    assert!(back.logz_est.is_nan() && back.busy_ms_per_step.is_nan());
}

#[test]
fn bytes_per_trained_transition_count_what_this_process_trained() {
    let stats = IngestStats::default();
    stats.wire_bytes.store(6_000, Ordering::Relaxed);
    stats.weight_bytes.store(30_000, Ordering::Relaxed);
    // 1,000 trained before the resume, 3,000 by this process.
    let mut report = Report {
        trained_transitions: 4_000,
        resumed_trained_transitions: 1_000,
        ..Report::default()
    };
    report.count_from(&stats);
    assert_eq!(report.trajectory_bytes_per_trained_transition, 2.0);
    assert_eq!(report.weight_bytes_per_trained_transition, 10.0);
    // Resumed, and nothing trained since: 0, not infinite (nor the
    // bytes over what an earlier process trained).
    report.trained_transitions = 1_000;
    report.count_from(&stats);
    assert_eq!(report.trajectory_bytes_per_trained_transition, 0.0);
    assert_eq!(report.weight_bytes_per_trained_transition, 0.0);
}

/// A resumed run gets back the report written at the step it resumes
/// at, once; none where the last report kept is of an earlier step.
#[test]
fn a_resumed_run_takes_back_the_report_of_its_step() {
    let dir = std::env::temp_dir().join(format!("flgfn-resumed-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("metrics.jsonl");
    let line = |step: u64, loss: f64| {
        serde_json::to_string(&Report {
            step,
            loss,
            ..Report::default()
        })
        .unwrap()
            + "\n"
    };
    std::fs::write(&path, line(100, 1.0) + &line(200, 2.0) + &line(300, 3.0)).unwrap();
    let mut metrics = MetricsFile::open(&path, Some(200)).unwrap();
    let taken = metrics.take_resumed_report().unwrap();
    assert_eq!((taken.step, taken.loss), (200, 2.0));
    assert!(metrics.take_resumed_report().is_none());
    drop(metrics);
    // A checkpoint between two reports.
    let mut metrics = MetricsFile::open(&path, Some(250)).unwrap();
    assert!(metrics.take_resumed_report().is_none());
    drop(metrics);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resumed_run_keeps_the_reports_up_to_its_step_and_appends() {
    let dir = std::env::temp_dir().join(format!("flgfn-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("metrics.jsonl");
    let line = |step: u64| format!("{{\"step\":{step},\"loss\":1.0}}\n");
    // Reports to step 300, then a line torn by a crash; the run resumes
    // from its checkpoint at step 200.
    let before = format!("{}{}{}{{\"step\":4", line(100), line(200), line(300));
    std::fs::write(&path, before).unwrap();
    let mut metrics = MetricsFile::open(&path, Some(200)).unwrap();
    metrics
        .write(&Report {
            step: 250,
            ..Report::default()
        })
        .unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [100, 200, 250]);
    drop(metrics);
    // Without a step to resume at, the file starts over.
    drop(MetricsFile::open(&path, None).unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A link to a plain file: trimmed through the link, which stays.
#[test]
fn a_resumed_run_trims_through_a_link_without_replacing_it() {
    let dir = std::env::temp_dir().join(format!("flgfn-metrics-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("kept.jsonl");
    let link = dir.join("metrics.jsonl");
    std::fs::write(&target, "{\"step\":300}\n").unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut metrics = MetricsFile::open(&link, Some(200)).unwrap();
    metrics
        .write(&Report {
            step: 250,
            ..Report::default()
        })
        .unwrap();
    drop(metrics);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let text = std::fs::read_to_string(&target).unwrap();
    assert!(text.starts_with("{\"step\":250,"), "{text}");
    assert_eq!(text.lines().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh run given another run's metrics file keeps those reports,
/// moved beside it, each run's in a file of its own.
#[test]
fn a_fresh_run_moves_the_reports_it_finds_beside_its_file() {
    let dir = std::env::temp_dir().join(format!("flgfn-metrics-aside-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.jsonl");
    let first = "{\"step\":100}\n{\"step\":200}\n";
    std::fs::write(&path, first).unwrap();
    let mut metrics = MetricsFile::open(&path, None).unwrap();
    metrics
        .write(&Report {
            step: 5,
            ..Report::default()
        })
        .unwrap();
    drop(metrics);
    let second = std::fs::read_to_string(&path).unwrap();
    assert!(second.starts_with("{\"step\":5,"), "{second}");
    assert_eq!(second.lines().count(), 1);
    assert_eq!(
        std::fs::read_to_string(dir.join("run.jsonl.1")).unwrap(),
        first
    );
    // The next fresh run: the next free name, the summary of the run
    // set aside numbered as its reports.
    let summary = dir.join("run.summary.json");
    std::fs::write(&summary, "{}").unwrap();
    drop(MetricsFile::open(&path, None).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("run.jsonl.2")).unwrap(),
        second
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    assert!(!summary.exists());
    assert_eq!(
        std::fs::read_to_string(dir.join("run.summary.json.2")).unwrap(),
        "{}"
    );
    // An empty file has nothing to keep; a resumed run keeps its own
    // reports, and its summary is written again at its end.
    drop(MetricsFile::open(&path, None).unwrap());
    std::fs::write(&path, "{\"step\":100}\n").unwrap();
    std::fs::write(&summary, "{}").unwrap();
    drop(MetricsFile::open(&path, Some(100)).unwrap());
    assert!(!dir.join("run.jsonl.3").exists());
    assert!(!summary.exists() && !dir.join("run.summary.json.3").exists());
    // One past the highest, whatever was deleted below it.
    std::fs::remove_file(dir.join("run.jsonl.1")).unwrap();
    drop(MetricsFile::open(&path, None).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("run.jsonl.3")).unwrap(),
        "{\"step\":100}\n"
    );
    // Through a link: beside its target, and so is the summary (set
    // aside with the reports, written there).
    let targets = dir.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let target = targets.join("target.jsonl");
    std::fs::write(&target, "{\"step\":7}\n").unwrap();
    std::fs::write(targets.join("target.summary.json"), "{}").unwrap();
    let link = dir.join("link.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let metrics = MetricsFile::open(&link, None).unwrap();
    assert_eq!(
        std::fs::read_to_string(targets.join("target.jsonl.1")).unwrap(),
        "{\"step\":7}\n"
    );
    assert_eq!(
        std::fs::read_to_string(targets.join("target.summary.json.1")).unwrap(),
        "{}"
    );
    assert_eq!(
        metrics.summary_path(),
        Some(
            std::fs::canonicalize(&targets)
                .unwrap()
                .join("target.summary.json")
        )
    );
    drop(metrics);
    assert!(!dir.join("link.jsonl.1").exists());
    // Only plain numbers count; past the largest, refused.
    std::fs::write(dir.join("run.jsonl.+9"), "").unwrap();
    std::fs::write(&path, "{\"step\":1}\n").unwrap();
    drop(MetricsFile::open(&path, None).unwrap());
    assert!(dir.join("run.jsonl.4").exists());
    std::fs::write(dir.join("run.jsonl.4294967295"), "").unwrap();
    std::fs::write(&path, "{\"step\":2}\n").unwrap();
    let refused = MetricsFile::open(&path, None).err().unwrap();
    let said = format!("{:#}", anyhow::Error::from(refused));
    assert!(said.contains("is the highest number there"), "{said}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":2}\n");
    // Where nothing can be written beside it (here a name one past
    // the longest a file may have), the file is left whole.
    let long = dir.join(format!("{}.jsonl", "m".repeat(248)));
    std::fs::write(&long, "{\"step\":9}\n").unwrap();
    let refused = MetricsFile::open(&long, None).err().unwrap();
    let said = format!("{:#}", anyhow::Error::from(refused));
    assert!(said.contains("cannot keep the reports"), "{said}");
    assert_eq!(std::fs::read_to_string(&long).unwrap(), "{\"step\":9}\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A metrics file in folders that do not exist yet: they are made.
#[test]
fn the_folders_of_a_new_metrics_file_are_made() {
    let dir = std::env::temp_dir().join(format!("flgfn-metrics-folders-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("runs/a/metrics.jsonl");
    let mut metrics = MetricsFile::open(&path, None).unwrap();
    metrics.write(&Report::default()).unwrap();
    drop(metrics);
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Not a plain file: appended to, never read (a pipe would block).
#[test]
fn a_device_is_appended_to_as_it_is() {
    for resumed_at in [None, Some(10)] {
        let mut metrics = MetricsFile::open(Path::new("/dev/null"), resumed_at).unwrap();
        metrics.write(&Report::default()).unwrap();
        // Two runs may share one.
        drop(MetricsFile::open(Path::new("/dev/null"), None).unwrap());
    }
}

/// A stream redirected to a file (`--metrics /dev/stdout >> out`):
/// appended to, its other lines kept, whether resumed or not.
#[cfg(target_os = "linux")]
#[test]
fn a_stream_redirected_to_a_file_is_appended_to_as_it_is() {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join(format!("flgfn-metrics-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("job.out");
    std::fs::write(&out, "job started\n{\"step\":900}\n").unwrap();
    let held = std::fs::File::open(&out).unwrap();
    let stream = PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
    for resumed_at in [None, Some(10)] {
        let mut metrics = MetricsFile::open(&stream, resumed_at).unwrap();
        metrics.write(&Report::default()).unwrap();
    }
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("job started\n{\"step\":900}\n{"), "{text}");
    assert_eq!(text.lines().count(), 4, "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_writer_is_refused_and_the_first_ones_reports_stay() {
    let dir = std::env::temp_dir().join(format!("flgfn-metrics-lock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("metrics.jsonl");
    let mut first = MetricsFile::open(&path, None).unwrap();
    first
        .write(&Report {
            step: 7,
            ..Report::default()
        })
        .unwrap();
    for resumed_at in [None, Some(0)] {
        let refused = MetricsFile::open(&path, resumed_at).err().unwrap();
        let said = format!("{:#}", anyhow::Error::from(refused));
        assert!(said.contains("another process is writing"), "{said}");
    }
    first
        .write(&Report {
            step: 8,
            ..Report::default()
        })
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.starts_with("{\"step\":7,"), "{text}");
    // Free once the first is done.
    drop(first);
    drop(MetricsFile::open(&path, Some(8)).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_file_that_holds_no_reports_is_left_as_it_is() {
    let dir = std::env::temp_dir().join(format!("flgfn-metrics-other-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, job) in [
        ("job.toml", "[learner]\nmax_steps = 5\n"),
        ("config.json", "{\"seeds\": 3}\n"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, job).unwrap();
        for resumed_at in [None, Some(3)] {
            let refused = MetricsFile::open(&path, resumed_at).err().unwrap();
            let said = format!("{:#}", anyhow::Error::from(refused));
            assert!(
                said.contains(name) && said.contains("holds something other than metrics"),
                "{said}"
            );
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), job);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
