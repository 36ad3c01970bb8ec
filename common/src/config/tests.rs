use std::ffi::OsString;

use super::layers::flgfn_variables_of;
use super::*;

/// The README's configuration block, which claims to list every key
/// with its default.
fn readme_block() -> &'static str {
    let readme = include_str!("../../../README.md");
    let start = readme.find("```toml\n").expect("README has a toml block") + 8;
    let len = readme[start..].find("```").expect("the block ends");
    &readme[start..start + len]
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn a_task_key_refused_is_shown_at_its_own_line() {
    let error = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
    let shown_at = |message: &str, line: usize, quoted: &str| {
        assert!(
            message.contains(&format!("line {line}, column"))
                && message.contains(&format!("{line} | {quoted}")),
            "not at line {line} `{quoted}`: {message}"
        );
    };
    // A value of the wrong type, the task named or by default.
    let message = error("[task]\nname = \"set_generation\"\nset_size = \"x\"\n");
    shown_at(&message, 3, "set_size = \"x\"");
    assert!(message.contains("expected usize"), "{message}");
    let message = error("seed = 1\n\n[task]\nsize = 3\n");
    shown_at(&message, 4, "size = 3");
    // Another task's, after other sections; a negative side.
    let message = error(
        "[learner]\nthreads = 1\n[task]\n  name = \"lattice\"\nside = -3\n[actor]\nenvs = 4\n",
    );
    shown_at(&message, 5, "side = -3");
    // A misspelt key keeps its hint, and so does another task's key.
    let message = error("# job\n[task]\nname = \"set_generation\"\nsizee = \"small\"\n");
    shown_at(&message, 4, "sizee = (value not shown)");
    assert!(message.contains("did you mean `size`?"), "{message}");
    let message = error("[task]\nside = 3\n");
    shown_at(&message, 2, "side = (value not shown)");
    assert!(message.contains("keys of the lattice task"), "{message}");
    // A key that takes a name, given another type: its names.
    let message = error("[task]\nname = \"set_generation\"\nsize = 3\n");
    shown_at(&message, 3, "size = 3");
    assert!(
        message.contains("(`size` takes a name, in quotes: one of `small`, `medium`, `large`)"),
        "{message}"
    );
    // A name over two lines cannot be blanked: the parser's own error.
    let message = error("[task]\nname = \"\"\"\nlattice\"\"\"\nside = -3\n");
    assert!(
        message.contains("expected usize") && !message.contains("expected '='"),
        "{message}"
    );
    // An inline table cannot be blanked: the parser's own error stays.
    let message = error("task = { name = \"lattice\", side = -3 }\n");
    assert!(message.contains("expected usize"), "{message}");
}

/// TOML reports a key that takes one of a few names, given a number or
/// a boolean, as "wanted string or table": the names are added.
#[test]
fn a_name_key_given_another_type_lists_its_names() {
    let error = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
    let message = error("[objective]\nname = 3\n");
    assert!(message.contains("wanted string or table"), "{message}");
    assert!(
        message.contains(
            "(`name` takes a name, in quotes: one of `fl_db`, `fl_sub_tb`, `db`, `sub_tb`, `tb`)"
        ),
        "{message}"
    );
    let message = error("[learner]\nthreads = 1\ndevice = true\n");
    assert!(
        message.contains("(`device` takes a name, in quotes: "),
        "{message}"
    );
    let message = error("objective = { name = 1.5 }\n");
    assert!(
        message.contains("(`name` takes a name, in quotes: "),
        "{message}"
    );
    // Another type error is left as it is.
    let message = error("[learner]\nthreads = \"one\"\n");
    assert!(!message.contains("takes a name"), "{message}");
}

#[test]
fn another_tasks_keys_get_a_hint_naming_that_task() {
    let error = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
    // The default task given a lattice key.
    let message = error("[task]\nside = 3\n");
    assert!(message.contains("unknown field `side`"), "{message}");
    assert!(
        message.contains("keys of the lattice task, which `name = \"lattice\"` in [task] selects; this [task] is set_generation, the default"),
        "{message}"
    );
    // A misspelt name: serde names it, no hint about keys.
    let message = error("[task]\nname = \"latice\"\n");
    assert!(
        message.contains("latice") && !message.contains("keys of the"),
        "{message}"
    );
    // A named task given the other's keys.
    let message = error("[task]\nname = \"lattice\"\nuniverse = 30\n");
    assert!(
        message.contains("keys of the set_generation task")
            && message.contains("this [task] is lattice)"),
        "{message}"
    );
    // A key no task has, or an error outside [task]: no hint.
    for text in [
        "[task]\nsidee = 3\n",
        "[task]\nside = 3\nname = \"lattice\"\n[learner]\nthreds = 1\n",
    ] {
        let message = error(text);
        assert!(
            message.contains("unknown field") && !message.contains("keys of the"),
            "{message}"
        );
    }
}

