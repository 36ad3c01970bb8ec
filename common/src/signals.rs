//! Process signals that ask for a graceful stop.

/// Exit status after a second stop signal: 128 + SIGINT, what a shell
/// reports for a process that Ctrl-C ended.
pub const FORCED_EXIT_STATUS: i32 = 130;

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM, which is what
/// Kubernetes, Slurm and systemd send before they kill a process.
///
/// Once it has resolved, a second signal ends the process at once with
/// [`FORCED_EXIT_STATUS`], without the rest of the graceful stop (an
/// actor's drain, a learner's final checkpoint): listening for the first
/// signal replaced the default action, so without this a second Ctrl-C
/// would do nothing while the process waits on a frozen peer. Must be
/// awaited inside a tokio runtime.
pub async fn shutdown_requested() {
    stop_signal().await;
    tokio::spawn(async {
        stop_signal().await;
        tracing::warn!("a second stop signal: exiting now, without finishing the graceful stop");
        std::process::exit(FORCED_EXIT_STATUS);
    });
}

/// The next Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            // Without a SIGTERM handler, Ctrl-C still works.
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
