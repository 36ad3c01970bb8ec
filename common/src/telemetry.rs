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