#[test]
fn misspelt_keys_and_names_get_the_one_meant() {
    let refusal = |text: &str| Config::from_toml(text, "job.toml").unwrap_err().to_string();
    let meant = |text: &str| {
        let message = refusal(text);
        // On the first line, with the problem.
        let line = message
            .lines()
            .next()
            .and_then(|line| line.split_once("did you mean "))
            .and_then(|(_, meant)| Some(format!("{}?", meant.split_once('?')?.0)));
        (line, message)
    };
    for (text, expected) in [
        // One letter off; two for longer names; a section.
        ("[learner]\nthreds = 1\n", "`threads`?"),
        ("[actor]\nepsilom = 0.1\n", "`epsilon`?"),
        ("[learnr]\nthreads = 1\n", "`learner`?"),
        // Underscores and case.
        ("[learner]\nmaxsteps = 1\n", "`max_steps`?"),
        ("[learner]\nMax_Steps = 1\n", "`max_steps`?"),
        // A word of it.
        ("[task]\nuniverse_size = 30\n", "`universe`?"),
        // Names of tasks and objectives.
        ("[task]\nname = \"latice\"\n", "`lattice`?"),
        ("[objective]\nname = \"fl_subtb\"\n", "`fl_sub_tb`?"),
        // A word for one (`gpu` is one letter from `cpu`).
        ("[learner]\ndevice = \"gpu\"\n", "`cuda`?"),
    ] {
        let (line, message) = meant(text);
        assert_eq!(line.as_deref(), Some(expected), "{text}: {message}");
    }
    // A section given twice the brackets, or a value; an integer past
    // 64 bits.
    let message = refusal("[[learner]]\nthreads = 1\n");
    assert!(
        message.contains("write `[learner]`") && message.contains("`[[learner]]`"),
        "{message}"
    );
    let message = refusal("learner = 5\n");
    assert!(
        message.contains("write `[learner]`") && message.contains("a value of type integer"),
        "{message}"
    );
    let message = refusal("[learner]\nmax_steps = 99999999999999999999\n");
    assert!(
        message.contains("max_steps") && message.contains("at most 9223372036854775807"),
        "{message}"
    );
    // Each hint where its error is: a misspelt key keeps its guess
    // beside a misshapen section or another task's keys elsewhere.
    for text in [
        "[learner]\nthreds = 1\n[[tls]]\n",
        "[learner]\nthreds = 1\n[task]\nside = 3\n",
    ] {
        let (line, message) = meant(text);
        assert_eq!(line.as_deref(), Some("`threads`?"), "{text}: {message}");
        assert!(
            !message.contains("one section") && !message.contains("keys of the"),
            "{message}"
        );
    }
    // A type error outside [task] or away from a misshapen section
    // gets neither hint.
    for text in [
        "[learner]\nthreads = \"x\"\n[task]\nside = 3\n",
        "[learner]\nthreads = \"x\"\n[[tls]]\n",
    ] {
        let message = refusal(text);
        assert!(
            message.contains("threads")
                && !message.contains("one section")
                && !message.contains("keys of the"),
            "{text}: {message}"
        );
    }
    // Hints read the parser's message, not the file's line it quotes.
    let message = refusal("[learner]\nthreads = \"x\" # as i128\n");
    assert!(!message.contains("64-bit"), "{message}");
    // Nothing close: no guess.
    for text in [
        // (`s` is no word of `report_every_s`.)
        "[learner]\ns = 1\n",
        "[learner]\ncolour = 1\n",
        "[task]\nname = \"chess\"\n",
        // Another task's key gets that task's hint instead (`side` is
        // one letter from `size`).
        "[task]\nside = 3\n",
    ] {
        let (line, message) = meant(text);
        assert_eq!(line, None, "{text}: {message}");
    }
}

#[test]
fn values_toml_cannot_hold_are_refused_by_name() {
    // A flag can set them (--seed, --max-steps); a file or the local
    // actors' configuration could not carry them.
    let mut config = Config::default();
    config.learner.max_steps = u64::MAX;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("learner.max_steps"), "{error}");
    config.learner.max_steps = i64::MAX as u64;
    config.validate().unwrap();
    let text = config.to_toml();
    assert_eq!(Config::from_toml(&text, "test").unwrap(), config);
}

#[test]
fn combinations_that_could_never_train_are_refused_by_name() {
    // TB with every trajectory cut short would wait for data for ever.
    let mut config = Config::default();
    config.objective.name = ObjectiveName::Tb;
    config.actor.truncate_fraction = 1.0;
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("actor.truncate_fraction") && error.contains("tb"),
        "{error}"
    );
    config.actor.truncate_fraction = 0.5;
    config.validate().unwrap();
    // As does any objective told to drop truncated prefixes.
    config.objective.name = ObjectiveName::FlDb;
    config.objective.drop_truncated = true;
    config.actor.truncate_fraction = 1.0;
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("actor.truncate_fraction") && error.contains("objective.drop_truncated"),
        "{error}"
    );
    config.objective.drop_truncated = false;
    // Every other objective trains on prefixes, but none would reach a
    // terminal state, where the reward ties the flows to the target.
    for name in [
        ObjectiveName::Db,
        ObjectiveName::SubTb,
        ObjectiveName::FlDb,
        ObjectiveName::FlSubTb,
    ] {
        config.objective.name = name;
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("actor.truncate_fraction")
                && error.contains("no trajectory would reach a terminal state"),
            "{name:?}: {error}"
        );
    }
    // Nearly all is the user's choice.
    config.actor.truncate_fraction = 0.99;
    config.validate().unwrap();
    config.actor.truncate_fraction = 0.0;
    // gRPC cannot frame a message over 4 GiB.
    config.learner.max_message_bytes = u32::MAX as usize + 1;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("learner.max_message_bytes"), "{error}");
}

/// Weights travel in one message. Every process refuses a network
/// beyond any message (an actor too: one too wide to allocate would
/// abort its rollout thread); the learner also checks its own limit,
/// which an actor's configuration may set lower (it takes weights up to
/// the learner's).
#[test]
fn a_network_too_large_for_one_message_names_model_hidden() {
    let mut config = Config::default();
    let env = crate::tasks::build(&config.task).unwrap();
    let env = env.as_ref();
    // 2,048 x 2,048 is 4.2 M parameters: 8.4 MB as bf16, 16.8 MB as f32.
    config.model.hidden = vec![2048, 2048];
    let limit = 10 << 20;
    config
        .weights_fit(env, limit, "learner.max_message_bytes")
        .unwrap();
    config.learner.weight_encoding = WeightEncoding::F32;
    let error = config
        .weights_fit(env, limit, "learner.max_message_bytes")
        .unwrap_err()
        .to_string();
    assert!(error.contains("model.hidden"), "{error}");
    assert!(error.contains("learner.max_message_bytes"), "{error}");
    config.learner.max_message_bytes = limit;
    config.validate().unwrap();
    // 32,768 x 32,768 is 1.07 G parameters: 4.3 GB as f32, too large
    // for this f32 learner, but 2.1 GB as bf16, which another learner
    // may send: an actor's configuration says nothing of the learner's
    // encoding, so only that is refused everywhere.
    config.model.hidden = vec![32_768, 32_768];
    config.validate().unwrap();
    let error = config
        .weights_fit(env, u32::MAX as usize, "learner.max_message_bytes")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("learner.weight_encoding = \"bf16\""),
        "{error}"
    );
    config.learner.weight_encoding = WeightEncoding::Bf16;
    let error = config
        .weights_fit(env, 1 << 30, "learner.max_message_bytes")
        .unwrap_err()
        .to_string();
    assert!(!error.contains("weight_encoding"), "{error}");
    config.learner.weight_encoding = WeightEncoding::F32;
    // 49,152 x 49,152 is 2.4 G parameters: 4.8 GB even as bf16.
    config.model.hidden = vec![49_152, 49_152];
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("model.hidden") && error.contains("4 GiB"),
        "{error}"
    );
    config.model.hidden = vec![usize::MAX / 2, usize::MAX / 2];
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("model.hidden"), "{error}");
}

