//! `flgfn-learner`: the training process. See `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use flgfn_common::config::{
    CONFIG_VARIABLE, Config, blame_layer, describe_layers, env_overrides, flgfn_variables,
};
use flgfn_common::telemetry::{self, LogFlags};
use flgfn_learner::RunOptions;
use flgfn_learner::launcher::{LocalActorsPlan, actor_executable};

/// Trains a forward-looking GFlowNet on trajectories streamed by
/// `flgfn-actor` processes, granting them credits and sending them weights.
#[derive(Debug, Parser)]
#[command(
    version = flgfn_learner::BUILD,
    after_help = "Signals: SIGINT or SIGTERM stops after the current step (or the next, if its batch is ready), saves a checkpoint, and ends the run for every actor. SIGUSR1 does the same but tells the actors to reconnect: they wait for the learner started again on its checkpoint (a restart by hand); so does SIGTERM with learner.sigterm = \"restart\" (where a supervisor starts the learner again, as Kubernetes does). A second signal exits at once, without the final checkpoint."
)]
struct Args {
    /// TOML configuration shared with the actors (defaults are used for
    /// every key it does not set; unknown keys are errors).
    /// `-` reads it from standard input. `FLGFN_<SECTION>__<KEY>` variables
    /// override it, flags override both.
    #[arg(long, value_name = "FILE", env = CONFIG_VARIABLE)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:50051 (overrides learner.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Write one JSON object per progress report to this file, and the
    /// run's summary beside it as the run ends (run.jsonl gives
    /// run.summary.json: its steps, how it ended, any error, its totals).
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,
    /// Stop after this many training steps, 0 for never (overrides
    /// learner.max_steps).
    #[arg(long, value_name = "N")]
    max_steps: Option<u64>,
    /// libtorch threads for training (overrides learner.threads).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Base random seed (overrides seed).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Also start launch.actors `flgfn-actor` processes on this machine,
    /// connected to this learner (the local launcher).
    #[arg(long)]
    local_actors: bool,
    /// Number of local actors (overrides launch.actors).
    #[arg(long, value_name = "N", requires = "local_actors")]
    actors: Option<usize>,
    /// Where checkpoints and the final weights go (overrides
    /// learner.checkpoint_dir; "" turns checkpoints off). The learner
    /// resumes from the newest intact checkpoint there.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<String>,
    /// Delete the checkpoints, the final weights (final.safetensors) and
    /// the version floor in the checkpoint directory, and start over
    /// instead of resuming.
    #[arg(long)]
    fresh: bool,
    /// Resume even where the checkpoint was trained with another seed,
    /// objective settings, learning rate or batch size (refused
    /// otherwise: most likely another run's folder); never with another
    /// objective name or backward policy.
    #[arg(
        long,
        env = "FLGFN_RESUME_CHANGED",
        value_parser = yes_or_no
    )]
    resume_changed: bool,
    /// Not a setting (hidden): the learner resumes by default. Taken so
    /// that `--resume` (`deploy/local.sh`'s flag) is answered with that,
    /// not with clap's suggestion, `--resume-changed`, which waives a
    /// check.
    #[arg(long, hide = true)]
    resume: bool,
    /// Print the effective configuration (defaults, file, environment and
    /// flags) as TOML and exit; the token and TLS files are read as at
    /// start (never printed), so one that would stop the start stops this.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    log: LogFlags,
}

impl Args {
    /// The configuration flags given, with the key each sets (for errors
    /// and `--print-config`).
    fn flag_keys(&self) -> Vec<(&'static str, &'static str)> {
        [
            ("--listen", "learner.listen", self.listen.is_some()),
            ("--max-steps", "learner.max_steps", self.max_steps.is_some()),
            ("--threads", "learner.threads", self.threads.is_some()),
            ("--seed", "seed", self.seed.is_some()),
            (
                "--checkpoint-dir",
                "learner.checkpoint_dir",
                self.checkpoint_dir.is_some(),
            ),
            ("--actors", "launch.actors", self.actors.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, key, given)| given.then_some((flag, key)))
        .collect()
    }
}

/// `FLGFN_RESUME_CHANGED`'s value: yes or no, and empty is no (unset, as
/// a container passes it); anything else is refused, not read as yes: a
/// typo must not resume a run with changed settings.
fn yes_or_no(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "" | "0" | "false" | "no" | "off" | "n" | "f" => Ok(false),
        "1" | "true" | "yes" | "on" | "y" | "t" => Ok(true),
        _ => {
            Err("FLGFN_RESUME_CHANGED takes 1, true, yes, on, y or t, or 0, false, no, off, n, f or nothing (any case)".to_owned())
        }
    }
}

