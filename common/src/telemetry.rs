//! Tracing setup shared by the binaries.

use tracing_subscriber::EnvFilter;

/// Logs to stderr at `info` for flgfn crates and `warn` for dependencies,
/// unless `RUST_LOG` says otherwise. Safe to call more than once (tests).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,flgfn_common=info,flgfn_actor=info,flgfn_learner=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The process exit status for a binary's result, printing an error as
/// `program: error: cause: cause...` (`{:#}` gives anyhow's one-line chain,
/// without the backtrace its Debug form adds).
pub fn exit_status<E: std::fmt::Display>(
    program: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