#[test]
fn environment_variables_set_keys_over_the_file_and_name_themselves_in_errors() {
    let dir = std::env::temp_dir().join(format!("flgfn-env-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        "seed = 3\n[learner]\nlisten = \"127.0.0.1:1\"\nmax_steps = 10\n",
    )
    .unwrap();
    let overrides = env_overrides(vars(&[
        ("FLGFN_LEARNER__LISTEN", "0.0.0.0:50051"),
        ("FLGFN_MODEL__HIDDEN", "[32, 16]"),
        ("FLGFN_ACTOR__LEARNER", "http://learner:50051"),
        ("FLGFN_SEED", "9"),
        ("FLGFN_TOKEN", "not a key"),
        ("FLGFN_LOG_FORMAT", "json"),
        ("HOME", "/root"),
    ]));
    let names: Vec<&str> = overrides.iter().map(|o| o.variable.as_str()).collect();
    assert_eq!(
        names,
        [
            "FLGFN_ACTOR__LEARNER",
            "FLGFN_LEARNER__LISTEN",
            "FLGFN_MODEL__HIDDEN",
            "FLGFN_SEED"
        ]
    );
    let config = Config::load_layered(Some(&file), &overrides).unwrap();
    assert_eq!(
        config.learner.listen, "0.0.0.0:50051",
        "environment over file"
    );
    assert_eq!(config.learner.max_steps, 10, "the file's other keys stay");
    assert_eq!(config.model.hidden, [32, 16]);
    assert_eq!(config.actor.learner, "http://learner:50051");
    assert_eq!(config.seed, 9);
    // No file: over the defaults.
    let config = Config::load_layered(None, &overrides[..1]).unwrap();
    assert_eq!(config.actor.learner, "http://learner:50051");
    assert_eq!(config.learner, Config::default().learner);

    let typo = env_overrides(vars(&[("FLGFN_LEARNER__LISTN", "x")]));
    let error = Config::load_layered(Some(&file), &typo)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("FLGFN_LEARNER__LISTN")
            && error.contains("listn")
            && error.contains("did you mean `listen`?"),
        "{error}"
    );
    let wrong_type = env_overrides(vars(&[("FLGFN_LEARNER__MAX_STEPS", "many")]));
    let error = Config::load_layered(None, &wrong_type)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("FLGFN_LEARNER__MAX_STEPS") && error.contains("max_steps"),
        "{error}"
    );
    let out_of_range = env_overrides(vars(&[("FLGFN_LEARNER__LEARNING_RATE", "-1")]));
    let error = Config::load_layered(None, &out_of_range)
        .unwrap_err()
        .to_string();
    assert!(error.contains("learner.learning_rate"), "{error}");
    // What SIGTERM asks, as the Kubernetes manifests set it.
    let restart = env_overrides(vars(&[("FLGFN_LEARNER__SIGTERM", "restart")]));
    let config = Config::load_layered(None, &restart).unwrap();
    assert_eq!(config.learner.sigterm, crate::signals::StopRequest::Restart);
    assert_eq!(
        Config::default().learner.sigterm,
        crate::signals::StopRequest::EndRun
    );
    let neither = env_overrides(vars(&[("FLGFN_LEARNER__SIGTERM", "reboot")]));
    let error = Config::load_layered(None, &neither)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("FLGFN_LEARNER__SIGTERM") && error.contains("end_run"),
        "{error}"
    );
    let not_a_section = env_overrides(vars(&[("FLGFN_SEED__X", "1")]));
    let error = Config::load_layered(None, &not_a_section)
        .unwrap_err()
        .to_string();
    assert!(error.contains("FLGFN_SEED__X"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A value refused by validation names the flag or variable that set
/// it (the flag when both did: it wins); one from the file, nothing.
#[test]
fn a_refused_value_names_the_flag_or_variable_that_set_it() {
    let mut config = Config::default();
    config.learner.threads = 0;
    let overrides = env_overrides(vars(&[("FLGFN_LEARNER__THREADS", "0")]));
    let by_variable = config
        .validate_layers(&overrides, &[])
        .unwrap_err()
        .to_string();
    assert!(
        by_variable.contains("`learner.threads`")
            && by_variable.ends_with("(set by FLGFN_LEARNER__THREADS)"),
        "{by_variable}"
    );
    let by_flag = config
        .validate_layers(&overrides, &[("--threads", "learner.threads")])
        .unwrap_err()
        .to_string();
    assert!(by_flag.ends_with("(set by --threads)"), "{by_flag}");
    let from_file = config.validate_layers(&[], &[]).unwrap_err().to_string();
    assert!(!from_file.contains("set by"), "{from_file}");
}

/// A pair of keys refused together names both values, the defaults, and
/// the layer that set either: the user may have set the other one.
#[test]
fn a_refused_pair_names_both_keys_and_the_layer_of_either() {
    let mut config = Config::default();
    config.learner.report_every_s = 0.1;
    let overrides = env_overrides(vars(&[("FLGFN_LEARNER__REPORT_EVERY_S", "0.1")]));
    let error = config
        .validate_layers(&overrides, &[])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("0.25")
            && error.contains("(0.1)")
            && error.ends_with("(learner.report_every_s set by FLGFN_LEARNER__REPORT_EVERY_S)"),
        "{error}"
    );
    let mut config = Config::default();
    config.actor.reconnect_initial_s = 10.0;
    let error = config
        .validate_layers(
            &[],
            &[("--reconnect-initial-s", "actor.reconnect_initial_s")],
        )
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("(10)")
            && error.ends_with("(actor.reconnect_initial_s set by --reconnect-initial-s)"),
        "{error}"
    );
    // A key a refusal only mentions (in its advice) is not blamed.
    let advice = ConfigError::invalid(
        "objective.name",
        "the checkpoint was trained with fl_db (give this run its own learner.checkpoint_dir (--checkpoint-dir))",
    );
    let error = blame_layer(
        advice,
        &[],
        &[("--checkpoint-dir", "learner.checkpoint_dir")],
    )
    .to_string();
    assert!(!error.contains("set by"), "{error}");
}

