//! Resuming a run from its checkpoint folder: the folder opened (locked,
//! or emptied for `--fresh`), the newest checkpoint's weights restored once
//! it is found to be this run's, and the version numbering continued.
//!
//! What a checkpoint holds, and how it is written and read, is
//! [`crate::checkpoint`]'s; this module decides whether and how a run takes
//! it up.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flgfn_common::config::{Config, ConfigError};
use flgfn_common::policy::{ModelSpec, Policy};
use tracing::{info, warn};

use crate::checkpoint::{self, Checkpoint, FolderLock};
use crate::{BUILD, LearnerError};

/// The checkpoint folder (`learner.checkpoint_dir`, None when checkpoints
/// are off), opened for this run: its lock, held until the trainer ends,
/// and the newest intact checkpoint to resume from (none with `fresh`,
/// which deletes them). Off the async workers: checkpoints may be
/// gigabytes, and the server answers probes meanwhile.
pub async fn open_folder(
    dir: Option<PathBuf>,
    fresh: bool,
) -> Result<(Option<FolderLock>, Option<Checkpoint>), LearnerError> {
    let Some(dir) = dir else {
        if fresh {
            // Not an error: a script may pass --fresh to every run.
            warn!(
                "--fresh has nothing to delete: checkpoints are off (learner.checkpoint_dir is empty)"
            );
        }
        return Ok((None, None));
    };
    tokio::task::spawn_blocking(move || -> Result<_, LearnerError> {
        let lock = checkpoint::lock(&dir)?;
        if fresh {
            checkpoint::clear(&dir)?;
            return Ok((Some(lock), None));
        }
        checkpoint::remove_unfinished_writes(&dir);
        Ok((Some(lock), checkpoint::load_latest(&dir)?))
    })
    .await
    .map_err(|e| LearnerError::Checkpoint(format!("checkpoint loader: {e}")))?
}

/// Loads `checkpoint`'s weights into `policy` where its task and model are
/// this run's, then refuses it where its configuration shows another run
/// (see `check_resumed_config`; the caller drops `policy` then), sets aside
/// the damaged checkpoints newer than it (this run continues from here,
/// and they must not outrank what it writes), and logs the resume.
pub fn restore(
    checkpoint: &Checkpoint,
    policy: &mut Policy,
    task: &str,
    model: &ModelSpec,
    config: &Config,
    resume_changed: bool,
) -> Result<(), LearnerError> {
    let state = &checkpoint.state;
    checkpoint
        .load_policy(policy, task, &model.to_string())
        .map_err(|refused| match refused {
            checkpoint::PolicyRefused::AnotherRun(why) => LearnerError::Checkpoint(format!(
                "{why} (another run's folder? Give this run its own learner.checkpoint_dir (--checkpoint-dir); --fresh deletes its checkpoints and starts over)"
            )),
            checkpoint::PolicyRefused::Unusable(why) => checkpoint.unusable(why),
        })?;
    check_resumed_config(&state.config, config, resume_changed, &checkpoint.path)?;
    // Its counters and figures too, before anything in the folder or the
    // metrics file is changed for it (intact, its checksum held, but not
    // usable: an older one may be).
    state.check().map_err(|e| checkpoint.unusable(e))?;
    checkpoint::set_aside(&checkpoint.damaged_newer)?;
    info!(
        path = %checkpoint.path.display(),
        step = state.step,
        version = state.version,
        // Empty in checkpoints written before builds were recorded.
        written_by = %state.build,
        build = BUILD,
        "resuming from a checkpoint"
    );
    Ok(())
}

