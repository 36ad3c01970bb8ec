//! Process signals that ask for a graceful stop, and a second one that
//! ends the process at once.

use std::sync::{Mutex, PoisonError};

/// Exit status after a second stop signal: 128 + SIGINT, what a shell
/// reports for a process that Ctrl-C ended.
pub const FORCED_EXIT_STATUS: i32 = 130;

/// A stop signal this soon after the first is the same request, not a
/// second one: GNU `timeout`, and job systems that signal a process and
/// then its process group, deliver SIGTERM twice at once (seen: 0.4 ms
/// apart), which would otherwise force the exit and lose the final
/// checkpoint. Far below the time between two presses of Ctrl-C.
pub const SAME_REQUEST_WITHIN: std::time::Duration = std::time::Duration::from_millis(200);

/// What must happen even on a forced exit (child processes to kill), by
/// registration number.
type Cleanups = Vec<(u64, Box<dyn Fn() + Send>)>;

static BEFORE_FORCED_EXIT: Mutex<(u64, Cleanups)> = Mutex::new((0, Vec::new()));

/// Keeps a cleanup registered with [`before_forced_exit`]; dropping it
/// unregisters the cleanup.
#[derive(Debug)]
#[must_use = "the cleanup is unregistered when this is dropped"]
pub struct ForcedExitCleanup(u64);

impl Drop for ForcedExitCleanup {
    fn drop(&mut self) {
        let mut registry = BEFORE_FORCED_EXIT
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        registry.1.retain(|(id, _)| *id != self.0);
    }
}

/// Runs `cleanup` before a forced exit (a second stop signal), for as long
/// as the returned guard lives: the graceful path's own cleanups (drops,
/// waits) do not run then.
pub fn before_forced_exit(cleanup: impl Fn() + Send + 'static) -> ForcedExitCleanup {
    let mut registry = BEFORE_FORCED_EXIT
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    registry.0 += 1;
    let id = registry.0;
    registry.1.push((id, Box::new(cleanup)));
    ForcedExitCleanup(id)
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM, which is what
/// Kubernetes, Slurm and systemd send before they kill a process; in a
/// process started with [`end_with_parent`], also on its parent's death
/// (for which it must be called on the main thread, as `main`'s
/// `block_on` does).
///
/// The second Ctrl-C or SIGTERM (the parent's death counts as neither,
/// and a repeat within [`SAME_REQUEST_WITHIN`] of the first is the same
/// request) ends the process at once with
/// [`FORCED_EXIT_STATUS`], without the rest of the graceful stop (an
/// actor's drain, a learner's final checkpoint), after the cleanups
/// registered with [`before_forced_exit`]: listening for the first signal
/// replaced the default action, so without this a second Ctrl-C would do
/// nothing while the process waits on a frozen peer. Must be called
/// inside a tokio runtime.
///
/// Listening starts at the call, in a task of its own, not when the
/// future is first polled: a learner polls it only once it trains. A first
/// signal before that (while it loads a checkpoint, say) is kept, and the
/// learner stops as soon as it can; a second one ends the process at
/// once, start-up or not. (Left to the default action, a SIGTERM then
/// would kill the learner and leave the local actors it started behind.)
pub fn shutdown_requested() -> impl std::future::Future<Output = ()> + Send {
    let requested = listen(false, StopRequest::EndRun);
    async move {
        requested.await;
    }
}

/// What a stop asks of a learner (and, as `learner.sigterm`, what
/// SIGTERM asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopRequest {
    /// Ctrl-C, SIGTERM (by default), or the parent's death: the run ends,
    /// and the learner tells its actors that training is over.
    EndRun,
    /// SIGUSR1 (and SIGTERM where `learner.sigterm` says so): the learner
    /// saves its checkpoint and exits to be started again on it; its
    /// actors are told to reconnect, not to exit.
    Restart,
}

/// A stop asked for in code (a test's, an embedding program's): the run
/// ends.
impl From<()> for StopRequest {
    fn from((): ()) -> Self {
        StopRequest::EndRun
    }
}

/// [`shutdown_requested`], also listening for SIGUSR1, the learner's stop
/// for a restart ([`StopRequest::Restart`]), which counts as a stop signal
/// like the others: a second stop signal of either kind forces the exit.
/// Elsewhere SIGUSR1 keeps its default action (the process ends).
/// SIGTERM asks for `sigterm` (Ctrl-C always ends the run): a restart
/// where whatever sends it starts the learner again (a pod moved by
/// Kubernetes), so that the actors wait for it instead of exiting.
pub fn stop_requested(
    sigterm: StopRequest,
) -> impl std::future::Future<Output = StopRequest> + Send {
    listen(true, sigterm)
}

