//! `flgfn-actor`: a sampling process. See `--help`.

use clap::Parser;
use flgfn_actor::ActorOptions;
use flgfn_actor::cli::ConfigFlags;
use flgfn_common::telemetry::{self, LogFlags};

/// Rolls out trajectories with the learner's latest policy and streams them,
/// with their local energy terms, to `flgfn-learner`. Exits 0 when the
/// learner finishes training (or on a stop signal); 75 when
/// actor.reconnect_attempts tries in a row found no working session (the
/// learner unreachable, full, or cutting sessions short); 1 on any other
/// error (the learner refused it, a bad setting); 2 on a flag it cannot
/// parse; 130 on a second stop signal.
#[derive(Debug, Parser)]
#[command(version = flgfn_actor::BUILD)]
struct Args {
    #[command(flatten)]
    config: ConfigFlags,
    /// Name shown in the learner's logs, and under which it counts chunks
    /// lost across reconnects: one per actor [default: host/pid].
    #[arg(long, value_parser = actor_name)]
    name: Option<String>,
    /// Draw actions from seed `seed + 1 + N`, to reproduce a run. Without
    /// it every actor draws a stream of its own (seed, learner-assigned
    /// actor id and OS entropy mixed).
    #[arg(long, value_name = "N")]
    seed_offset: Option<u64>,
    /// Fraction of trajectories cut before their end (overrides
    /// actor.truncate_fraction).
    #[arg(long, value_name = "F")]
    truncate_fraction: Option<f64>,
    /// Print the effective configuration (defaults, file, environment and
    /// flags) as TOML and exit; the token and TLS files are read as at
    /// start (never printed), so one that would stop the start stops this.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    log: LogFlags,
}

/// The longest `--name` taken: a pod's or a host's name with a suffix fits
/// many times over, and the learner logs it at every session.
const MAX_NAME_BYTES: usize = 1024;

/// A `--name`: not blank (an unset template variable would give every
/// actor the same one, and the learner's count of lost chunks, kept by
/// name, would mix theirs), without control characters, nor longer than
/// [`MAX_NAME_BYTES`].
fn actor_name(name: &str) -> Result<String, String> {
    if name.trim().is_empty() {
        return Err("a name must not be blank (leave --name out for host/pid)".to_owned());
    }
    // The learner's logs show them as `?`: two names that differ only
    // there would share its count of lost chunks.
    if name.chars().any(char::is_control) {
        return Err("a name must not hold control characters".to_owned());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_NAME_BYTES} a name may take",
            name.len()
        ));
    }
    Ok(name.to_owned())
}

fn main() -> std::process::ExitCode {
    let args: Args = flgfn_common::telemetry::parse_args();
    telemetry::init_with(args.log.log_format);
    flgfn_actor::exit_status("flgfn-actor", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = args.config.load()?;
    if let Some(fraction) = args.truncate_fraction {
        config.actor.truncate_fraction = fraction;
    }
    let truncate_flag = args
        .truncate_fraction
        .map(|_| ("--truncate-fraction", "actor.truncate_fraction"));
    args.config.validate(&config, truncate_flag.as_slice())?;
    if args.print_config {
        args.config.print(&config, truncate_flag.as_slice())?;
        return Ok(());
    }
    let name = args
        .name
        .unwrap_or_else(|| format!("{}/{}", flgfn_actor::host_name(), std::process::id()));
    let options = ActorOptions {
        name,
        seed_offset: args.seed_offset,
    };
    // One runtime thread is plenty: the rollout runs on its own thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = flgfn_common::signals::shutdown_requested();
        flgfn_actor::run(config, options, shutdown).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_neither_blank_nor_huge() {
        assert_eq!(
            actor_name("node-3/actor-1").as_deref(),
            Ok("node-3/actor-1")
        );
        for blank in ["", "  ", "\t"] {
            let error = actor_name(blank).unwrap_err();
            assert!(error.contains("must not be blank"), "{error}");
        }
        let error = actor_name("actor\n1").unwrap_err();
        assert!(error.contains("control characters"), "{error}");
        assert!(actor_name(&"a".repeat(MAX_NAME_BYTES)).is_ok());
        let error = actor_name(&"a".repeat(MAX_NAME_BYTES + 1)).unwrap_err();
        assert!(error.contains("1025 bytes"), "{error}");
    }
}
