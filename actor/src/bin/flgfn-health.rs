//! `flgfn-health`: a gRPC health probe for the learner. See `--help`.

use std::time::Duration;

use clap::Parser;
use flgfn_actor::health::HealthError;
use flgfn_common::auth::TlsConfig;
use flgfn_common::config::ConfigError;
use tonic_health::pb::health_check_response::ServingStatus;

/// Asks a learner's gRPC health service whether it serves, for container
/// health checks (Docker's HEALTHCHECK) and scripts: exits 0 when it
/// answers SERVING, 1 otherwise (NOT_SERVING while it loads its
/// checkpoint, unreachable, as from the moment it is told to stop, or too
/// slow). An `https://` address is probed over TLS,
/// trusting `--ca-file` (and presenting `--cert-file` where the learner
/// requires client certificates).
#[derive(Debug, Parser)]
#[command(name = "flgfn-health", version = flgfn_actor::BUILD)]
struct Args {
    /// The learner, e.g. http://127.0.0.1:50051 (a bare HOST:PORT is
    /// http://; TLS needs https://).
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
    /// https://: the PEM CA that signed the learner's certificate.
    #[arg(
        long,
        env = "FLGFN_HEALTH_CA_FILE",
        value_name = "PEM",
        default_value = ""
    )]
    ca_file: String,
    /// https://: the name the learner's certificate carries (default: the
    /// address's host).
    #[arg(long, env = "FLGFN_HEALTH_DOMAIN", default_value = "")]
    domain: String,
    /// https:// with mutual TLS: a client certificate signed by the
    /// learner's `tls.ca_file`, and its key.
    #[arg(
        long,
        env = "FLGFN_HEALTH_CERT_FILE",
        value_name = "PEM",
        default_value = ""
    )]
    cert_file: String,
    /// The key of `--cert-file`.
    #[arg(
        long,
        env = "FLGFN_HEALTH_KEY_FILE",
        value_name = "PEM",
        default_value = ""
    )]
    key_file: String,
}

fn main() -> std::process::ExitCode {
    let args: Args = flgfn_common::telemetry::parse_args();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            flgfn_common::errln!("flgfn-health: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let usable = args.timeout_s.is_finite() && args.timeout_s > 0.0;
    let Some(timeout) = usable
        .then(|| Duration::try_from_secs_f64(args.timeout_s).ok())
        .flatten()
    else {
        flgfn_common::errln!(
            "flgfn-health: --timeout-s {} is not a usable number of seconds",
            args.timeout_s
        );
        return std::process::ExitCode::FAILURE;
    };
    let started = std::time::Instant::now();
    match runtime.block_on(async { tokio::time::timeout(timeout, check(&args)).await }) {
        Ok(Ok(ServingStatus::Serving)) => {
            flgfn_common::outln!("SERVING");
            std::process::ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            flgfn_common::outln!("{}", status.as_str_name());
            std::process::ExitCode::FAILURE
        }
        Ok(Err(HealthError::Config(ConfigError::Invalid { field, reason, .. }))) => {
            // The TLS settings came from this program's flags, not from a
            // configuration file's [tls]: name the flag.
            let flag = match field.as_str() {
                "tls.ca_file" => "--ca-file (FLGFN_HEALTH_CA_FILE)",
                "tls.cert_file" => "--cert-file (FLGFN_HEALTH_CERT_FILE)",
                "tls.key_file" => "--key-file (FLGFN_HEALTH_KEY_FILE)",
                "tls.domain" => "--domain (FLGFN_HEALTH_DOMAIN)",
                "actor.learner" => "--address (FLGFN_HEALTH_ADDRESS)",
                other => other,
            };
            let reason = reason
                .replace("tls.cert_file", "--cert-file")
                .replace("tls.key_file", "--key-file");
            flgfn_common::errln!("flgfn-health: {}: {flag}: {reason}", args.address);
            std::process::ExitCode::FAILURE
        }
        Ok(Err(error)) => {
            // (Transport errors repeat their cause's text in their own:
            // with_causes says each once.)
            // Its probe within what is left of --timeout-s: it may take up
            // to 2 s, and a probe runner (Docker's HEALTHCHECK --timeout)
            // would kill it, line and all.
            let left = timeout.saturating_sub(started.elapsed());
            let hint = runtime
                .block_on(flgfn_actor::health::hint(&error, &args.address, left))
                .map_or_else(String::new, |hint| format!(" ({hint})"));
            flgfn_common::errln!(
                "flgfn-health: {}: {}{hint}",
                args.address,
                flgfn_common::telemetry::with_causes(&error)
            );
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            flgfn_common::errln!("flgfn-health: {}: no answer in {timeout:?}", args.address);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn check(args: &Args) -> Result<ServingStatus, HealthError> {
    let tls = TlsConfig {
        cert_file: args.cert_file.clone(),
        key_file: args.key_file.clone(),
        ca_file: args.ca_file.clone(),
        domain: args.domain.clone(),
    };
    flgfn_actor::health::check(&args.address, &args.service, &tls).await
}