/// The version this run's weights start at. Versions continue above any
/// published before, even by a learner killed after its last checkpoint:
/// `version_floor` is recorded ahead of publishing. `checkpoint_dir` names
/// the folder in the error.
pub fn start_version(
    resume: Option<&Checkpoint>,
    version_floor: u64,
    checkpoint_dir: &str,
) -> Result<u64, LearnerError> {
    let resumed_version = resume.map(|c| c.state.version.max(c.state.step));
    let start_version = match resumed_version {
        // A clean stop records its final version as the floor, with these
        // very weights: they may be issued under it again.
        Some(version) if version >= version_floor => version,
        // The floor's version may have gone out with other weights (the
        // final checkpoint is damaged, or none was written): one above.
        _ if version_floor > 0 => version_floor.saturating_add(1),
        _ => 0,
    };
    // Versions are step + an offset: a number from a file must leave room.
    if start_version > checkpoint::COUNTER_LIMIT {
        return Err(LearnerError::Checkpoint(format!(
            "version {start_version} (from the checkpoint or the version floor in {checkpoint_dir}) leaves no room for more; --fresh starts over"
        )));
    }
    Ok(start_version)
}

/// Refuses to resume a checkpoint trained with another objective: its
/// parameters (TB's log Z) would be dropped or missing, and the policy's
/// heads mean something else. Other keys that define the run (the seed,
/// the objective's settings, the learning rate, the batch) are refused
/// too unless `resume_changed`; any other change gets a warning naming
/// it.
pub(crate) fn check_resumed_config(
    saved_config: &str,
    config: &Config,
    resume_changed: bool,
    path: &std::path::Path,
) -> Result<(), LearnerError> {
    let objective = &config.objective;
    // As written in a configuration file ("fl_db", "uniform").
    let named = |value: serde_json::Value| value.as_str().unwrap_or_default().to_owned();
    // The two keys that must match are read on their own, so that a key
    // renamed or removed elsewhere since that checkpoint was written (a
    // full parse refuses unknown keys) cannot skip this check.
    // Unreadable (a checkpoint assembled by hand: the checksum passed),
    // nothing could be checked: the objective, which must not change, least
    // of all.
    let table = saved_config.parse::<toml::Table>().map_err(|error| {
        LearnerError::Checkpoint(format!(
            "{}: its configuration does not read as TOML ({}), so this run's objective cannot be checked against it; {}",
            path.display(),
            error.message(),
            checkpoint::older_one_remedy(path)
        ))
    })?;
    let saved_key = |key: &str| -> Option<String> {
        let value = table.get("objective")?.get(key)?;
        value.as_str().map(str::to_owned)
    };
    let defaults = flgfn_common::config::ObjectiveConfig::default();
    for (key, default, now) in [
        (
            "name",
            serde_json::json!(defaults.name),
            serde_json::json!(objective.name),
        ),
        (
            "backward_policy",
            serde_json::json!(defaults.backward_policy),
            serde_json::json!(objective.backward_policy),
        ),
    ] {
        // Absent: that version's default (these have not changed).
        let then = saved_key(key).unwrap_or_else(|| named(default));
        let now = named(now);
        if then != now {
            return Err(ConfigError::invalid(
                &format!("objective.{key}"),
                format!(
                    "{now}, but {} was trained with {then}: keep {then} to resume it, give this run its own learner.checkpoint_dir (--checkpoint-dir), or --fresh to delete its checkpoints and start over",
                    path.display()
                ),
            )
            .into());
        }
    }
    let now = flat_config(config);
    // Unvalidated: it was valid for the version that wrote it.
    let then = match Config::parse_toml(saved_config, "the checkpoint's configuration") {
        Ok(saved) => flat_config(&saved),
        Err(_) => {
            // Keys renamed or removed since (a full parse refuses unknown
            // keys) must not let a changed seed or learning rate through.
            warn!(path = %path.display(), "the checkpoint's configuration has keys this build does not know (renamed or removed since): only the keys both know are compared");
            keys_both_know(&table)
        }
    };
    let changed = noted_changes(&then, &now);
    if changed.is_empty() {
        return Ok(());
    }
    let list = |changes: &[&(String, String, String)]| {
        let described: Vec<String> = changes
            .iter()
            .map(|(key, then, now)| format!("{key} {then} -> {now}"))
            .collect();
        described.join(", ")
    };
    let schedule_moves = moves_the_schedule(&changed, config);
    let defining: Vec<&(String, String, String)> = changed
        .iter()
        .filter(|(key, ..)| defines_the_run(key))
        .collect();
    if let Some((key, then, now)) = defining.first()
        && !resume_changed
    {
        // The other keys refused, not every one changed.
        let others = match &defining[1..] {
            [] => String::new(),
            more => format!(" (and {} more: {})", more.len(), list(more)),
        };
        return Err(ConfigError::invalid(
            key,
            format!(
                "{now}, but {} was trained with {then}{others}: another run's checkpoint? Give this run its own learner.checkpoint_dir (--checkpoint-dir); --resume-changed (FLGFN_RESUME_CHANGED=1 in a container) continues it with the new settings; --fresh deletes its checkpoints and starts over",
                path.display()
            ),
        )
        .into());
    }
    warn!(
        changed = %list(&changed.iter().collect::<Vec<_>>()),
        learning_rate_schedule = if schedule_moves {
            "recomputed from the new settings: the rate may jump"
        } else {
            "unchanged"
        },
        "resuming with settings other than the checkpoint's"
    );
    Ok(())
}

