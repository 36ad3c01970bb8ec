//! One connection to the learner: the handshake, then the Session stream,
//! until training ends or the connection breaks.
//!
//! Grants come in on the Session stream: each credit becomes an
//! [`Order`] for the rollout worker, with the weights that came with that
//! grant (or the newest before it). Chunks from the worker go out on the
//! same stream. The caller ([`crate::run`]) reconnects with backoff when a
//! session ends with [`SessionError::Retry`]; a refusal
//! ([`SessionError::Refused`]) is final, since retrying cannot fix a
//! mismatched task or a malformed chunk, and so is a fault found on this
//! side ([`SessionError::Fatal`]: a learner URL that cannot be used, a
//! chunk larger than the learner takes).
//!
//! Asked to stop, a session drains: no new rollout starts, the one in
//! progress finishes, every chunk rolled out is sent, and the upload is
//! closed; the learner takes them all before it ends the session.
//!
//! # Layout
//!
//! - `open.rs`: the channel, the token and the handshake, up to an open
//!   session;
//! - `serve.rs`: grants to orders, chunks out, and the drain;
//! - `status.rs`: what a status means to the actor (retry, refusal, fault);
//! - `tls.rs`: TLS mistakes told apart.

mod open;
mod serve;
mod status;
#[cfg(test)]
mod tests;
mod tls;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use flgfn_common::auth::Token;
use flgfn_common::env::TaskSpec;
use flgfn_common::policy::ModelSpec;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::info;

use crate::worker::{Order, SampledChunk};

pub(crate) use tls::answers_as_tls;

pub(crate) use status::{not_http2, status_causes};
pub(crate) use tls::tls_mistake;

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The learner sent its final weights: training is over.
    TrainingDone,
    /// The learner stops to be started again on its checkpoint (SIGUSR1):
    /// reconnect, with backoff, to the learner started again.
    LearnerRestarting,
    /// The rollout worker stopped mid-session: it failed (weights it
    /// could not load) or panicked, and the actor leaves with its error.
    WorkerStopped,
    /// The actor was asked to stop; the chunks it had rolled out were sent.
    Stopped,
    /// The actor was asked to stop, and the session ended (the
    /// connection broke, or the learner did not answer in time; why)
    /// before the learner ended it: the chunks on their way may not have
    /// arrived. Nothing is left to retry with: the actor leaves, saying
    /// so where the session had sent any.
    StoppedUnconfirmed(String),
}

/// How a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The learner refused this actor or its data; retrying cannot help.
    #[error("the learner refused this actor: {}", .0.message())]
    Refused(Status),
    /// Something on this side, or in what the learner sent, that no
    /// retry can fix (a URL that cannot be used, a chunk too large to
    /// send, a learner breaking the protocol).
    #[error("{0}")]
    Fatal(String),
    /// The connection failed or broke; worth another try. `served` says
    /// whether the learner served this session first (which resets
    /// backoff).
    #[error("{message}")]
    Retry {
        /// What happened.
        message: String,
        /// Whether the learner answered this session after one of its
        /// chunks went out (a grant that came after it): a handshake alone
        /// is not enough, or a learner that accepts handshakes but refuses
        /// sessions (all its places taken) would be retried at the
        /// shortest backoff forever; nor is a grant before any chunk, or
        /// an actor whose rollouts outlast `learner.stall_timeout_s` (cut
        /// before its first chunk, every session) would be; nor a chunk
        /// sent and then cut off with the session, every session.
        served: bool,
        /// The peer answered with something that is not HTTP/2: a server
        /// of another protocol, or a TLS learner answering plain text with
        /// a TLS alert (the actor then checks which, see
        /// `answers_as_tls`).
        not_http2: bool,
    },
}

/// What a session needs from the actor.
pub struct Session<'a> {
    /// Learner URL.
    pub url: &'a str,
    /// HTTP/2 ping interval (`actor.keepalive_s`).
    pub keepalive: Duration,
    /// The `rolling out` log line's clock, across sessions.
    pub progress: &'a mut ProgressLine,
    /// Shown in the learner's logs.
    pub actor_name: &'a str,
    /// Sent at the handshake.
    pub task: &'a TaskSpec,
    /// Sent at the handshake.
    pub model: &'a ModelSpec,
    /// Trajectories per chunk, declared at the handshake.
    pub envs: usize,
    /// `actor.truncate_fraction`: compared with the learner's objective
    /// (one that drops truncated trajectories wastes them).
    pub truncate_fraction: f64,
    /// Largest gRPC message either way.
    pub max_message_bytes: usize,
    /// Chunks from the rollout worker.
    pub chunks: &'a mut mpsc::Receiver<SampledChunk>,
    /// Orders to the rollout worker, one per credit.
    pub orders: &'a mpsc::Sender<Order>,
    /// The session the worker serves; set here once the handshake is done.
    pub current_session: &'a AtomicU32,
    /// Counters across sessions.
    pub counts: &'a mut Counts,
    /// Actor id of the latest session opened.
    pub actor_id: &'a mut u64,
    /// Whether to open sessions in one call, the handshake in the
    /// Session's headers; cleared for good once the learner turns out to
    /// predate that.
    pub handshake_in_session: &'a mut bool,
    /// Number of this session (1, 2, ...), stamped on received weights.
    pub session: u32,
    /// The bearer token shown on every call, if the learner wants one.
    pub token: Option<&'a Token>,
    /// TLS settings for an `https://` learner.
    pub tls: Option<&'a tonic::transport::ClientTlsConfig>,
}

