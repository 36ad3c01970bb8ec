//! The local launcher: `flgfn-learner --local-actors [--actors N]` starts
//! `launch.actors` (or N) `flgfn-actor` processes on this machine, pointed
//! at this learner.
//!
//! Actors are separate processes, exactly as on a cluster; they find the
//! learner through its bound address (so `--listen 127.0.0.1:0` works) and
//! exit by themselves when training ends. Any still running when the
//! learner returns are killed, and on Linux they get SIGUSR2 if the
//! learner dies without returning (SIGKILL, out of memory), so none
//! outlive it. If every one exits while training goes on, the learner
//! stops (saving its checkpoint) with an error instead of waiting for data
//! that will not come. A learner resumed from a run that already finished
//! starts none.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use flgfn_common::config::{CONFIG_VARIABLE, Config, STDIN_PATH, env_overrides, flgfn_variables};
use flgfn_common::signals::{ForcedExitCleanup, before_forced_exit};
use flgfn_common::telemetry::{self, LOG_FORMAT_VARIABLE};

use tracing::{info, warn};

/// How long actors get to exit on their own after training ends.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// How long, once the actors have exited, their forwarded log lines get
/// to come through (a pipe's worth at most).
const FORWARDING_GRACE: Duration = Duration::from_secs(1);

/// Which actors to start next to the learner ([`crate::RunOptions`]):
/// [`serve`](crate::serve) starts them once the learner listens and knows
/// there is something to train (not for a run resumed already finished).
#[derive(Debug, Clone)]
pub struct LocalActorsPlan {
    /// How many actor processes.
    pub count: usize,
    /// The `flgfn-actor` executable ([`actor_executable`]).
    pub executable: PathBuf,
}

/// Running actor processes.
#[derive(Debug)]
pub struct LocalActors {
    /// Shared with the forced-exit cleanup.
    children: Arc<Mutex<Vec<Child>>>,
    /// Exits already logged while training went on (by process id), not
    /// logged again by [`LocalActors::finish`].
    exits_logged: Mutex<std::collections::HashSet<u32>>,
    /// The threads forwarding the actors' log lines (with a live line):
    /// [`LocalActors::finish`] waits for their last lines.
    forwarders: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Kills the actors if a second stop signal ends the learner at once
    /// (sent to the learner alone, not to its process group, they would
    /// outlive it).
    _on_forced_exit: ForcedExitCleanup,
}

/// Kills and reaps every child still running.
fn kill_all(children: &Mutex<Vec<Child>>) {
    for child in children
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter_mut()
    {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The name local actor `i` goes by (`--name`), in its lines and in the
/// learner's about it.
fn local_actor_name(i: usize) -> String {
    format!("local-{i}")
}

/// Writes each line a local actor logs as the learner writes its own
/// (above its live line), on a thread that ends with the actor's output.
fn forward_log_lines(
    stderr: std::process::ChildStderr,
    actor: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("local-{actor}-log"))
        .spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while reader
                .read_until(b'\n', &mut line)
                .is_ok_and(|read| read > 0)
            {
                telemetry::write_log_line(&line);
                line.clear();
            }
        })
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start a thread for local actor {actor}'s log: {e}"),
            )
        })
}

/// The `flgfn-actor` executable next to the running learner.
pub fn actor_executable() -> std::io::Result<PathBuf> {
    let actor = actor_beside(&std::env::current_exe()?);
    if actor.exists() {
        Ok(actor)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} not found: build both binaries (cargo build --release)",
                actor.display()
            ),
        ))
    }
}

/// Where the `flgfn-actor` built with the learner at `learner` is: beside
/// it, as cargo builds them.
pub fn actor_beside(learner: &std::path::Path) -> PathBuf {
    learner.with_file_name(format!("flgfn-actor{}", std::env::consts::EXE_SUFFIX))
}