/// Keys whose change makes the resumed run another optimisation than the
/// one its checkpoint holds (the task and model are checked with the
/// weights): refused unless asked for (`--resume-changed`).
const RUN_DEFINING_KEYS: &[&str] = &[
    "seed",
    "objective.",
    "learner.learning_rate",
    "learner.final_learning_rate_fraction",
    "learner.batch_transitions",
    "learner.max_batch_transitions",
];

fn defines_the_run(key: &str) -> bool {
    RUN_DEFINING_KEYS
        .iter()
        .any(|defining| key == *defining || (defining.ends_with('.') && key.starts_with(defining)))
}

/// Keys that say where this deployment runs, not what it trains: a
/// resume need not keep them, nor hear that they changed (a learner
/// listening on port 0 gets another port each time).
const DEPLOYMENT_KEYS: &[&str] = &[
    "learner.listen",
    "learner.checkpoint_dir",
    "learner.unfinished_exit_status",
    "learner.sigterm",
    "actor.learner",
];

/// Keys besides `learner.max_steps` that set the learning rates at a
/// step: a resume that changes one moves them.
const SCHEDULE_KEYS: &[&str] = &[
    "learner.learning_rate",
    "learner.final_learning_rate_fraction",
    "objective.log_z_learning_rate",
];

/// Whether `changed` moves the learning rates at the resumed step: they
/// follow from the [`SCHEDULE_KEYS`], and from `learner.max_steps` where
/// the rate decays (`now`'s fraction below 1; a changed fraction is one
/// of those keys).
fn moves_the_schedule(changed: &[(String, String, String)], now: &Config) -> bool {
    changed.iter().any(|(key, ..)| {
        SCHEDULE_KEYS.contains(&key.as_str())
            || (key == "learner.max_steps" && now.learner.final_learning_rate_fraction != 1.0)
    })
}

/// A configuration's keys (`section.key`) and values, as written.
type FlatConfig = BTreeMap<String, String>;

fn flatten(prefix: &str, table: &toml::Table, out: &mut FlatConfig) {
    for (key, value) in table {
        let key = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            value => {
                out.insert(key, value.to_string());
            }
        }
    }
}

fn flat_config(config: &Config) -> FlatConfig {
    let mut out = BTreeMap::new();
    if let Ok(table) = config.to_toml().parse::<toml::Table>() {
        flatten("", &table, &mut out);
    }
    out
}

/// A saved configuration that this build cannot parse, read as a full
/// parse reads one that it can: this build's keys, with the saved values
/// where it has them and the defaults where it lacks them (added since);
/// its keys this build does not know (renamed or removed since) left out.
fn keys_both_know(saved: &toml::Table) -> FlatConfig {
    let mut then = BTreeMap::new();
    flatten("", saved, &mut then);
    let mut read = flat_config(&Config::default());
    for (key, value) in &mut read {
        if let Some(saved) = then.remove(key) {
            *value = saved;
        }
    }
    read
}

