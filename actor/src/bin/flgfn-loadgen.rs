//! `flgfn-loadgen`: many synthetic actors in one process. See `--help`.

use clap::Parser;
use flgfn_actor::cli::ConfigFlags;
use flgfn_common::telemetry::{self, LogFlags};

/// Opens K actor sessions to a learner (handshake, credits and weights,
/// trajectory stream) and answers every credit with valid trajectories of
/// the configured task, drawn uniformly without a network. For load tests
/// and scale figures: 64-256 actors on one small machine. Exits 0 when the
/// learner finishes training (or on a stop signal); 75 when every
/// generated actor that failed gave up reaching the learner
/// (actor.reconnect_attempts); 1 on any other error.
#[derive(Debug, Parser)]
#[command(name = "flgfn-loadgen", version = flgfn_actor::BUILD)]
struct Args {
    #[command(flatten)]
    config: ConfigFlags,
    /// Generated actors (at least 1).
    #[arg(long, default_value_t = 64, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    actors: u32,
    #[command(flatten)]
    log: LogFlags,
}

/// Every generated actor that failed gave up reaching the learner.
#[derive(Debug)]
struct LearnerUnreachable(usize);

impl std::fmt::Display for LearnerUnreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} generated actor(s) gave up reaching the learner (actor.reconnect_attempts)",
            self.0
        )
    }
}

impl std::error::Error for LearnerUnreachable {}

fn main() -> std::process::ExitCode {
    let args: Args = flgfn_common::telemetry::parse_args();
    telemetry::init_with(args.log.log_format);
    let result = run(args);
    let unreachable = result
        .as_ref()
        .is_err_and(|error| error.is::<LearnerUnreachable>());
    let status = telemetry::exit_status("flgfn-loadgen", result);
    if unreachable {
        std::process::ExitCode::from(flgfn_actor::EXIT_LEARNER_UNREACHABLE)
    } else {
        status
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config.load()?;
    args.config.validate(&config, &[])?;
    // What every generated actor would refuse alike, said once, not once
    // per actor.
    flgfn_common::auth::load_token(&config.auth)?;
    flgfn_actor::client_tls(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.actor.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = flgfn_common::signals::shutdown_requested();
        let reports = flgfn_actor::loadgen::run(config, args.actors as usize, shutdown).await;
        let (mut chunks, mut transitions, mut versions, mut failed) = (0, 0, 0, 0);
        let mut gave_up = 0;
        for report in &reports {
            match report {
                Ok(r) => {
                    chunks += r.chunks_sent;
                    transitions += r.transitions_sent;
                    versions += r.versions_received;
                }
                Err(error) => {
                    failed += 1;
                    gave_up += usize::from(matches!(error, flgfn_actor::ActorError::GaveUp { .. }));
                    tracing::error!(%error, "a generated actor failed");
                }
            }
        }
        tracing::info!(
            actors = reports.len(),
            chunks,
            transitions,
            versions,
            failed,
            "load generator stopped"
        );
        if failed > 0 && gave_up == failed {
            return Err(LearnerUnreachable(failed).into());
        }
        anyhow::ensure!(failed == 0, "{failed} generated actor(s) failed");
        Ok(())
    })
}