/// Listens for the stop signals (and SIGUSR1 where `restart_signal`) from
/// now on, in a task of its own; resolves with the first request, that
/// of SIGTERM being `sigterm`.
fn listen(
    restart_signal: bool,
    sigterm: StopRequest,
) -> impl std::future::Future<Output = StopRequest> + Send {
    let mut signals = StopSignals::new(restart_signal, sigterm);
    let (requested, mut heard) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        // The second Ctrl-C or SIGTERM forces the exit. The parent's death
        // stops the process too but counts as neither: it comes again for
        // each of the parent's threads (see `end_with_parent`), and beside
        // the first signal when that went to the whole process group (a
        // Ctrl-C at a terminal ends an experiment runner and signals its
        // learner at once).
        let mut first_signal: Option<std::time::Instant> = None;
        loop {
            let stop = signals.next().await;
            if requested.borrow().is_none() {
                if stop == Heard::ParentGone {
                    tracing::info!("the parent process is gone: stopping");
                }
                requested.send_replace(Some(match stop {
                    Heard::Signal(request) => request,
                    Heard::ParentGone => StopRequest::EndRun,
                }));
            }
            if stop == Heard::ParentGone {
                continue;
            }
            let since_first = first_signal.map(|first| first.elapsed());
            if forces_exit(since_first) {
                break;
            }
            match since_first {
                None => first_signal = Some(std::time::Instant::now()),
                Some(_) => tracing::debug!("the stop signal again at once: the same request"),
            }
        }
        tracing::warn!("a second stop signal: exiting now, without finishing the graceful stop");
        let registry = BEFORE_FORCED_EXIT
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, cleanup) in &registry.1 {
            cleanup();
        }
        exit_now(FORCED_EXIT_STATUS);
    });
    async move {
        let heard = heard
            .wait_for(Option::is_some)
            .await
            .map(|request| *request);
        match heard {
            Ok(request) => request.unwrap_or(StopRequest::EndRun),
            // The listener is gone (the runtime is shutting down): no stop
            // will be heard.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Whether a stop signal heard `since_first` after the first one (`None`:
/// it is the first) forces the exit: a repeat within
/// [`SAME_REQUEST_WITHIN`] is the same request. (Whatever it asks: a
/// SIGTERM just after a SIGUSR1 is taken as that restart, which at least
/// writes its final checkpoint, where a forced exit would not.)
fn forces_exit(since_first: Option<std::time::Duration>) -> bool {
    since_first.is_some_and(|elapsed| elapsed >= SAME_REQUEST_WITHIN)
}

/// Ends the process without running exit handlers: `std::process::exit`
/// would run libtorch's static destructors while the trainer or rollout
/// thread may still be inside libtorch.
#[allow(unsafe_code)]
fn exit_now(status: i32) -> ! {
    // SAFETY: `_exit` takes no pointers and has no preconditions; it is
    // unsafe only as a foreign function.
    unsafe { libc::_exit(status) }
}

/// What asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// Ctrl-C ([`StopRequest::EndRun`]), SIGTERM (what it is set to
    /// ask), or SIGUSR1 where listened to ([`StopRequest::Restart`]).
    Signal(StopRequest),
    /// [`PARENT_DEATH_SIGNAL`], in a process started with
    /// [`end_with_parent`].
    ParentGone,
}

/// Ctrl-C and SIGTERM, the parent's death where it is signalled, and
/// SIGUSR1 where asked for, listened to for the life of the process.
struct StopSignals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    /// SIGUSR1, only in a learner ([`stop_requested`]): in an actor it
    /// keeps its default action.
    #[cfg(unix)]
    restart: Option<tokio::signal::unix::Signal>,
    /// Only in a process whose parent set [`PARENT_DEATH_SIGNAL`] as its
    /// parent-death signal: elsewhere that signal keeps its default
    /// action.
    #[cfg(unix)]
    parent_gone: Option<tokio::signal::unix::Signal>,
    /// What SIGTERM asks.
    #[cfg(unix)]
    sigterm: StopRequest,
}