impl LocalActors {
    /// Starts `count` actors that connect to `address`, each with its own
    /// seed offset, sharing the learner's effective configuration.
    ///
    /// They read it, as TOML, from their standard input (`--config -`)
    /// rather than from the learner's file: the learner's flags and
    /// variables are in it (its `--seed`; its `--actors` over a file's
    /// `launch.actors = 0`, which an actor would refuse), and no copy of
    /// it is left on disk. The variables that set configuration keys are
    /// taken out of their environment, or they would apply again over the
    /// learner's flags; the others (`FLGFN_TOKEN`) stay, and
    /// `FLGFN_LOG_FORMAT` is set to the learner's log format. With a live
    /// line (a terminal), their log lines go through the learner, above it.
    pub fn spawn(
        count: usize,
        address: SocketAddr,
        config: &Config,
        executable: &Path,
    ) -> std::io::Result<Self> {
        let config_text = config.to_toml();
        // What they will read must parse back to this configuration (a
        // value TOML cannot hold would leave every actor failing).
        let differs = match Config::from_toml(&config_text, "the local actors' configuration") {
            Ok(read) if read == *config => None,
            Ok(_) => Some("it reads back changed".to_owned()),
            Err(error) => Some(error.to_string()),
        };
        if let Some(why) = differs {
            return Err(std::io::Error::other(format!(
                "the learner's configuration does not read back from TOML ({why}); start the actors by hand with --config FILE"
            )));
        }
        let config_variables: Vec<String> = env_overrides(
            flgfn_variables().map_err(|error| std::io::Error::other(error.to_string()))?,
        )
        .into_iter()
        .map(|o| o.variable)
        .chain([CONFIG_VARIABLE.to_owned()])
        .collect();
        let children = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let on_forced_exit = before_forced_exit({
            let children = children.clone();
            move || kill_all(&children)
        });
        let actors = LocalActors {
            children,
            exits_logged: Mutex::default(),
            forwarders: Mutex::default(),
            _on_forced_exit: on_forced_exit,
        };
        let url = local_url(address);
        for i in 0..count {
            let mut command = Command::new(executable);
            command
                .arg("--learner")
                .arg(&url)
                .arg("--seed-offset")
                .arg(i.to_string())
                .arg("--name")
                .arg(local_actor_name(i))
                .args(["--config", STDIN_PATH])
                .stdin(Stdio::piped());
            for variable in &config_variables {
                command.env_remove(variable);
            }
            // The learner's format, set by flag or variable: one log
            // collector reads both.
            command.env(LOG_FORMAT_VARIABLE, telemetry::log_format().as_str());
            // Their lines go above the learner's live line, not into it.
            // (In colour, as on the terminal, unless NO_COLOR, which they
            // inherit, says otherwise.)
            if telemetry::has_live_line() {
                command
                    .stderr(Stdio::piped())
                    .env(telemetry::COLOUR_FORCE_VARIABLE, "1");
            }
            // A learner killed outright (SIGKILL, out of memory) takes them
            // along: no Drop runs then.
            flgfn_common::signals::end_with_parent(&mut command);
            let mut child = command.spawn()?;
            // Later lines name an actor by process id.
            info!(actor = %local_actor_name(i), pid = child.id(), "local actor started");
            let forwarded = match child.stderr.take() {
                Some(stderr) => forward_log_lines(stderr, i).map(|thread| {
                    actors
                        .forwarders
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(thread);
                }),
                None => Ok(()),
            };
            // A few kilobytes: the pipe takes them without the actor
            // reading, and closing it ends the actor's input.
            let written = child
                .stdin
                .take()
                .map_or(Ok(()), |mut stdin| stdin.write_all(config_text.as_bytes()));
            actors
                .children
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(child);
            written.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot hand local actor {i} its configuration: {e}"),
                )
            })?;
            forwarded?;
        }
        info!(count, %url, "started local actors");
        Ok(actors)
    }

    /// The actors that have exited (their number, as in `local-N`,
    /// process id and status), and whether that is every one.
    pub fn exits(&self) -> (Vec<(usize, u32, ExitStatus)>, bool) {
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        let exited: Vec<_> = children
            .iter_mut()
            .enumerate()
            .filter_map(|(i, child)| Some((i, child.id(), child.try_wait().ok()??)))
            .collect();
        let all = !exited.is_empty() && exited.len() == children.len();
        (exited, all)
    }

    /// Asks every actor still running to stop (as Ctrl-C would): after a
    /// stop for a restart they wait for a learner that will not come back
    /// for them (one started again starts its own).
    pub fn ask_to_stop(&self) {
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        info!(
            count = children.len(),
            "asking the local actors to stop: the learner started again starts its own"
        );
        for child in children.iter_mut() {
            flgfn_common::signals::ask_to_stop(child);
        }
    }

    /// Logs each of `exited` ([`LocalActors::exits`]) not logged before,
    /// as an exit while training goes on.
    pub fn log_exits_while_training(&self, exited: &[(usize, u32, ExitStatus)]) {
        let mut logged = self
            .exits_logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, pid, status) in exited {
            if logged.insert(*pid) {
                // Named as its lines and its `local actor started` are.
                warn!(actor = %local_actor_name(*i), pid, %status, "a local actor exited while training goes on");
            }
        }
    }

    /// Waits for the actors to exit, killing any left after a grace period.
    /// Returns how many exited with an error (logging those not logged
    /// already).
    pub fn finish(self) -> usize {
        let deadline = Instant::now() + EXIT_GRACE;
        let mut failed = 0;
        // Locked for a moment at a time: a forced exit must not wait out
        // the grace period to kill them.
        let children = || self.children.lock().unwrap_or_else(PoisonError::into_inner);
        let count = children().len();
        for i in 0..count {
            let status = loop {
                // Polled outside the match: a guard in its scrutinee would
                // be held through the sleep below.
                let polled = children()[i].try_wait();
                match polled {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => break None,
                }
            };
            let mut children = children();
            let child = &mut children[i];
            match status {
                Some(status) if status.success() => {}
                Some(status) => {
                    let logged = self
                        .exits_logged
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .contains(&child.id());
                    if !logged {
                        warn!(actor = %local_actor_name(i), pid = child.id(), %status, "local actor failed");
                    }
                    failed += 1;
                }
                None => {
                    warn!(actor = %local_actor_name(i), pid = child.id(), "local actor still running; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        children().clear();
        // Their last lines (an error, a summary) before the learner's.
        let forwarders = std::mem::take(
            &mut *self
                .forwarders
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let deadline = Instant::now() + FORWARDING_GRACE;
        while forwarders.iter().any(|thread| !thread.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for thread in forwarders.into_iter().filter(|thread| thread.is_finished()) {
            let _ = thread.join();
        }
        failed
    }
}

impl Drop for LocalActors {
    /// On an early return (an error in the learner), leave no orphans.
    fn drop(&mut self) {
        kill_all(&self.children);
    }
}

/// Where actors on this machine reach a learner listening on `address`: a
/// listener on every address (0.0.0.0, [::]) through the loopback of its
/// own family (a [::] listener may not take IPv4 where IPv6 sockets are
/// IPv6 only).
fn local_url(address: SocketAddr) -> String {
    let port = address.port();
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("http://127.0.0.1:{port}"),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("http://[::1]:{port}"),
        IpAddr::V4(ip) => format!("http://{ip}:{port}"),
        IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
    }
}

#[cfg(test)]
mod url_tests {
    use super::local_url;

    #[test]
    fn local_actors_reach_every_kind_of_listener_through_its_own_family() {
        let url = |address: &str| local_url(address.parse().unwrap());
        assert_eq!(url("0.0.0.0:50051"), "http://127.0.0.1:50051");
        assert_eq!(url("[::]:50051"), "http://[::1]:50051");
        assert_eq!(url("127.0.0.1:7"), "http://127.0.0.1:7");
        assert_eq!(url("10.1.2.3:7"), "http://10.1.2.3:7");
        assert_eq!(url("[::1]:7"), "http://[::1]:7");
        assert_eq!(url("[fe80::1]:7"), "http://[fe80::1]:7");
    }
}