/// With several variables, an error names the one at fault, not all;
/// a file at fault keeps its line numbers whatever variables are set.
#[test]
fn a_layered_error_names_the_layer_at_fault() {
    let dir = std::env::temp_dir().join(format!("flgfn-blame-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[learner]\nmax_steps = 10\n").unwrap();
    let one_bad = env_overrides(vars(&[
        ("FLGFN_LEARNER__DEVICE", "cpu"),
        ("FLGFN_LEARNER__THREADS", ""),
        ("FLGFN_SEED", "4"),
    ]));
    let error = Config::load_layered(Some(&good), &one_bad)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("FLGFN_LEARNER__THREADS (applied to ")
            && error.contains("learner.threads"),
        "{error}"
    );
    assert!(
        !error.contains("DEVICE") && !error.contains("SEED"),
        "{error}"
    );

    // A variable that fails alone but is right with the others (a
    // lattice key, the task set by a variable) is not the one blamed.
    let lattice = env_overrides(vars(&[
        ("FLGFN_TASK__NAME", "lattice"),
        ("FLGFN_TASK__COUPLING", "1.0"),
        ("FLGFN_TASK__SIDE", "abc"),
    ]));
    let error = Config::load_layered(None, &lattice)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("FLGFN_TASK__SIDE (applied to the defaults): "),
        "{error}"
    );
    // Another task's key set by a variable is named as that task's, with
    // the variable that selects it, as it would be in a file; not taken
    // for a misspelling of the nearest key (`side` is not `size`).
    let side = env_overrides(vars(&[("FLGFN_TASK__SIDE", "4")]));
    let error = Config::load_layered(None, &side).unwrap_err().to_string();
    assert!(
        error.contains("keys of the lattice task, which FLGFN_TASK__NAME=lattice selects")
            && !error.contains("did you mean"),
        "{error}"
    );
    // A misspelt key still gets the spelling meant.
    let typo = env_overrides(vars(&[("FLGFN_TASK__SIZ", "small")]));
    let error = Config::load_layered(None, &typo).unwrap_err().to_string();
    assert!(error.contains("did you mean `size`?"), "{error}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "seed = 1\n[learner]\nthreads = \"x\"\n").unwrap();
    let fine = env_overrides(vars(&[("FLGFN_LEARNER__DEVICE", "cpu")]));
    let error = Config::load_layered(Some(&bad), &fine)
        .unwrap_err()
        .to_string();
    assert!(error.contains("line 3"), "{error}");
    assert!(!error.contains("FLGFN_"), "{error}");
    // A variable that mends the file: no error at all.
    let mends = env_overrides(vars(&[("FLGFN_LEARNER__THREADS", "2")]));
    let config = Config::load_layered(Some(&bad), &mends).unwrap();
    assert_eq!(config.learner.threads, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_readme_lists_every_key_with_its_default() {
    let documented = Config::from_toml(readme_block(), "README.md").unwrap();
    assert_eq!(
        documented,
        Config::default(),
        "a README value differs from the code"
    );
    let documented: toml::Table = toml::from_str(readme_block()).unwrap();
    let actual: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
    for (section, value) in &actual {
        let Some(table) = value.as_table() else {
            assert!(documented.contains_key(section), "README lacks `{section}`");
            continue;
        };
        for key in table.keys() {
            assert!(
                documented[section].as_table().unwrap().contains_key(key),
                "README lacks `{section}.{key}`"
            );
        }
    }
}

/// The other tasks' keys, commented out in the block under `[task]`
/// from each `# name = ...` line to the next blank line, are theirs with
/// their defaults, every one.
#[test]
fn the_readme_lists_every_tasks_keys_with_their_defaults() {
    let block = readme_block();
    let mut listed = 0;
    for task in TaskConfig::every_task() {
        if task == TaskConfig::default() {
            continue;
        }
        let start = block
            .find(&format!("# name = \"{}\"", task.name()))
            .unwrap_or_else(|| panic!("README lacks the {} task's keys", task.name()));
        let lines: Vec<&str> = block[start..]
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .collect();
        let text = format!("[task]\n{}\n", lines.join("\n"));
        let documented = Config::from_toml(&text, "README.md").unwrap();
        assert_eq!(
            documented.task, task,
            "a README value differs from the code"
        );
        let documented: toml::Table = toml::from_str(&text).unwrap();
        let actual = toml::Value::try_from(&task).unwrap();
        for key in actual.as_table().unwrap().keys() {
            assert!(
                documented["task"].as_table().unwrap().contains_key(key),
                "README lacks the {} task's `{key}`",
                task.name()
            );
        }
        listed += 1;
    }
    assert!(listed > 0);
}

#[test]
fn environments_per_actor_default_to_a_fixed_number_of_transitions() {
    // The default task: 20 transitions, ~3.5 KB per trajectory.
    assert_eq!(auto_envs(20, 3_500), 256);
    assert_eq!(auto_envs(80, 14_000), 64);
    // A 16x16 lattice: 20 by transitions (186 MB for 256).
    assert_eq!(auto_envs(256, 728_000), 20);
    // A set task of 4,096 elements: ~520 KB per trajectory of 20.
    assert_eq!(auto_envs(20, 520_000), 32, "held within 16 MB");
    assert_eq!(auto_envs(4096, 1_000), 16, "never fewer than 16");
    assert_eq!(auto_envs(1, 100), 256, "never more than 256");
    // ~4.9 MB per trajectory (4,096 elements, sets of 200): 16 would
    // be a 79 MB chunk, above the default 64 MiB per session.
    assert_eq!(auto_envs(200, 4_940_000), 3, "the byte cap wins over 16");
    assert_eq!(auto_envs(20, 1 << 30), 1, "at least one");
    let default_task = crate::tasks::build(&TaskConfig::default()).unwrap();
    let mut config = Config::default();
    assert_eq!(config.envs_for(default_task.as_ref()), 256);
    config.actor.envs = 7;
    assert_eq!(
        config.envs_for(default_task.as_ref()),
        7,
        "a number given is kept"
    );
}

/// `actor.envs = 0` stays within what a learner started from the same
/// file accepts: its chunks are never refused at the handshake for a
/// limit the file itself sets.
#[test]
fn environments_per_actor_default_within_the_learner_limits_of_the_file() {
    let task = crate::tasks::build(&TaskConfig::default()).unwrap();
    let envs = |change: &dyn Fn(&mut LearnerConfig)| {
        let mut config = Config::default();
        change(&mut config.learner);
        config.validate().unwrap();
        config.envs_for(task.as_ref())
    };
    assert_eq!(envs(&|l| l.max_chunk_trajectories = 128), 128);
    // A credit room of 2,560 transitions: 128 trajectories of 20.
    assert_eq!(envs(&|l| l.max_in_flight_batches = 1), 128);
    // A chunk of 256 replayed holds ~0.9 MB: 100 KB hold 28.
    let session = envs(&|l| l.max_session_bytes = 100_000);
    assert!((1..256).contains(&session), "{session}");
    let one = crate::trajectory::ReplayedTrajectory::max_held_bytes(task.as_ref(), 20);
    assert!(session * one <= 100_000, "{session} x {one}");
    // (The decode limit, at least 1 MiB, binds only for trajectories of
    // thousands of steps, whose replayed size the session limit caps
    // first.)
    // A 16x16 lattice with 8 MiB per session: a chunk of 20 would take
    // ~14.6 MB.
    let mut config = Config {
        task: TaskConfig::Lattice(crate::tasks::lattice::LatticeConfig {
            side: 16,
            ..Default::default()
        }),
        ..Config::default()
    };
    config.learner.max_session_bytes = 8 << 20;
    let lattice = crate::tasks::build(&config.task).unwrap();
    let chunk = config.envs_for(lattice.as_ref());
    let one = crate::trajectory::ReplayedTrajectory::max_held_bytes(
        lattice.as_ref(),
        lattice.max_trajectory_len(),
    );
    assert!(chunk >= 1 && chunk * one <= 8 << 20, "{chunk} x {one}");
}

#[test]
fn printed_configuration_reads_back_the_same() {
    let mut config = Config::default();
    config.actor.envs = 3;
    config.learner.device = DeviceConfig::Cpu;
    assert_eq!(
        Config::from_toml(&config.to_toml(), "printed").unwrap(),
        config
    );
}

#[test]
fn empty_file_gives_the_defaults() {
    let config = Config::from_toml("", "test").unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn stuck_after_s_is_zero_or_seconds_up_to_a_day() {
    for good in ["0", "1", "600.0", "86400"] {
        let toml = format!("[learner]\nstuck_after_s = {good}\n");
        assert!(Config::from_toml(&toml, "t").is_ok(), "{good}");
    }
    for bad in ["0.5", "-1", "1e9", "nan", "inf"] {
        let toml = format!("[learner]\nstuck_after_s = {bad}\n");
        let error = Config::from_toml(&toml, "t").unwrap_err().to_string();
        assert!(
            error.contains("learner.stuck_after_s") && error.contains("0 (never)"),
            "{bad}: {error}"
        );
    }
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let err = Config::from_toml("[learner]\nlearning_rat = 0.1\n", "test").unwrap_err();
    assert!(err.to_string().contains("learning_rat"), "{err}");
    // What, where and the key meant, on the first line; the file's line
    // below it.
    let message = err.to_string();
    let mut lines = message.lines();
    assert_eq!(
        lines.next(),
        Some("test: line 2, column 1: unknown field `learning_rat`; did you mean `learning_rate`?"),
        "{message}"
    );
    // (Its value left out: an unknown key's says nothing of the mistake.)
    assert!(
        lines.any(|line| line == "2 | learning_rat = (value not shown)"),
        "{message}"
    );
    // A secret put where no key takes it stays out of the message.
    let err = Config::from_toml("[auth]\ntoken = \"a-secret-token-0123456789\"\n", "test")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `token`"), "{err}");
    assert!(!err.contains("a-secret-token"), "{err}");
    // Nor one given as a section, or to a key of another type there,
    // however quoted, escaped or commented.
    for text in [
        "auth = \"a-secret-token-0123456789\"\n",
        "auth = 'a-secret-token-0123456789'\n",
        "[auth]\nallow_unauthenticated = \"a-secret-token-0123456789\"\n",
        "[auth]\nallow_unauthenticated = 'a-secret-token-0123456789'\n",
        "[auth]\nallow_unauthenticated = \"a-secret-token-0123456789\" # new\n",
        "[auth]\nallow_unauthenticated = \"a-secret\\u002Dtoken-0123456789\"\n",
        "[auth]\nallow_unauthenticated = 1234567890123456789\n",
        "auth = { allow_unauthenticated = \"a-secret-token-0123456789\" }\n",
        "auth.allow_unauthenticated = \"a-secret-token-0123456789\"\n",
        "[auth]\n\"allow_unauthenticated\" = \"a-secret\\u002Dtoken-0123456789\"\n",
    ] {
        let err = Config::from_toml(text, "test").unwrap_err().to_string();
        assert!(
            err.contains("invalid type") || err.contains("unknown field"),
            "{err}"
        );
        assert!(
            !err.contains("a-secret") && !err.contains("1234567890123456789"),
            "{text}: {err}"
        );
    }
    // The file's other values in those sections are no secret, and stay
    // out of no message: a wrong variable elsewhere names its key whole.
    let path = std::env::temp_dir().join(format!("flgfn-secret-place-{}.toml", std::process::id()));
    std::fs::write(&path, "[tls]\ndomain = \"learner\"\n").unwrap();
    let variable = env_overrides(vars(&[("FLGFN_LEARNER__THREADS", "abc")]));
    let err = Config::load_layered(Some(&path), &variable)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("learner.threads") || err.contains("`threads`"),
        "{err}"
    );
    assert!(!err.contains("(value not shown)"), "{err}");
    std::fs::remove_file(&path).unwrap();
    // A place keeps its numbers: the value 100 on line 100.
    let text = format!("[auth]\n{}allow_unauthenticated = 100\n", "#\n".repeat(98));
    let err = Config::from_toml(&text, "test").unwrap_err().to_string();
    assert!(err.contains("line 100, column"), "{err}");
    // From a variable too, quoted or not.
    for value in ["a-secret-token-0123456789", "'a-secret-token-0123456789'"] {
        let variable = env_overrides(vars(&[("FLGFN_AUTH__ALLOW_UNAUTHENTICATED", value)]));
        let err = Config::load_layered(None, &variable)
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLGFN_AUTH__ALLOW_UNAUTHENTICATED"), "{err}");
        assert!(!err.contains("a-secret"), "{value}: {err}");
    }
    // A wrong variable elsewhere names its key whole, whatever the
    // [tls] variables say.
    let variables = env_overrides(vars(&[
        ("FLGFN_TLS__DOMAIN", "learner"),
        ("FLGFN_LEARNER__THREADS", "abc"),
    ]));
    let err = Config::load_layered(None, &variables)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("learner.threads") && !err.contains("(value not shown)"),
        "{err}"
    );
    let err = Config::from_toml(
        "[task]\nname = \"set_generation\"\nsizes = \"small\"\n",
        "t",
    )
    .unwrap_err();
    assert!(err.to_string().contains("sizes"), "{err}");
    let err = Config::from_toml("[task]\nname = \"chess\"\n", "t").unwrap_err();
    assert!(err.to_string().contains("chess"), "{err}");
}

