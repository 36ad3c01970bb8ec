use crate::report::Report;

use super::results::{finished, on_grid};
use super::runner::{CONFIG_FILE, judge, run_config, set_aside_runs, written_config_matches};
use super::tables::field;
use super::*;

fn report(step: u64, at_quality: bool, top: f64) -> Report {
    Report {
        step,
        wall_s: step as f64 / 100.0,
        at_quality: Some(at_quality),
        top100_mean_reward: top,
        logz_exact: Some(1.0),
        ..Report::default()
    }
}

/// A run is finished by its reports, as a later start and
/// `--plot-only` judge it, whatever its learner's exit.
#[test]
fn a_run_is_judged_by_its_reports() {
    let spec = suite("smoke").unwrap().runs(1, Some(300))[0].clone();
    let complete = || Ok(vec![report(100, false, 0.0), report(300, true, 0.0)]);
    let cut_short = || Ok(vec![report(100, false, 0.0)]);
    let failed = || Err(anyhow::anyhow!("exit status: 1"));
    assert_eq!(judge(&spec, "run", Ok(()), complete()).unwrap().0.len(), 2);
    assert_eq!(
        judge(&spec, "run", failed(), complete()).unwrap().0.len(),
        2
    );
    let error = judge(&spec, "run", Ok(()), cut_short()).unwrap_err();
    assert_eq!(error.to_string(), "run stopped at step 100 of 300");
    let error = judge(&spec, "run", failed(), cut_short()).unwrap_err();
    assert_eq!(error.to_string(), "exit status: 1");
    let none = Err(anyhow::anyhow!("cannot read metrics.jsonl"));
    assert!(judge(&spec, "run", failed(), none).is_err());
    // Reports that reach the end with a diverged final policy: the
    // learner's failure, not a finished run (nor at a later start).
    let mut last = report(300, false, 0.0);
    last.non_finite_draws = 7;
    let diverged = || Ok(vec![report(100, false, 0.0), last.clone()]);
    let error = judge(&spec, "run", failed(), diverged()).unwrap_err();
    assert_eq!(error.to_string(), "exit status: 1");
    assert!(!finished(&spec, &diverged().unwrap()));
}

/// A configuration whose every seed failed keeps its place in the
/// suite, and its top-100 count reads 0 of its seeds: the ceiling is
/// the task's, known without a finished run.
#[test]
fn a_configuration_that_only_failed_keeps_its_row() {
    let specs = suite("paper-sets").unwrap().runs(1, Some(300));
    let (first, second) = (specs[0].clone(), specs[1].clone());
    assert!(first.position < second.position);
    let finished = summarise(second.clone(), vec![report(300, true, 0.1)]).unwrap();
    let table = summary_markdown(&[finished], std::slice::from_ref(&first));
    let rows: Vec<&str> = table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].starts_with(&format!(
            "| {} | {} | 0/1 | never | never | 0/1 | 0/1 |",
            first.group, first.curve
        )),
        "{table}"
    );
    assert!(
        rows[1].contains(&format!("| {} |", second.curve)),
        "{table}"
    );
}

#[test]
fn a_ceiling_beyond_f64_is_not_compared() {
    let mut spec = suite("lattice").unwrap().runs(1, Some(300))[0].clone();
    let flgfn_common::config::TaskConfig::Lattice(lattice) = &mut spec.config.task else {
        panic!("a lattice suite");
    };
    // Energies down to about -2,400: exp(2,400) overflows.
    lattice.coupling = 100.0;
    let result = summarise(spec, vec![report(100, true, f64::MAX)]).unwrap();
    assert_eq!(result.top_k_ceiling, None);
    assert_eq!(result.to_top_k, None);
    assert!(!summary_csv(&[result], &[], &[]).contains("inf"));
}

