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
/// (actor.reconnect_attempts); 2 for flags that cannot be parsed (and a
/// bad FLGFN_LOG_FORMAT or an empty FLGFN_CONFIG); 1 on any other error.
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

fn main() -> std::process::ExitCode {
    let args: Args = flgfn_common::telemetry::parse_args();
    telemetry::init_with(args.log.log_format);
    flgfn_actor::exit_status("flgfn-loadgen", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config.load()?;
    args.config.validate(&config, &[])?;
    // What every generated actor would refuse alike, said once, not once
    // per actor.
    flgfn_common::auth::load_token(&config.auth)?;
    flgfn_actor::client_tls(&config)?;
    // Its async workers draw every generated actor's trajectories: as many
    // as actor.threads (1 by default), leaving a small machine's other
    // cores to the learner under load.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.actor.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = flgfn_common::signals::shutdown_requested();
        let generated = flgfn_actor::loadgen::run(config, args.actors as usize, shutdown).await;
        let actors = generated.len();
        // Every actor's counts, a failed one's too: what it sent before
        // it failed reached the learner.
        let mut total = flgfn_actor::ActorReport::default();
        let mut failed = 0;
        // The first actor that gave up, and how many did.
        let (mut first_gave_up, mut gave_up) = (None, 0);
        for actor in generated {
            total.add_totals(&actor.report);
            if let Err(error) = actor.ended {
                failed += 1;
                tracing::error!(%error, "a generated actor failed");
                if matches!(error, flgfn_actor::ActorError::GaveUp { .. }) {
                    gave_up += 1;
                    first_gave_up.get_or_insert(error);
                }
            }
        }
        tracing::info!(
            actors,
            chunks_sent = total.chunks_sent,
            transitions_sent = total.transitions_sent,
            versions_received = total.versions_received,
            sessions_opened = total.sessions_opened,
            // Rolled out but never sent, and credits whose session ended
            // first (as each real actor's `actor stopped` names them).
            unsent_chunks = total.stale_chunks_dropped,
            skipped_orders = total.orders_skipped,
            failed,
            "load generator stopped"
        );
        if let Some(error) = first_gave_up.filter(|_| gave_up == failed) {
            return Err(anyhow::Error::new(error).context(format!(
                "{failed} generated actor(s) gave up reaching the learner (actor.reconnect_attempts)"
            )));
        }
        anyhow::ensure!(failed == 0, "{failed} generated actor(s) failed");
        Ok(())
    })
}