/// The changes a resume is told about (or refused for): every changed
/// key but those of the deployment.
fn noted_changes(then: &FlatConfig, now: &FlatConfig) -> Vec<(String, String, String)> {
    changed_keys(then, now)
        .into_iter()
        .filter(|(key, ..)| !DEPLOYMENT_KEYS.contains(&key.as_str()))
        .collect()
}

/// Every key whose value differs between two configurations, with its
/// value in each.
fn changed_keys(then: &FlatConfig, now: &FlatConfig) -> Vec<(String, String, String)> {
    let absent = || "(none)".to_owned();
    let keys: std::collections::BTreeSet<&String> = then.keys().chain(now.keys()).collect();
    keys.into_iter()
        .filter(|key| then.get(*key) != now.get(*key))
        .map(|key| {
            (
                key.clone(),
                then.get(key).cloned().unwrap_or_else(absent),
                now.get(key).cloned().unwrap_or_else(absent),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flgfn_common::config::ObjectiveName;

    /// A checkpoint's configuration from another version (a key since
    /// renamed: the full parse fails) still has its objective checked.
    #[test]
    fn another_objective_is_refused_even_in_an_older_configuration() {
        let path = std::path::Path::new("ckpt-000000000100.safetensors");
        let mut trained = Config::default();
        trained.objective.name = ObjectiveName::Tb;
        let saved = format!("{}\n[renamed_since]\nkey = 1\n", trained.to_toml());
        assert!(Config::parse_toml(&saved, "saved").is_err());
        let now = Config::default();
        // Refused even when other changes are accepted.
        let error = check_resumed_config(&saved, &now, true, path)
            .unwrap_err()
            .to_string();
        assert!(error.contains("objective.name"), "{error}");
        assert!(error.contains("trained with tb"), "{error}");
        check_resumed_config(&saved, &trained, false, path).unwrap();
        // Without an [objective] section: that version's defaults.
        let silent = "seed = 0\n[renamed_since]\nkey = 1\n";
        check_resumed_config(silent, &now, false, path).unwrap();
        assert!(check_resumed_config(silent, &trained, false, path).is_err());
    }

    /// A checkpoint of figures no learner writes (its checksum held: made
    /// by hand) is refused, naming the field, before anything is changed
    /// for it: the damaged newer ones it would set aside stay in place.
    #[test]
    fn a_checkpoint_of_impossible_figures_is_refused_before_the_folder_is_touched() {
        let dir = std::env::temp_dir().join(format!("flgfn-resume-figures-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let damaged = dir.join("ckpt-000000000200.safetensors");
        std::fs::write(&damaged, b"torn").unwrap();
        let model = ModelSpec {
            input_dim: 4,
            hidden: vec![3],
            forward_actions: 2,
            backward_actions: 2,
        };
        let mut policy = Policy::new(&model, tch::Device::Cpu);
        let config = Config::default();
        let checkpoint = Checkpoint {
            path: dir.join("ckpt-000000000100.safetensors"),
            state: checkpoint::CheckpointState {
                step: 100,
                version: 100,
                wall_s: -1.0,
                task: "a task".to_owned(),
                model: model.to_string(),
                config: config.to_toml(),
                ..Default::default()
            },
            arrays: checkpoint::prefixed("policy", policy.weights()).collect(),
            damaged_newer: vec![damaged.clone()],
        };
        let error = restore(&checkpoint, &mut policy, "a task", &model, &config, false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`wall_s`") && error.contains("ckpt-000000000100"),
            "{error}"
        );
        assert!(
            damaged.exists(),
            "the damaged newer checkpoint was set aside"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A checkpoint whose configuration does not read as TOML (assembled
    /// by hand) is refused, naming it: nothing, not even its objective,
    /// could be checked. Even with --resume-changed.
    #[test]
    fn an_unreadable_saved_configuration_is_refused() {
        let path = std::path::Path::new("ckpt-000000000100.safetensors");
        for resume_changed in [false, true] {
            let error = check_resumed_config(
                "[objective\nname = tb",
                &Config::default(),
                resume_changed,
                path,
            )
            .unwrap_err()
            .to_string();
            assert!(error.contains("ckpt-000000000100.safetensors"), "{error}");
            assert!(error.contains("does not read as TOML"), "{error}");
        }
    }

    /// Another seed, learning rate or batch most likely means another
    /// run's folder: refused by name unless asked for; the budget or the
    /// cadence may change (with a warning), the address too (unsaid).
    #[test]
    fn a_checkpoint_of_another_run_is_refused_unless_asked_for() {
        let path = std::path::Path::new("ckpt-000000000100.safetensors");
        let trained = Config::default();
        let saved = trained.to_toml();
        let mut now = trained.clone();
        now.learner.max_steps *= 2;
        now.learner.listen = "0.0.0.0:50051".to_owned();
        now.learner.checkpoint_dir = "/moved/checkpoints".to_owned();
        now.actor.learner = "http://elsewhere:50051".to_owned();
        now.learner.report_every_s = 30.0;
        check_resumed_config(&saved, &now, false, path).unwrap();
        now.learner.learning_rate *= 0.5;
        now.seed += 1;
        let error = check_resumed_config(&saved, &now, false, path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("learner.learning_rate")
                && error.contains("seed ")
                && error.contains("--checkpoint-dir")
                && error.contains("--resume-changed"),
            "{error}"
        );
        check_resumed_config(&saved, &now, true, path).unwrap();
        let noted = noted_changes(&flat_config(&trained), &flat_config(&now));
        let changed: Vec<&str> = noted.iter().map(|(key, ..)| key.as_str()).collect();
        assert_eq!(
            changed,
            [
                "learner.learning_rate",
                "learner.max_steps",
                "learner.report_every_s",
                "seed"
            ]
        );
        // The rate at the resumed step moves with the rate itself, or
        // with the budget where it decays; not with the report cadence.
        let moves = |keys: &[&str], fraction: f64| {
            let mut config = now.clone();
            config.learner.final_learning_rate_fraction = fraction;
            let changed: Vec<_> = noted
                .iter()
                .filter(|(key, ..)| keys.contains(&key.as_str()))
                .cloned()
                .collect();
            moves_the_schedule(&changed, &config)
        };
        assert!(moves(&["learner.learning_rate"], 1.0));
        assert!(moves(&["learner.max_steps"], 0.1));
        assert!(!moves(&["learner.max_steps"], 1.0));
        assert!(!moves(&["learner.report_every_s", "seed"], 0.1));
    }

    /// A checkpoint's configuration this build cannot parse (a key renamed
    /// since) still has its seed and learning rate compared: the keys both
    /// builds know.
    #[test]
    fn an_older_configuration_is_compared_on_the_keys_both_know() {
        let path = std::path::Path::new("ckpt-000000000100.safetensors");
        let trained = Config::default();
        let saved = format!("{}\n[renamed_since]\nkey = 1\n", trained.to_toml());
        assert!(Config::parse_toml(&saved, "saved").is_err());
        check_resumed_config(&saved, &trained, false, path).unwrap();
        let mut now = trained.clone();
        now.seed += 1;
        let error = check_resumed_config(&saved, &now, false, path)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`seed`"), "{error}");
        check_resumed_config(&saved, &now, true, path).unwrap();
        // A key this build has and that version lacked reads as its
        // default, as in a configuration that parses: a change only where
        // this run sets another value.
        let mut table: toml::Table = saved.parse().unwrap();
        let learner = table
            .get_mut("learner")
            .and_then(toml::Value::as_table_mut)
            .unwrap();
        assert!(learner.remove("report_every_s").is_some());
        let then = keys_both_know(&table);
        assert!(noted_changes(&then, &flat_config(&trained)).is_empty());
        let mut reporting = trained.clone();
        reporting.learner.report_every_s *= 2.0;
        let changed = noted_changes(&then, &flat_config(&reporting));
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].0, "learner.report_every_s");
    }
}