impl StopSignals {
    fn new(restart_signal: bool, sigterm: StopRequest) -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            StopSignals {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
                restart: restart_signal
                    .then(|| signal(SignalKind::user_defined1()).ok())
                    .flatten(),
                parent_gone: parent_death_is_signalled()
                    .then(|| signal(SignalKind::from_raw(PARENT_DEATH_SIGNAL)).ok())
                    .flatten(),
                sigterm,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (restart_signal, sigterm);
            StopSignals {}
        }
    }

    /// The next Ctrl-C, SIGTERM, SIGUSR1 or parent's death (never, if none
    /// could be listened to).
    async fn next(&mut self) -> Heard {
        #[cfg(unix)]
        {
            async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            let sigterm = self.sigterm;
            tokio::select! {
                () = recv(&mut self.interrupt) => Heard::Signal(StopRequest::EndRun),
                () = recv(&mut self.terminate) => Heard::Signal(sigterm),
                () = recv(&mut self.restart) => Heard::Signal(StopRequest::Restart),
                () = recv(&mut self.parent_gone) => Heard::ParentGone,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Heard::Signal(StopRequest::EndRun)
        }
    }
}

/// Asks `child` to stop as Ctrl-C would: SIGTERM on Unix (elsewhere it is
/// killed). A child that has exited already is left alone.
pub fn ask_to_stop(child: &mut std::process::Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(child.id()) else {
            return;
        };
        // SAFETY: `kill` takes no pointers. The pid is a child of this
        // process not yet waited for (checked above), so it cannot have
        // been reused by another process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    #[cfg(not(unix))]
    let _ = child.kill();
}

/// The signal a child started with [`end_with_parent`] receives when its
/// parent dies: SIGUSR2, which nothing else sends. Not SIGTERM: the kernel
/// sends it again each time the child passes from one of the dying
/// parent's threads to the next (a learner has dozens), and SIGTERM twice
/// is the forced exit, which skips the graceful stop (a learner's final
/// checkpoint, an actor's drain). Nor SIGHUP: a shell that loses its
/// terminal sends that to the whole job, which `nohup` ignores and a
/// handler for it would not. [`shutdown_requested`] takes the first as a
/// stop and the repeats as nothing.
#[cfg(unix)]
const PARENT_DEATH_SIGNAL: i32 = libc::SIGUSR2;

/// Whether this process was started with [`end_with_parent`] (its
/// parent-death signal, kept across exec, is [`PARENT_DEATH_SIGNAL`]).
/// The setting is the main thread's own (a new thread starts without
/// one): [`shutdown_requested`] must be called on the main thread.
#[cfg(unix)]
fn parent_death_is_signalled() -> bool {
    #[cfg(target_os = "linux")]
    {
        let mut signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer,
        // which points to a live local.
        #[allow(unsafe_code)]
        let read = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) };
        read == 0 && signal == PARENT_DEATH_SIGNAL
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Makes a child process started by `command` receive
/// `PARENT_DEATH_SIGNAL` when its parent dies, however it dies (SIGKILL,
/// the OOM killer): local actors then drain and exit instead of retrying
/// a learner that is gone, for ever, and an experiment's learner saves
/// its checkpoint. Linux only (elsewhere a no-op). The signal follows the
/// thread that spawns the child: spawn from a thread that lives as long
/// as the process (a runtime worker, not a blocking-pool thread).
pub fn end_with_parent(command: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: runs in the child between fork and exec, and calls only
        // async-signal-safe functions (prctl, getppid) on no shared
        // memory.
        #[allow(unsafe_code)]
        unsafe {
            let parent = libc::getpid();
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the call: nothing will signal.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

#[cfg(test)]
mod tests {
    use super::{SAME_REQUEST_WITHIN, forces_exit};
    use std::time::Duration;

    /// The first stop signal and its repeats at once (a job system's
    /// SIGTERM to the process, then to its group) stop gracefully; one
    /// later (a second Ctrl-C) forces the exit.
    #[test]
    fn a_repeat_at_once_is_the_same_request_a_later_one_forces_the_exit() {
        assert!(!forces_exit(None));
        assert!(!forces_exit(Some(Duration::from_micros(400))));
        assert!(!forces_exit(Some(
            SAME_REQUEST_WITHIN - Duration::from_millis(1)
        )));
        assert!(forces_exit(Some(SAME_REQUEST_WITHIN)));
        assert!(forces_exit(Some(Duration::from_secs(2))));
    }
}