#[test]
fn out_of_range_values_name_the_field() {
    let err = Config::from_toml("[actor]\nepsilon = 1.5\n", "t").unwrap_err();
    assert!(err.to_string().contains("actor.epsilon"), "{err}");
    let err = Config::from_toml("[learner]\nlearning_rate = -1.0\n", "t").unwrap_err();
    assert!(err.to_string().contains("learner.learning_rate"), "{err}");
    let err = Config::from_toml("[learner]\nbatch_transitions = 1099511627776\n", "t").unwrap_err();
    assert!(
        err.to_string().contains("learner.batch_transitions"),
        "{err}"
    );
    let err = Config::from_toml("[learner]\nfirst_report_s = 9.0\n", "t").unwrap_err();
    assert!(err.to_string().contains("learner.first_report_s"), "{err}");
    // A seed a flag can give but TOML (a file, FLGFN_SEED) cannot hold.
    let huge_seed = Config {
        seed: u64::MAX,
        ..Config::default()
    };
    let err = huge_seed.validate().unwrap_err();
    assert!(err.to_string().contains("`seed`"), "{err}");
    for stall in ["0.0", "-1.0", "1e-9", "1e30", "nan"] {
        let toml = format!("[learner]\nstall_timeout_s = {stall}\n");
        let err = Config::from_toml(&toml, "t").unwrap_err();
        assert!(
            err.to_string().contains("learner.stall_timeout_s"),
            "{stall}: {err}"
        );
    }
    for idle in ["0.5", "1e30", "nan"] {
        let toml = format!("[learner]\nidle_connection_s = {idle}\n");
        let err = Config::from_toml(&toml, "t").unwrap_err();
        assert!(
            err.to_string().contains("learner.idle_connection_s"),
            "{idle}: {err}"
        );
    }
    let err = Config::from_toml("[model]\nhidden = []\n", "t").unwrap_err();
    assert!(err.to_string().contains("model.hidden"), "{err}");
    // Both huge: the room's ceiling would overflow.
    let huge = "[learner]\nmax_policy_lag = 4611686018427387904\nmax_in_flight_batches = 4611686018427387904\n";
    let err = Config::from_toml(huge, "t").unwrap_err();
    assert!(
        err.to_string().contains("learner.max_in_flight_batches"),
        "{err}"
    );
    // A lag bound below the default room: the error says which default.
    let err = Config::from_toml("[learner]\nmax_policy_lag = 16\n", "t").unwrap_err();
    assert!(
        err.to_string().contains("learner.max_in_flight_batches")
            && err.to_string().contains("its default, 48"),
        "{err}"
    );
    // The room in batches plus how old the actors' weights may be,
    // past the bound: accepted, with a warning saying what to change.
    let warned = |text: &str| {
        Config::from_toml(text, "t")
            .unwrap()
            .learner
            .lag_bound_warning()
    };
    assert_eq!(warned("[learner]\nmax_policy_lag = 50\n"), None);
    let warning = warned("[learner]\nmax_policy_lag = 49\n").unwrap();
    assert!(
        warning.contains("max_in_flight_batches (48) + publish_every (1) + weights_refresh_steps (1) is more than max_policy_lag (49)"),
        "{warning}"
    );
    assert!(warned("[learner]\nweights_refresh_steps = 16\n").is_some());
}

