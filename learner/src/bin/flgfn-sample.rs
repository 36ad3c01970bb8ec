//! `flgfn-sample`: draws objects from trained weights and writes them with
//! their energies, one per line (JSON lines) or row (CSV).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use flgfn_common::config::{CONFIG_VARIABLE, Config};
use flgfn_common::policy::{ModelSpec, Policy};
use flgfn_common::rollout::{Behaviour, rollout};
use flgfn_learner::checkpoint;
use rand::SeedableRng;
use rand::rngs::SmallRng;

/// Samples N finished objects with the policy of saved weights (a run's
/// `final.safetensors`, weights sent to actors, or the latest good
/// checkpoint in a directory) and writes each with its energy E(x), log
/// reward -E(x), its state and the actions that built it.
#[derive(Debug, Parser)]
#[command(name = "flgfn-sample", version = flgfn_learner::BUILD)]
struct Args {
    /// The job file the weights were trained with (task and model);
    /// default: the default job.
    #[arg(long, value_name = "FILE", env = CONFIG_VARIABLE)]
    config: Option<PathBuf>,
    /// A safetensors weights file (e.g. CHECKPOINT_DIR/final.safetensors).
    #[arg(long, value_name = "FILE", conflicts_with = "checkpoint")]
    weights: Option<PathBuf>,
    /// A checkpoint directory: its latest good checkpoint's policy.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// How many objects.
    #[arg(short = 'n', long, default_value_t = 1000)]
    samples: usize,
    /// jsonl or csv (default: --out's extension, .csv or .jsonl; jsonl on
    /// standard output).
    #[arg(long)]
    format: Option<Format>,
    /// Output file (default: standard output).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Uniform exploration mixed into the policy (0: the learned sampler).
    #[arg(long, default_value_t = 0.0)]
    epsilon: f64,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One JSON object per line.
    Jsonl,
    /// A header, then one row per object.
    Csv,
}