#[test]
fn thresholds_are_the_first_report_that_meets_them() {
    let spec = suite("paper-sets").unwrap().runs(1, Some(300))[0].clone();
    let ceiling = 0.263281;
    let reports = vec![
        report(100, false, 0.2),
        report(200, true, 0.99 * ceiling - 1e-4),
        report(300, false, ceiling),
    ];
    let mut result = summarise(spec, reports).unwrap();
    assert_eq!(result.to_quality, Some((200, 2.0)));
    assert_eq!(result.to_top_k, Some((300, 3.0)));
    assert!((result.top_k_ceiling.unwrap() - ceiling).abs() < 1e-5);
    result.reports.last_mut().unwrap().logz_sampled = 1.25;
    let table = summary_markdown(std::slice::from_ref(&result), &[]);
    // At quality at 200, not at the last report (300).
    assert!(table.contains("| 1/1 | 200 | 2.00 | 0/1 |"), "{table}");
    // Then the final top-100, the model's log Z error (its estimate 0,
    // exact 1) and the importance-sampled one (1.25).
    assert!(
        table.contains("| 300 | 3.00 | 0.2633 | 1.000 | 0.250 |"),
        "{table}"
    );
    let csv = summary_csv(std::slice::from_ref(&result), &[], &[]);
    let (header, row) = (csv.lines().next().unwrap(), csv.lines().nth(1).unwrap());
    let column = |name: &str| {
        let index = header.split(',').position(|h| h == name).unwrap();
        row.split(',').nth(index).unwrap().to_owned()
    };
    assert_eq!(column("final_top100"), ceiling.to_string());
    assert_eq!(column("final_sampled_logz_error"), "0.25");
    // Rewards in the thousands and more are shown whole; a seed's null
    // (NaN) changes neither the others' decimals nor the mean.
    let mut large = result.clone();
    large.reports.last_mut().unwrap().top100_mean_reward = 132_709.4;
    let table = summary_markdown(&[large], &[]);
    assert!(table.contains("| 132709 |"), "{table}");
    let mut null = result.clone();
    null.spec.seed = 1;
    null.reports.last_mut().unwrap().top100_mean_reward = f64::NAN;
    let table = summary_markdown(&[result.clone(), null], &[]);
    assert!(table.contains("| 0.2633 (1 of 2) |"), "{table}");
    // A failed run of the same curve counts among its seeds, and a
    // value written as null (NaN here) is left out of the finals.
    result.reports.last_mut().unwrap().marginal_tv = Some(0.05);
    let mut nan = result.clone();
    nan.spec.seed = 1;
    nan.reports.last_mut().unwrap().marginal_tv = Some(f64::NAN);
    let mut failed = result.spec.clone();
    failed.seed = 2;
    let table = summary_markdown(&[result, nan], &[failed]);
    assert!(
        table.contains("| 2/3 | 200 (200-200) | 2.00 (2.00-2.00) |"),
        "{table}"
    );
    assert!(table.contains("| 0.0500 (1 of 2) |"), "{table}");
    assert!(!table.contains("NaN"), "{table}");
    let last_row = table.lines().rfind(|l| l.starts_with('|')).unwrap();
    assert!(last_row.ends_with("| 1 |"), "{table}");
    let csv = reports_csv(std::slice::from_ref(
        &summarise(
            suite("paper-sets").unwrap().runs(1, Some(300))[0].clone(),
            vec![report(100, false, 0.2)],
        )
        .unwrap(),
    ));
    assert_eq!(csv.lines().count(), 2);
    let header = csv.lines().next().unwrap().split(',').count();
    assert_eq!(csv.lines().nth(1).unwrap().split(',').count(), header);
}