#[test]
fn a_task_section_without_a_name_changes_the_default_task() {
    let set_size = |config: &Config| match &config.task {
        TaskConfig::SetGeneration(set) => set.set_size,
        other => panic!("the default task, got {other:?}"),
    };
    let config = Config::from_toml("[task]\nset_size = 3\n", "t").unwrap();
    assert_eq!(set_size(&config), Some(3));
    let overrides = env_overrides(vars(&[("FLGFN_TASK__SET_SIZE", "3")]));
    let config = Config::load_layered(None, &overrides).unwrap();
    assert_eq!(set_size(&config), Some(3));
    // Another task's key on the default task is an error naming it.
    let error = Config::from_toml("[task]\nside = 4\n", "t")
        .unwrap_err()
        .to_string();
    assert!(error.contains("side"), "{error}");
    // A named task is left as it is.
    let config = Config::from_toml("[task]\nname = \"lattice\"\n", "t").unwrap();
    assert!(matches!(config.task, TaskConfig::Lattice(_)), "{config:?}");
}

#[test]
fn an_unusable_learner_url_or_an_endless_wait_is_refused_by_name() {
    for (toml, field, says) in [
        (
            "[actor]\nlearner = \"10.0.0.5:50051\"\n",
            "actor.learner",
            "http://",
        ),
        (
            "[actor]\nlearner = \"http://\"\n",
            "actor.learner",
            "no host",
        ),
        (
            "[actor]\nlearner = \"https://:50051\"\n",
            "actor.learner",
            "no host",
        ),
        (
            "[actor]\nlearner = \"http://127.0.0.1:99999\"\n",
            "actor.learner",
            "\"99999\" is no port",
        ),
        (
            "[actor]\nlearner = \"http://learner:0\"\n",
            "actor.learner",
            "is no port",
        ),
        (
            "[actor]\nlearner = \"http://learner:\"\n",
            "actor.learner",
            "is no port",
        ),
        (
            "[actor]\nlearner = \"http://127.0.0.1 :50051\"\n",
            "actor.learner",
            "holds ' '",
        ),
        (
            "[actor]\nkeepalive_s = 1e20\n",
            "actor.keepalive_s",
            "a day",
        ),
        ("[actor]\nkeepalive_s = 0.001\n", "actor.keepalive_s", "1"),
        ("[learner]\nkeepalive_s = 0.5\n", "learner.keepalive_s", "1"),
        (
            "[learner]\nunfinished_exit_status = 1\n",
            "learner.unfinished_exit_status",
            "must be 0 or 3 to 125",
        ),
        (
            "[learner]\nunfinished_exit_status = 130\n",
            "learner.unfinished_exit_status",
            "got 130",
        ),
        (
            "[learner]\nbatch_transitions = 5000\n",
            "learner.max_batch_transitions",
            "2560 is less than learner.batch_transitions (5000): a batch starts at batch_transitions and grows up to max_batch_transitions (by default 2560)",
        ),
        (
            "[learner]\nkeepalive_s = 1e20\n",
            "learner.keepalive_s",
            "a day",
        ),
        (
            "[actor]\nprogress_log_s = 0.5\n",
            "actor.progress_log_s",
            "1",
        ),
        (
            "[actor]\nreconnect_initial_s = 1e-12\n",
            "actor.reconnect_initial_s",
            "0.01",
        ),
        (
            "[actor]\nreconnect_max_s = 1e19\n",
            "actor.reconnect_max_s",
            "a day",
        ),
    ] {
        let error = Config::from_toml(toml, "t").unwrap_err().to_string();
        assert!(
            error.contains(field) && error.contains(says),
            "{toml}: {error}"
        );
    }
    for url in [
        "http://learner:50051",
        "https://10.0.0.5:443/",
        "http://[::1]:50051",
        "http://[::1]",
        "https://learner.example.org",
        "https://ingress.example.org/flgfn",
        "http://user:secret@learner:50051",
    ] {
        let toml = format!("[actor]\nlearner = \"{url}\"\n");
        assert!(Config::from_toml(&toml, "t").is_ok(), "{url}");
    }
}