impl Format {
    /// As `--format` spells it.
    fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

/// The format an output file's extension names. An extension that names
/// neither is refused: `--out samples.parquet` written as JSON lines would
/// fail later, in whatever reads it, far from the cause.
fn format_of(path: &Path) -> anyhow::Result<Format> {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match extension.as_deref() {
        Some("csv") => Ok(Format::Csv),
        None | Some("jsonl" | "ndjson") => Ok(Format::Jsonl),
        // JSON lines are no JSON document: json.load would fail on them.
        Some("json") => bail!(
            "--out {}: .json would hold JSON lines, not one JSON document: name it .jsonl, or say --format",
            path.display()
        ),
        Some(other) => bail!(
            "--out {}: .{other} names neither format written here (jsonl, csv): use a .jsonl or .csv name, or say --format",
            path.display()
        ),
    }
}

fn main() -> std::process::ExitCode {
    flgfn_common::telemetry::init();
    flgfn_common::telemetry::exit_status("flgfn-sample", run(flgfn_common::telemetry::parse_args()))
}

fn run(args: Args) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.epsilon) {
        bail!("--epsilon must be in [0, 1], got {}", args.epsilon);
    }
    let format = match (args.format, &args.out) {
        (Some(format), None) => format,
        // A name that says the other format would mislead whatever reads
        // the file by its name; one that names neither is the user's call.
        (Some(format), Some(path)) => match path.extension().and(format_of(path).ok()) {
            Some(named) if named != format => bail!(
                "--format {} but --out {} names {}: rename the file or drop --format",
                format.name(),
                path.display(),
                named.name()
            ),
            _ => format,
        },
        (None, Some(path)) => format_of(path)?,
        (None, None) => Format::Jsonl,
    };
    let config = Config::load(args.config.as_deref())?;
    let env = flgfn_common::tasks::build(&config.task)?;
    let model = ModelSpec::new(env.as_ref(), &config.model);
    // Sampling is an actor's work: its thread count (libtorch would take
    // every core otherwise).
    flgfn_common::policy::set_threads(config.actor.threads);
    let (task, model_name) = (env.spec().to_string(), model.to_string());
    let mut policy = Policy::new(&model, tch::Device::Cpu);
    match (&args.weights, &args.checkpoint) {
        (Some(path), _) => load_weights_file(&mut policy, path, &task, &model_name)?,
        (None, Some(dir)) => {
            anyhow::ensure!(
                dir.is_dir(),
                "--checkpoint {}: {} (give the folder of the checkpoints, or a file as --weights)",
                dir.display(),
                if dir.exists() {
                    "not a folder"
                } else {
                    "no such folder"
                }
            );
            let found = checkpoint::load_latest_to_read(dir)?
                .with_context(|| format!("no checkpoint in {}", dir.display()))?;
            found.load_policy(&mut policy, &task, &model_name).map_err(
                |refused| match refused {
                    checkpoint::PolicyRefused::AnotherRun(why) => {
                        anyhow::anyhow!("{why} (pass the job file it was trained with as --config)")
                    }
                    checkpoint::PolicyRefused::Unusable(why) => anyhow::anyhow!(
                        "{}: {why} (copy an older checkpoint into a folder of its own and read that)",
                        found.path.display()
                    ),
                },
            )?;
            // The latest that reads back intact, which may not be the
            // newest file: said, since the samples are its.
            tracing::info!(
                path = %found.path.display(),
                step = found.state.step,
                version = found.state.version,
                skipped_damaged = found.damaged_newer.len(),
                "sampling from a checkpoint"
            );
        }
        (None, None) => bail!("give --weights FILE or --checkpoint DIR"),
    }

    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => {
            // In folders made for it, as the learner's --metrics is.
            if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(folder).with_context(|| folder.display().to_string())?;
            }
            Box::new(std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| path.display().to_string())?,
            ))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let written = (|| -> anyhow::Result<()> {
        if format == Format::Csv {
            writeln!(out, "index,energy,log_reward,state,actions")?;
        }
        // Finished objects only: nothing is cut short.
        let behaviour = Behaviour {
            epsilon: args.epsilon,
            truncate_fraction: 0.0,
            truncate_at: config.actor.truncate_at,
            truncate_cap: config.actor.truncate_cap,
        };
        let mut rng = SmallRng::seed_from_u64(args.seed);
        let mut index = 0;
        // In batches: one network call per step for the whole batch, within
        // the memory an evaluation's batch may take (a wide network gets
        // fewer at once).
        let batch = flgfn_learner::evaluator::rollout_envs(&model).min(1024);
        while index < args.samples {
            let count = (args.samples - index).min(batch);
            let drawn = rollout(env.as_ref(), &policy, count, behaviour, &mut rng);
            // Drawn uniformly there: not samples of this policy.
            anyhow::ensure!(
                drawn.non_finite_draws == 0,
                "the policy's logits are not finite at {} of the states visited (weights too large for f32 arithmetic: the model diverged?): it gives no distribution to sample",
                drawn.non_finite_draws
            );
            for (state, trajectory) in drawn.final_states.iter().zip(&drawn.trajectories) {
                let energy = env.energy(state);
                let join = |values: Vec<String>| values.join(" ");
                match format {
                    Format::Jsonl => writeln!(
                        out,
                        "{}",
                        serde_json::json!({
                            "index": index,
                            "energy": energy,
                            "log_reward": -energy,
                            "state": state,
                            "actions": trajectory.actions,
                        })
                    )?,
                    Format::Csv => writeln!(
                        out,
                        "{index},{energy},{},{},{}",
                        -energy,
                        join(state.iter().map(ToString::to_string).collect()),
                        join(trajectory.actions.iter().map(ToString::to_string).collect()),
                    )?,
                }
                index += 1;
            }
        }
        out.flush()?;
        Ok(())
    })();
    if let (Ok(()), Some(path)) = (&written, &args.out) {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        tracing::info!(path = %path.display(), samples = args.samples, format = format.name(), "samples written");
    }
    // No file of fewer samples than asked for, which would read as whole.
    if let (Err(error), Some(path)) = (&written, &args.out)
        && path.is_file()
        && std::fs::remove_file(path).is_ok()
    {
        bail!(
            "{error:#} (the part of --out {} written was removed)",
            path.display()
        );
    }
    written
}

/// Loads a safetensors weights file after checking the task and model in
/// its metadata (when it has them) against the configuration's.
fn load_weights_file(
    policy: &mut Policy,
    path: &Path,
    task: &str,
    model: &str,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let decoded = flgfn_common::weights::decode(&bytes)
        .with_context(|| format!("{} is not safetensors weights", path.display()))?;
    if decoded
        .metadata
        .contains_key(flgfn_learner::checkpoint::STATE_KEY)
    {
        bail!(
            "{} is a checkpoint, not a weights file: pass its folder as --checkpoint DIR",
            path.display()
        );
    }
    if let Some((key, theirs, ours)) =
        decoded.metadata_mismatch(&[("task", task), ("model", model)])
    {
        bail!(
            "{} holds weights of {key} {theirs}; the configuration's is {ours} (pass the job file they were trained with as --config)",
            path.display()
        );
    }
    // Written elsewhere: only the tensors' names and shapes can be checked
    // (another task of the same sizes, other levels say, would pass).
    let unnamed: Vec<&str> = ["task", "model"]
        .into_iter()
        .filter(|key| !decoded.metadata.contains_key(*key))
        .collect();
    if !unnamed.is_empty() {
        tracing::warn!(
            path = %path.display(),
            unnamed = %unnamed.join(", "),
            "these weights do not name their task or model (not written by the learner): only their tensors' names and shapes are checked against the configuration"
        );
    }
    policy
        .load_weights(&decoded.arrays)
        .with_context(|| path.display().to_string())?;
    Ok(())
}
