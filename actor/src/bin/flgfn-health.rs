//! `flgfn-health`: a gRPC health probe for the learner. See `--help`.

use std::time::Duration;

use clap::Parser;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Asks a learner's gRPC health service whether it serves, for container
/// health checks (Docker's HEALTHCHECK) and scripts: exits 0 when it
/// answers SERVING, 1 otherwise (NOT_SERVING while it shuts down,
/// unreachable, or too slow). Plain text only: behind TLS, probe with the
/// orchestrator's own gRPC check.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The learner, e.g. http://127.0.0.1:50051.
    #[arg(
        long,
        env = "FLGFN_HEALTH_ADDRESS",
        default_value = "http://127.0.0.1:50051"
    )]
    address: String,
    /// The service to ask about; "" is the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3.0, value_name = "S")]
    timeout_s: f64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flgfn-health: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let timeout = Duration::from_secs_f64(args.timeout_s.max(0.001));
    match runtime.block_on(async { tokio::time::timeout(timeout, check(&args)).await }) {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("SERVING");
            std::process::ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            println!("{}", status.as_str_name());
            std::process::ExitCode::FAILURE
        }
        Ok(Err(error)) => {
            eprintln!("flgfn-health: {}: {error:#}", args.address);
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("flgfn-health: {}: no answer in {timeout:?}", args.address);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn check(args: &Args) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(args.address.clone())?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await?
        .into_inner();
    Ok(reply.status())
}