#[test]
fn a_blank_checkpoint_folder_is_refused() {
    let error = Config::from_toml("[learner]\ncheckpoint_dir = \"   \"\n", "t")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("learner.checkpoint_dir") && error.contains("blank"),
        "{error}"
    );
    assert!(Config::from_toml("[learner]\ncheckpoint_dir = \"\"\n", "t").is_ok());
}

#[test]
fn settings_that_would_stall_training_are_refused_by_name() {
    let error = Config::from_toml("[learner]\npublish_every = 100\n", "t")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("learner.publish_every") && error.contains("max_policy_lag (64)"),
        "{error}"
    );
    let error = Config::from_toml(
        "[learner]\nweights_refresh_steps = 40\npublish_every = 30\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("learner.weights_refresh_steps"), "{error}");
    let error = Config::from_toml("[launch]\nactors = 0\n", "t")
        .unwrap_err()
        .to_string();
    assert!(error.contains("launch.actors"), "{error}");
    // The listen address: host:port, named when it is not.
    for listen in [
        "0.0.0.0:50051",
        "[::]:50051",
        "localhost:1",
        "learner.internal:0",
    ] {
        let toml = format!("[learner]\nlisten = \"{listen}\"\n");
        assert!(Config::from_toml(&toml, "t").is_ok(), "{listen}");
    }
    for (listen, why) in [
        ("50051", "is not host:port"),
        ("[::1]", "is not host:port"),
        (":50051", "has no host"),
        ("::1:50051", "without brackets"),
        ("localhost:http", "no port number"),
        ("localhost:70000", "no port number"),
    ] {
        let toml = format!("[learner]\nlisten = \"{listen}\"\n");
        let error = Config::from_toml(&toml, "t").unwrap_err().to_string();
        assert!(
            error.contains("learner.listen") && error.contains(why),
            "{listen}: {error}"
        );
    }
    for (toml, field) in [
        ("[learner]\nthreads = 1000000\n", "learner.threads"),
        (
            "[learner]\neval_samples = 1000000000\n",
            "learner.eval_samples",
        ),
        ("[actor]\nthreads = 100000\n", "actor.threads"),
        ("[actor]\nenvs = 5000000000\n", "actor.envs"),
    ] {
        let error = Config::from_toml(toml, "t").unwrap_err().to_string();
        assert!(
            error.contains(field) && error.contains("more than"),
            "{error}"
        );
    }
}

#[test]
fn a_variable_that_reads_as_a_number_may_set_a_text_key() {
    let overrides = env_overrides(vars(&[
        ("FLGFN_LEARNER__CHECKPOINT_DIR", "123456"),
        ("FLGFN_LEARNER__MAX_STEPS", "77"),
    ]));
    let config = Config::load_layered(None, &overrides).unwrap();
    assert_eq!(config.learner.checkpoint_dir, "123456");
    assert_eq!(config.learner.max_steps, 77);
    // Two of them at once.
    let overrides = env_overrides(vars(&[
        ("FLGFN_LEARNER__CHECKPOINT_DIR", "123456"),
        ("FLGFN_AUTH__TOKEN_FILE", "2024"),
        ("FLGFN_LEARNER__MAX_STEPS", "77"),
    ]));
    let config = Config::load_layered(None, &overrides).unwrap();
    assert_eq!(config.learner.checkpoint_dir, "123456");
    assert_eq!(config.auth.token_file, "2024");
    assert_eq!(config.learner.max_steps, 77);
    // However many numbers for number keys come with it (nine here,
    // ahead of it by name), a text key's number is read as text.
    let overrides = env_overrides(vars(&[
        ("FLGFN_ACTOR__ENVS", "32"),
        ("FLGFN_ACTOR__EPSILON", "0.1"),
        ("FLGFN_ACTOR__KEEPALIVE_S", "11"),
        ("FLGFN_ACTOR__PROGRESS_LOG_S", "61"),
        ("FLGFN_ACTOR__RECONNECT_ATTEMPTS", "9"),
        ("FLGFN_ACTOR__RECONNECT_INITIAL_S", "0.3"),
        ("FLGFN_ACTOR__RECONNECT_MAX_S", "6"),
        ("FLGFN_ACTOR__THREADS", "2"),
        ("FLGFN_ACTOR__TRUNCATE_CAP", "4"),
        ("FLGFN_AUTH__TOKEN_FILE", "2024"),
    ]));
    let config = Config::load_layered(None, &overrides).unwrap();
    assert_eq!(config.auth.token_file, "2024");
    assert_eq!((config.actor.envs, config.actor.truncate_cap), (32, 4));
    // A number for a number key is still refused when it is text.
    let overrides = env_overrides(vars(&[("FLGFN_LEARNER__MAX_STEPS", "many")]));
    let error = Config::load_layered(None, &overrides)
        .unwrap_err()
        .to_string();
    assert!(error.contains("FLGFN_LEARNER__MAX_STEPS"), "{error}");
}