#[test]
fn plot_only_counts_every_run_asked_for_that_did_not_finish() {
    let out = std::env::temp_dir().join(format!("flgfn-plot-only-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let specs = suite("paper-sets").unwrap().runs(2, Some(300));
    let (started, never) = (&specs[0], &specs[1]);
    let dir = out.join("runs").join(started.name());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), run_config(started, &dir).to_toml()).unwrap();
    let SuiteOutcome { results, failed } = load_results(&specs[..2], &out).unwrap();
    assert!(results.is_empty());
    let failed: Vec<(String, &str)> = failed
        .iter()
        .map(|(spec, why)| (spec.name(), why.as_str()))
        .collect();
    // The run never started is counted too: the table must not rest
    // on fewer seeds than asked for without saying so.
    assert_eq!(
        failed,
        [
            (started.name(), "no report"),
            (never.name(), "never started")
        ]
    );
    // Nothing of these runs at all: an error, saying what to give.
    let error = load_results(&specs[1..2], &out).unwrap_err().to_string();
    assert!(error.contains("--suite, --seeds and --steps"), "{error}");
    // Another --steps: the run's folder holds another configuration,
    // and with nothing else of these runs, that is an error too.
    let other = suite("paper-sets").unwrap().runs(2, Some(400));
    assert_eq!(other[0].name(), started.name());
    let error = load_results(&other[..1], &out).unwrap_err().to_string();
    assert!(error.contains("--suite, --seeds and --steps"), "{error}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn csv_fields_with_commas_or_quotes_are_quoted() {
    assert_eq!(field("small"), "small");
    assert_eq!(field("small, 0% truncated"), "\"small, 0% truncated\"");
    assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
    let spec = suite("incomplete").unwrap().runs(1, Some(100))[0].clone();
    assert!(spec.group.contains(','), "{}", spec.group);
    let failed = suite("incomplete").unwrap().runs(1, Some(100))[1].clone();
    let csv = summary_csv(
        &[summarise(spec, vec![report(100, false, 0.2)]).unwrap()],
        std::slice::from_ref(&failed),
        &[],
    );
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[1].contains(",\"small, 0% truncated\","), "{csv}");
    assert!(rows[1].ends_with(",0"), "{csv}");
    // The failed run has its row, with its seed, flagged.
    let flagged = rows[2];
    assert!(
        flagged.starts_with(&field(&failed.name())) && flagged.ends_with(",1"),
        "{csv}"
    );
    // Every row has every column (the comma in the group quoted).
    let columns = |row: &str| row.replace(&field(&failed.group), "g").split(',').count();
    assert_eq!(columns(rows[0]), columns(flagged), "{csv}");
}

/// The tables say which builds made their figures, and which runs'
/// learners failed after their last report; `summary.csv` has both,
/// and whether each run ended at quality, per run.
#[test]
fn the_tables_name_builds_and_learner_failures() {
    let specs = suite("smoke").unwrap().runs(2, Some(300));
    let result = |spec: &RunSpec, builds: &[&str], failed: Option<&str>| RunResult {
        record: RunRecord {
            builds: builds.iter().map(|b| (*b).to_owned()).collect(),
            learner_failed: failed.map(str::to_owned),
        },
        ..summarise(
            spec.clone(),
            vec![report(100, true, 0.0), report(300, true, 0.0)],
        )
        .unwrap()
    };
    let results = [
        result(&specs[0], &["b1"], None),
        result(&specs[1], &["b1"], Some("1 local actor(s) failed")),
        result(&specs[2], &["b0", "b1"], None),
        result(&specs[3], &[], None),
    ];
    let table = summary_markdown(&results, &[]);
    for line in [
        "- b1: 2 runs",
        "- b0 + b1: 1 run",
        "- unrecorded: 1 run",
        &format!("- {}: 1 local actor(s) failed", specs[1].name()),
    ] {
        assert!(table.contains(line), "{line} in\n{table}");
    }
    assert!(
        table.contains("| 2/2 | 100 (100-100) | 1.00 (1.00-1.00) | 2/2 |"),
        "{table}"
    );
    let csv = summary_csv(&results, &[], std::slice::from_ref(&specs[0]));
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|r| r.split(',').collect())
        .collect();
    assert_eq!(rows[0][column("final_at_quality")], "1");
    assert_eq!(rows[0][column("learner_failed")], "0");
    assert_eq!(rows[1][column("learner_failed")], "1");
    assert_eq!(rows[2][column("builds")], "b0 + b1");
    assert_eq!(rows[3][column("builds")], "unrecorded");
    assert_eq!(rows[3][column("pending")], "0");
    // A run not done yet has its row, flagged pending, not failed.
    assert_eq!(rows[4][column("run")], specs[0].name());
    assert_eq!(
        (rows[4][column("pending")], rows[4][column("failed")]),
        ("1", "0")
    );
    assert_eq!(rows[4].len(), header.len());
    // Only a run every part of which one build trained is that build's.
    assert!(results[0].record.only_by("b1"));
    assert!(!results[2].record.only_by("b1"));
    assert!(!results[3].record.only_by("b1"));
}