fn main() -> std::process::ExitCode {
    let args: Args = flgfn_common::telemetry::parse_args();
    telemetry::init_with_live_line(args.log.log_format);
    match run(args) {
        Ok(status) => std::process::ExitCode::from(status),
        Err(error) => telemetry::exit_status("flgfn-learner", Err(error)),
    }
}

/// The exit status when all went well: 0, or
/// `learner.unfinished_exit_status` for a run stopped before its end.
fn run(args: Args) -> anyhow::Result<u8> {
    // Checked here, not by clap: FLGFN_RESUME_CHANGED=0 sets the flag to
    // false, and clap would count it as given.
    anyhow::ensure!(
        !(args.fresh && args.resume_changed),
        "--fresh and --resume-changed (or FLGFN_RESUME_CHANGED) contradict each other: give one"
    );
    anyhow::ensure!(
        !args.resume,
        "--resume: the learner resumes by default, from the newest intact checkpoint in its checkpoint folder (--fresh starts over); --resume is deploy/local.sh's flag"
    );
    let flag_keys = args.flag_keys();
    // Validated once the flags are applied: a flag may correct the file.
    let mut config = Config::load_unvalidated(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.learner.listen = listen;
    }
    if let Some(max_steps) = args.max_steps {
        config.learner.max_steps = max_steps;
    }
    if let Some(threads) = args.threads {
        config.learner.threads = threads;
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if let Some(dir) = args.checkpoint_dir {
        config.learner.checkpoint_dir = dir;
    }
    if let Some(actors) = args.actors {
        config.launch.actors = actors;
    }
    let overrides = env_overrides(flgfn_variables()?);
    config.validate_layers(&overrides, &flag_keys)?;
    // A key refused past validation (by the start's own checks, or by a
    // checkpoint) is named with its layer too.
    let blamed = |error: flgfn_learner::LearnerError| match error {
        flgfn_learner::LearnerError::Config(error) => {
            flgfn_learner::LearnerError::Config(blame_layer(error, &overrides, &flag_keys))
        }
        other => other,
    };
    // Local actors reach the learner over loopback in plain text; against
    // TLS every connection would fail, and be retried for ever.
    anyhow::ensure!(
        !args.local_actors || config.tls.cert_file.is_empty(),
        "--local-actors does not work with TLS (tls.cert_file is set): local actors connect over loopback in plain text; start the learner without [tls] for a local run, or start actors with the CA (flgfn-actor --learner https://...)"
    );
    if args.print_config {
        let flags: Vec<&str> = flag_keys.iter().map(|&(flag, _)| flag).collect();
        // Read and checked as a start reads and checks them: a file or a
        // setting that would stop the learner stops this too.
        let token = flgfn_common::auth::load_token(&config.auth)?;
        flgfn_learner::secured_transport(&config)?;
        flgfn_learner::check_listen_exposure(&config, token.is_some())?;
        flgfn_learner::check_startup(&config, args.local_actors.then_some(config.launch.actors))
            .map(drop)
            .map_err(blamed)?;
        flgfn_common::out!(
            "{}{}",
            describe_layers(args.config.as_deref(), &overrides, &flags),
            flgfn_common::auth::describe_secrets(token.as_ref(), &config.tls, true)
        );
        flgfn_common::out!("{}", config.to_toml());
        return Ok(0);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.learner.async_threads)
        // Validation takes learner.ingest_threads of these; weight encoding
        // one at a time (sessions waiting for it wait on the async side).
        .max_blocking_threads(config.learner.ingest_threads + 2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Listening for stop signals from here on (on the main thread, as
        // the parent's death needs): one that comes while the learner
        // binds and loads is kept.
        let shutdown = flgfn_common::signals::stop_requested(config.learner.sigterm);
        let listener = tokio::net::TcpListener::bind(&config.learner.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (learner.listen, --listen)",
                    config.learner.listen
                )
            })?;
        let local_actors = if args.local_actors {
            Some(LocalActorsPlan {
                count: config.launch.actors,
                executable: actor_executable()?,
            })
        } else {
            None
        };
        let unfinished_exit_status = config.learner.unfinished_exit_status;
        let options = RunOptions {
            metrics_path: args.metrics,
            fresh: args.fresh,
            resume_changed: args.resume_changed,
            local_actors,
        };
        let outcome = flgfn_learner::serve(config, listener, options, shutdown)
            .await
            .map_err(blamed)?;
        if outcome.ended_by == flgfn_learner::EndedBy::MaxSteps || unfinished_exit_status == 0 {
            return Ok(0);
        }
        tracing::info!(
            status = unfinished_exit_status,
            ended_by = %outcome.ended_by.as_str(),
            "exiting with learner.unfinished_exit_status: stopped before max_steps"
        );
        Ok(unfinished_exit_status)
    })
}