#[test]
fn single_underscore_section_variables_are_named_as_misspelt() {
    let names = [
        "FLGFN_LEARNER_THREADS",
        "FLGFN_ACTOR_ENVS",
        "FLGFN_LEARNER__THREADS",
        "FLGFN_TOKEN",
        "FLGFN_HEALTH_ADDRESS",
        "FLGFN_ACTOR_BIN",
        "FLGFN_TASKS",
        "PATH",
    ]
    .map(str::to_owned);
    let named = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|&(a, b)| (a.to_owned(), b.to_owned()))
            .collect()
    };
    assert_eq!(
        misspelt_variables(names),
        named(&[
            ("FLGFN_ACTOR_ENVS", "FLGFN_ACTOR__ENVS"),
            ("FLGFN_LEARNER_THREADS", "FLGFN_LEARNER__THREADS")
        ])
    );
    for (name, meant) in [
        ("FLGFN_AUTH_TOKEN_FILE", "FLGFN_AUTH__TOKEN_FILE"),
        ("FLGFN_TLS_CA_FILE", "FLGFN_TLS__CA_FILE"),
        // A key without its section, or a section alone.
        ("FLGFN_LISTEN", "FLGFN_LEARNER__LISTEN"),
        ("FLGFN_MAX_STEPS", "FLGFN_LEARNER__MAX_STEPS"),
        (
            "FLGFN_THREADS",
            "FLGFN_ACTOR__THREADS or FLGFN_LEARNER__THREADS",
        ),
        ("FLGFN_TASK", "FLGFN_TASK__<KEY>"),
        // Every task's keys, set or not in the defaults.
        ("FLGFN_TASK_SET_SIZE", "FLGFN_TASK__SET_SIZE"),
        ("FLGFN_SIDE", "FLGFN_TASK__SIDE"),
        (
            "FLGFN_LEARNER",
            "FLGFN_ACTOR__LEARNER or FLGFN_LEARNER__<KEY>",
        ),
        // Misspelt variables of their own, and keys without underscores.
        ("FLGFN_TOKN", "FLGFN_TOKEN"),
        ("FLGFN_SEDD", "FLGFN_SEED"),
        ("FLGFN_seed", "FLGFN_SEED"),
        ("FLGFN_Token", "FLGFN_TOKEN"),
        ("FLGFN_SEEDS", "FLGFN_SEED"),
        ("FLGFN_LOG_FROMAT", "FLGFN_LOG_FORMAT"),
        ("FLGFN_RESUME_CHANGE", "FLGFN_RESUME_CHANGED"),
        ("FLGFN_HEALTH_ADRESS", "FLGFN_HEALTH_ADDRESS"),
        ("FLGFN_MAXSTEPS", "FLGFN_LEARNER__MAX_STEPS"),
    ] {
        assert_eq!(meant_variable(name).as_deref(), Some(meant), "{name}");
    }
    // Variables of their own, and the scripts', name no key.
    for name in [
        "FLGFN_ACTOR_BIN",
        "FLGFN_SEED",
        "FLGFN_TOKEN",
        "FLGFN_CONFIG",
        "FLGFN_LOG_FORMAT",
        "FLGFN_RESUME_CHANGED",
        "FLGFN_PORT",
        "FLGFN_JOB",
        "FLGFN_BUILD_COMMIT",
        "FLGFN_CACHE_DIR",
    ] {
        assert_eq!(meant_variable(name), None, "{name}");
    }
}

/// A variable that is not UTF-8 is skipped unless it is an `FLGFN_`
/// configuration key, which is an error naming it; a path in
/// `FLGFN_CONFIG` may be in any encoding.
#[cfg(unix)]
#[test]
fn only_flgfn_variables_must_be_utf8() {
    use std::os::unix::ffi::OsStringExt;
    let os = |text: &str| OsString::from(text);
    let latin1 = || OsString::from_vec(b"caf\xe9".to_vec());
    let found = flgfn_variables_of([
        (os("LC_NAME"), latin1()),
        (OsString::from_vec(b"NAME_\xe9".to_vec()), os("x")),
        (os("FLGFN_SEED"), os("7")),
        (os("FLGFN_CONFIG"), latin1()),
        (os("PATH"), os("/bin")),
    ])
    .unwrap();
    assert_eq!(found, vars(&[("FLGFN_SEED", "7")]));
    for key in [
        "FLGFN_SEED",
        "FLGFN_TASK__SET_SIZE",
        "FLGFN_LEARNER_CHECKPOINT_DIR",
    ] {
        let error = flgfn_variables_of([(os(key), latin1())])
            .unwrap_err()
            .to_string();
        assert!(error.contains(key), "{error}");
        assert!(error.contains("not UTF-8"), "{error}");
    }
    let error = flgfn_variables_of([(OsString::from_vec(b"FLGFN_\xe9".to_vec()), os("1"))])
        .unwrap_err()
        .to_string();
    assert!(error.contains("FLGFN_"), "{error}");
    assert!(error.contains("name is not UTF-8"), "{error}");
}

#[test]
fn a_file_refused_for_a_value_loads_unvalidated_for_flags_to_correct() {
    let path = std::env::temp_dir().join(format!("flgfn-flag-fix-{}.toml", std::process::id()));
    std::fs::write(&path, "[actor]\nlearner = \"learner:50051\"\n").unwrap();
    let error = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(
        error.contains("actor.learner") && error.contains("http://"),
        "{error}"
    );
    let mut config = Config::load_unvalidated(Some(&path)).unwrap();
    config.actor.learner = "http://learner:50051".to_owned();
    config.validate().unwrap();
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_file_overrides_only_what_it_names() {
    let config = Config::from_toml(
        "seed = 7\n[task]\nname = \"set_generation\"\nsize = \"medium\"\n[launch]\nactors = 5\n",
        "t",
    )
    .unwrap();
    assert_eq!(config.seed, 7);
    assert_eq!(config.launch.actors, 5);
    assert_eq!(config.learner, LearnerConfig::default());
    let TaskConfig::SetGeneration(set) = &config.task else {
        panic!("a set task")
    };
    assert_eq!(set.size, crate::tasks::set_generation::SetSize::Medium);
}