/// Every run of every suite reads back as its own configuration: a
/// round trip that differed would start every run over at every start.
#[test]
fn every_suite_run_recognises_its_written_configuration() {
    let out = std::env::temp_dir().join(format!("flgfn-suite-configs-{}", std::process::id()));
    for suite in SUITES {
        for spec in suite.runs(2, None) {
            let dir = out.join(spec.name());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(CONFIG_FILE), run_config(&spec, &dir).to_toml()).unwrap();
            assert_eq!(
                written_config_matches(&spec, &dir),
                Some(true),
                "{} of {}",
                spec.name(),
                suite.name
            );
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn reports_off_the_evaluation_grid_are_left_out() {
    let mut spec = suite("paper-sets").unwrap().runs(1, Some(300))[0].clone();
    spec.config.learner.eval_every_steps = 100;
    let steps: Vec<u64> = on_grid(
        &spec,
        [100, 150, 200, 300].map(|s| report(s, false, 0.0)).to_vec(),
    )
    .iter()
    .map(|r| r.step)
    .collect();
    assert_eq!(steps, [100, 200, 300]);
}

/// `--set` settings reach every run of a suite, over the suite's own
/// (each seed keeps its own seed); one the schema or the validation
/// refuses is an error naming it, and no run is made.
#[test]
fn settings_reach_every_run_and_refusals_name_them() {
    use flgfn_common::config::setting_override;
    let incomplete = suite("incomplete").unwrap();
    let settings = [
        setting_override("actor.epsilon=1.0").unwrap(),
        setting_override("learner.learning_rate = 1e-3").unwrap(),
    ];
    let plain = incomplete.runs(2, Some(100));
    let set = incomplete.runs_with(2, Some(100), &settings).unwrap();
    assert_eq!(set.len(), plain.len());
    for (set, plain) in set.iter().zip(&plain) {
        assert_eq!(set.config.actor.epsilon, 1.0);
        assert_eq!(set.config.learner.learning_rate, 1e-3);
        assert_ne!(plain.config.actor.epsilon, 1.0);
        // Only what was set differs.
        let mut back = set.config.clone();
        back.actor.epsilon = plain.config.actor.epsilon;
        back.learner.learning_rate = plain.config.learner.learning_rate;
        assert_eq!(back, plain.config, "{}", set.name());
    }
    // Values the validation or the schema refuses; keys the runner sets,
    // and keys the suite varies between curves (incomplete: the truncated
    // fraction, and the objective).
    for (setting, said) in [
        ("actor.epsilon=2", "actor.epsilon"),
        ("actor.epsilon=often", "--set actor.epsilon"),
        ("actor.epsilonn=1", "--set actor.epsilonn"),
        ("seed=1", "the runner sets it"),
        (
            "actor.truncate_fraction=0.5",
            "varies actor.truncate_fraction",
        ),
        ("objective.name=\"tb\"", "varies objective.name"),
        // The group's task: its name, plots and batch follow it.
        ("task.size=\"large\"", "groups are its tasks"),
        // Reports on time: no step grid to compare runs on.
        (
            "learner.eval_every_steps=0",
            "--set learner.eval_every_steps",
        ),
    ] {
        let error = incomplete
            .runs_with(1, Some(100), &[setting_override(setting).unwrap()])
            .unwrap_err()
            .to_string();
        assert!(error.contains(said), "{setting}: {error}");
    }
    for malformed in ["actor.epsilon", "Actor.Epsilon=1", "actor..epsilon=1", "=1"] {
        assert!(setting_override(malformed).is_err(), "{malformed}");
    }
}

/// A figure draws each task threshold as a dashed line, in view however
/// far the curves are from it, where every run of the figure has the same
/// one, and has one legend: each curve's label once, not once per panel.
#[test]
fn figures_draw_shared_thresholds_under_one_legend() {
    let specs = suite("smoke").unwrap().runs(2, Some(300));
    // Two reports, with these top-100 rewards.
    let result_with = |spec: &RunSpec, [first, last]: [f64; 2]| {
        let mut reports = vec![report(100, false, first), report(300, false, last)];
        for (report, tv) in reports.iter_mut().zip([0.5, 0.4]) {
            report.marginal_tv = Some(tv);
        }
        summarise(spec.clone(), reports).unwrap()
    };
    let results: Vec<RunResult> = specs.iter().map(|s| result_with(s, [0.1, 0.2])).collect();
    let metric = |title: &str| {
        plots::METRICS
            .iter()
            .find(|m| m.title.starts_with(title))
            .unwrap()
    };
    let curve = |name: &str| results.iter().filter(|r| r.spec.curve == name).collect();
    let curves: Vec<plots::Curve<'_>> = vec![
        (0, "fl_db".to_owned(), curve("fl_db")),
        (1, "tb".to_owned(), curve("tb")),
    ];
    assert!(curves.iter().all(|(_, _, runs)| runs.len() == 2));
    let shared = |title| plots::shared_threshold(&curves, metric(title));
    assert_eq!(shared("marginal TV"), Some(0.03));
    assert_eq!(shared("|log Z error|"), Some(0.3));
    assert!((shared("energy W1").unwrap() - 0.1).abs() < 0.001);
    let ceiling = 0.99 * 0.263281;
    assert!((shared("top-100 mean reward (every").unwrap() - ceiling).abs() < 1e-5);
    assert_eq!(shared("top-100 mean reward (this"), None);
    assert_eq!(shared("exact TV"), None);
    assert_eq!(shared("loss"), None);
    // A run of another task in the figure: no line rather than one that
    // is not that run's.
    let mut other = results[0].clone();
    other.quality.as_mut().unwrap().marginal_tv = Some(0.05);
    let mixed: Vec<plots::Curve<'_>> = vec![(0, "x".to_owned(), vec![&results[0], &other])];
    assert_eq!(plots::shared_threshold(&mixed, metric("marginal TV")), None);
    // The panels drawn (energy W1 and exact TV have no value here), and
    // those with a line.
    let drawn: Vec<(&str, bool)> = plots::panels(&curves, |r| r.step as f64)
        .iter()
        .map(|(metric, threshold)| (metric.title, threshold.is_some()))
        .collect();
    assert_eq!(
        drawn,
        [
            ("loss", false),
            ("|log Z error| (flow head or TB)", true),
            ("marginal TV", true),
            ("top-100 mean reward (this evaluation)", false),
            ("top-100 mean reward (every evaluation so far)", true),
            ("trained transitions per second", false),
            ("mean policy lag (steps)", false),
        ]
    );
    // The curves at 0.4-0.5 and the threshold at 0.03: the panel spans both.
    let bands: Vec<(usize, &String, plots::Band)> =
        vec![(0, &curves[0].1, vec![(1.0, 0.45, 0.4, 0.5)])];
    let (low, high, _) = plots::y_extent(&bands, Some(0.03)).unwrap();
    assert_eq!((low, high), (0.03, 0.5));
    assert_eq!(plots::y_extent(&[], None), None);
    // On a linear axis, a threshold near the curves is drawn; one far
    // from them (large sets' top-100 ceiling) would squash them.
    assert!(plots::within_reach(0.26, (0.05, 0.22, 0.05)));
    assert!(plots::within_reach(0.26, (0.2, 0.2, 0.2)));
    assert!(!plots::within_reach(
        891_000.0,
        (12_000.0, 86_000.0, 12_000.0)
    ));

    // The figure against steps, as SVG text.
    let steps_svg = |results: &[RunResult], failed: &[RunSpec]| {
        let out = std::env::temp_dir().join(format!("flgfn-figures-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let written = plots::render_groups(results, failed, &out).unwrap();
        let svg = written
            .iter()
            .find(|p| p.to_string_lossy().ends_with("-steps.svg"))
            .unwrap();
        let svg = std::fs::read_to_string(svg).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        svg
    };
    let svg = steps_svg(&results, &[]);
    let threshold_label = "quality threshold; 99 % of the exact top-100 ceiling";
    for label in ["fl_db", "tb", threshold_label] {
        let texts = svg.lines().filter(|line| line.trim() == label).count();
        assert_eq!(texts, 1, "{label}");
    }
    // The legend's sample is 2 dashes; the panels' lines are the rest.
    let dashes = svg.matches(r##"opacity="0.6" stroke="#000000""##).count();
    assert!(dashes > 2, "{dashes} dashes");

    // A curve whose every run failed has no line: its figure's title
    // names it (it was left out without a word).
    let finished: Vec<RunResult> = results
        .iter()
        .filter(|r| r.spec.curve != "tb")
        .cloned()
        .collect();
    let failed: Vec<RunSpec> = specs.iter().filter(|s| s.curve == "tb").cloned().collect();
    assert!(!failed.is_empty());
    let svg = steps_svg(&finished, &failed);
    assert!(svg.contains("every run failed: tb"), "{svg}");

    // Top-100 rewards far below their ceiling on a linear axis: the
    // ceiling is named under its panel, not drawn, and the legend names
    // no line that is not drawn.
    let far: Vec<RunResult> = specs.iter().map(|s| result_with(s, [1e-6, 2e-6])).collect();
    let svg = steps_svg(&far, &[]);
    assert!(svg.contains("above the panel"), "{svg}");
    assert!(
        svg.lines().any(|line| line.trim() == "quality threshold"),
        "{svg}"
    );
    assert!(!svg.contains("top-100 ceiling"), "{svg}");
}

/// The folders set aside for a run are its own only (not those of a run
/// whose name it begins, seed 10's for seed 1), newest first.
#[test]
fn a_runs_set_aside_folders_are_its_own_newest_first() {
    let paths = [
        "small_tb_seed1-100",
        "small_tb_seed1-100-2",
        "small_tb_seed1-100-10",
        "small_tb_seed1-99",
        "small_tb_seed10-200",
        "small_tb_seed1-",
        "small_tb_seed1-abc",
        "small_tb_seed1",
    ]
    .map(|name| std::path::Path::new("replaced").join(name));
    let found = set_aside_runs("small_tb_seed1", paths.to_vec());
    let names: Vec<_> = found
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "small_tb_seed1-100-10",
            "small_tb_seed1-100-2",
            "small_tb_seed1-100",
            "small_tb_seed1-99"
        ]
    );
}

/// Several metrics files are named by what tells their paths apart.
#[test]
fn compared_metrics_files_are_named_by_what_differs() {
    let labels = |paths: &[&str]| {
        let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
        super::distinguishing_labels(&paths)
    };
    assert_eq!(
        labels(&["runs/a/metrics.jsonl", "runs/b/metrics.jsonl"]).unwrap(),
        ["a", "b"]
    );
    assert_eq!(labels(&["x/fl.jsonl", "x/db.jsonl"]).unwrap(), ["fl", "db"]);
    assert_eq!(
        labels(&["one/m.jsonl", "two/deeper/m.jsonl"]).unwrap(),
        ["one", "two/deeper"]
    );
    assert_eq!(labels(&["a.jsonl", "b/a.jsonl"]).unwrap(), ["a", "b/a"]);
    let twice = labels(&["r/m.jsonl", "r/m.jsonl"]).unwrap_err().to_string();
    assert!(twice.contains("r/m.jsonl is given twice"), "{twice}");
    // One file by two spellings; an absolute path beside relative ones.
    let twice = labels(&["r/m.jsonl", "./r/m.jsonl"])
        .unwrap_err()
        .to_string();
    assert!(twice.contains("given twice"), "{twice}");
    let here = std::env::current_dir().unwrap().join("x/m.jsonl");
    assert_eq!(
        labels(&[here.to_str().unwrap(), "y/m.jsonl"]).unwrap(),
        ["x", "y"]
    );
}