/// The `rolling out` line's clock (every `actor.progress_log_s`), kept
/// across sessions: an actor whose sessions are shorter than that (a proxy
/// that cuts idle streams, a learner restarted often) still logs it, and
/// "since the last line" means since the last line, not since the session
/// began.
#[derive(Debug)]
pub struct ProgressLine {
    interval: Option<tokio::time::Interval>,
    chunks_at_last_line: u64,
}

impl ProgressLine {
    /// The first line one interval from now; none where `every` is None.
    pub fn new(every: Option<Duration>) -> Self {
        let interval = every.map(|every| {
            let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            // Lines missed between sessions are not made up in a burst.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            interval
        });
        ProgressLine {
            interval,
            chunks_at_last_line: 0,
        }
    }

    /// Resolves when the next line is due (never where there are none).
    async fn due(&mut self) {
        match self.interval.as_mut() {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Logs the line.
    fn log(&mut self, counts: &Counts, policy_version: Option<u64>) {
        info!(
            chunks_sent = counts.chunks_sent,
            chunks_since_last_line = counts.chunks_sent - self.chunks_at_last_line,
            versions_received = counts.versions_received,
            policy_version,
            "rolling out"
        );
        self.chunks_at_last_line = counts.chunks_sent;
    }
}

/// What the connection counted, across sessions.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Chunks handed to gRPC. Streams have no per-message acknowledgement:
    /// chunks in flight when a connection breaks are lost, and show as
    /// gaps in `sequence`.
    pub chunks_sent: u64,
    /// Transitions in them.
    pub transitions_sent: u64,
    /// Credits received.
    pub credits: u64,
    /// Weight versions received.
    pub versions_received: u64,
    /// Chunks rolled out but not sent: their credit belonged to an earlier
    /// session, or their session broke before they could be sent.
    pub stale_chunks_dropped: u64,
    /// Sessions the learner opened (handshake and session call both
    /// answered): what reconnects achieved, where attempts count tries.
    pub sessions_opened: u32,
}

impl Session<'_> {
    /// Runs one connection to its end, or until `shutdown` resolves (then
    /// drains, and ends with [`SessionEnd::Stopped`], or with how the
    /// drain ended: training done, the worker stopped, a refusal, the
    /// session ended without the learner's word
    /// ([`SessionEnd::StoppedUnconfirmed`]). Once
    /// `shutdown` has resolved, never [`SessionError::Retry`] or
    /// [`SessionEnd::LearnerRestarting`], which would have the caller
    /// poll it again).
    pub async fn run<S: Future<Output = ()>>(
        mut self,
        mut shutdown: Pin<&mut S>,
    ) -> Result<SessionEnd, SessionError> {
        let opened = tokio::select! {
            opened = self.open() => opened,
            () = shutdown.as_mut() => return Ok(SessionEnd::Stopped),
        };
        let opened = match opened {
            // A TLS learner answers plain text with an alert, which HTTP/2
            // reads as a frame too large: retried, that would fail the
            // same way for ever.
            Err(
                error @ SessionError::Retry {
                    not_http2: true, ..
                },
            ) if self.tls.is_none() => {
                let tls = tokio::select! {
                    tls = answers_as_tls(self.url) => tls,
                    () = shutdown.as_mut() => return Ok(SessionEnd::Stopped),
                };
                return Err(if tls {
                    SessionError::Fatal(format!(
                        "the learner at {} serves TLS: give actor.learner as https://, and tls.ca_file the CA that signed its certificate",
                        self.url
                    ))
                } else {
                    error
                });
            }
            other => other?,
        };
        let mut stopping = false;
        match self.serve(opened, shutdown, &mut stopping).await {
            // Once stopping, the caller must not wait on `shutdown` again
            // (it resolved), which it would before a reconnect.
            Err(error) if stopping => serve::unconfirmed_unless_refused(error),
            other => other,
        }
    }
}
