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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flgfn_common::auth::{AUTHORIZATION_HEADER, Token};
use flgfn_common::env::TaskSpec;
use flgfn_common::policy::ModelSpec;
use flgfn_common::telemetry::with_causes;
use flgfn_common::weights::WeightEncoding;
use flgfn_common::wire::proto::{self, learner_client::LearnerClient};
use flgfn_common::wire::{
    ACTOR_ID_HEADER, FINAL_REFUSAL_HEADER, HANDSHAKE_HEADER, HANDSHAKE_REPLY_HEADER,
    MAX_HANDSHAKE_HEADER_BYTES, PROTOCOL_VERSION, SESSION_KEY_HEADER,
    TRAJECTORIES_PER_CHUNK_HEADER,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::worker::{FLUSH_SESSION, Order, SampledChunk, Weights};

/// The smallest HTTP/2 receive window per stream of an actor (twice that
/// per connection): the default network's weights (0.36 MB in f32) ten
/// times over.
const MIN_STREAM_WINDOW: u32 = 4 << 20;

/// The most bytes this actor's weights take in a grant: in f32 (the
/// larger encoding), with their safetensors header, as the learner bounds
/// its own.
fn f32_weight_bytes(model: &ModelSpec, task: &TaskSpec) -> u128 {
    model.weight_bytes(WeightEncoding::F32, &model.weight_metadata(task))
}

/// The actor's HTTP/2 receive window per stream for weights of
/// `weight_bytes`: room for them, so that a grant comes in one round trip
/// whatever the network's size; at most 1 GiB (the connection's, twice
/// that, must stay under HTTP/2's 2^31 - 1).
fn stream_window(weight_bytes: u128) -> u32 {
    u32::try_from(weight_bytes)
        .unwrap_or(u32::MAX)
        .clamp(MIN_STREAM_WINDOW, 1 << 30)
}

/// The decode limit for grants: this actor's own limit, raised to take
/// `grants` bytes (weights the learner sends, whatever the actor's own
/// file says); gRPC frames a message in at most 4 GiB.
fn grant_decode_limit(own: usize, grants: u128) -> usize {
    own.max(usize::try_from(grants).unwrap_or(usize::MAX))
        .min(u32::MAX as usize)
}

/// Chunks queued towards the learner. Credits bound them; the session
/// never waits to queue one, so it always keeps reading grants (a session
/// blocked on its upload while the learner waits for it to read a grant
/// would deadlock once both HTTP/2 windows fill).
const UPLOAD_BUFFER: usize = 4096;

/// A learner that accepts the connection but never answers is as good as
/// gone.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping actor waits for its rollout in progress, and then
/// for the learner to take the last chunks, before it leaves without them
/// (a rollout still running is then abandoned at its next lockstep step).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The learner sent its final weights: training is over.
    TrainingDone,
    /// The learner stops to be started again on its checkpoint (SIGUSR1):
    /// reconnect, with backoff, to the learner started again.
    LearnerRestarting,
    /// The rollout worker stopped (the actor is shutting down).
    WorkerStopped,
    /// The actor was asked to stop; the chunks it had rolled out were sent.
    Stopped,
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
        /// Whether this session sent a chunk: a handshake alone is not
        /// enough, or a learner that accepts handshakes but refuses
        /// sessions (all its places taken) would be retried at the
        /// shortest backoff forever; nor is a grant, or an actor whose
        /// rollouts outlast `learner.stall_timeout_s` (cut before its
        /// first chunk, every session) would be.
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
    /// `actor.truncate_fraction`: checked against the learner's objective
    /// (one that drops truncated trajectories would waste them).
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

fn retry(message: impl Into<String>, served: bool) -> SessionError {
    SessionError::Retry {
        message: message.into(),
        served,
        not_http2: false,
    }
}

/// [`retry`] for a peer that answered with something that is not HTTP/2,
/// before any session.
fn retry_not_http2(message: String) -> SessionError {
    SessionError::Retry {
        message,
        served: false,
        not_http2: true,
    }
}

/// The first bytes of the HTTP/2 client preface, which is what a plain-text
/// client sends first: a TLS server reads them as a record header of an
/// unknown type, and answers with an alert. Exactly one record header
/// long, so the server reads all of it and its close cannot reset the
/// connection under its alert.
const PLAIN_TEXT_PROBE: &[u8; 5] = b"PRI *";

/// Whether the server at `url`'s host and port answers plain text as a TLS
/// server does: with an alert record (content type 21, version 3.x). Asked
/// once an `http://` address answered with something that is not HTTP/2,
/// to name the fix rather than retry for ever. False for anything else
/// (no answer in [`TLS_PROBE_TIMEOUT`], a closed connection, other bytes).
async fn answers_as_tls(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(authority) = url
        .parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|uri| Some(format!("{}:{}", uri.host()?, uri.port_u16().unwrap_or(80))))
    else {
        return false;
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        stream.write_all(PLAIN_TEXT_PROBE).await.ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        Some(head == [TLS_ALERT_RECORD, 3])
    };
    matches!(
        tokio::time::timeout(TLS_PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// How long the TLS probe waits for its alert: a TLS server answers the
/// probe's record header within a round trip, while another server may
/// wait for more (an HTTP/1 server for the end of its line: each attempt
/// at a web server took 10 s with the handshake's timeout here).
const TLS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A TLS record's first byte when it is an alert.
const TLS_ALERT_RECORD: u8 = 0x15;

/// Alerts by which a TLS server refuses its client's certificate.
const CERTIFICATE_REFUSED: [rustls::AlertDescription; 7] = {
    use rustls::AlertDescription as Alert;
    [
        Alert::CertificateRequired,
        Alert::BadCertificate,
        Alert::UnknownCA,
        Alert::CertificateUnknown,
        Alert::CertificateExpired,
        Alert::CertificateRevoked,
        Alert::UnsupportedCertificate,
    ]
};

/// What is wrong with TLS (a certificate, or no TLS at all), among an
/// error's causes.
#[derive(Debug, Clone, Copy)]
enum CertificateTrouble {
    /// No retry can fix it: the learner's certificate failed this actor's
    /// checks (but for its dates), or the learner refused this actor's
    /// certificate (mutual TLS). Says what to fix.
    Final(&'static str),
    /// The learner's certificate is out of date: it may be given a new
    /// one, or this clock set (at boot, before time sync). Retried.
    OutOfDate,
}

impl CertificateTrouble {
    /// What a retried connection error says first ("" when the trouble,
    /// if any, is not the certificate).
    fn retry_prefix(trouble: Option<Self>) -> &'static str {
        match trouble {
            Some(CertificateTrouble::OutOfDate) => {
                "tls: the learner's certificate is out of date (expired, or not yet valid by this machine's clock); retrying: "
            }
            _ => "",
        }
    }
}

/// The certificate trouble among `error`'s causes, if any.
fn certificate_trouble(error: &(dyn std::error::Error + 'static)) -> Option<CertificateTrouble> {
    use CertificateTrouble::{Final, OutOfDate};
    use rustls::{CertificateError, Error as TlsError};
    const NOT_FOR_THIS_NAME: &str =
        "the learner's certificate is not for this name: set tls.domain to a name it carries";
    const NOT_ACCEPTED: &str =
        "the learner's certificate was not accepted: tls.ca_file must hold the CA that signed it";
    const REFUSED: &str = "the learner refused this client's certificate (mutual TLS): tls.cert_file and tls.key_file must hold one signed by the CA of the learner's tls.ca_file";
    const A_CA: &str = "the learner's certificate is a CA certificate (CA:TRUE, as `openssl req -x509` makes by default): give the learner one signed by a CA, and the actors that CA (see the README's recipe)";
    const NOT_TLS: &str = "the learner does not speak TLS at this address: use http://, or give the learner tls.cert_file and tls.key_file";
    let mut cause = Some(error);
    while let Some(current) = cause {
        // An io::Error leaves the error it wraps out of the sources; and
        // an alert that arrives after the handshake (TLS 1.3 checks the
        // client's certificate then) reaches here through HTTP/2 as the
        // alert's text only.
        let wrapped = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        let tls = current
            .downcast_ref::<TlsError>()
            .or_else(|| wrapped?.downcast_ref::<TlsError>());
        match tls {
            Some(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => return Some(Final(NOT_FOR_THIS_NAME)),
            Some(TlsError::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            )) => return Some(OutOfDate),
            // (webpki's reason travels as an opaque error: by its name.)
            Some(TlsError::InvalidCertificate(CertificateError::Other(other)))
                if format!("{other:?}").contains("CaUsedAsEndEntity") =>
            {
                return Some(Final(A_CA));
            }
            Some(TlsError::InvalidCertificate(_)) => return Some(Final(NOT_ACCEPTED)),
            // A plain-text server's first bytes, read as a TLS record.
            Some(TlsError::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                return Some(Final(NOT_TLS));
            }
            Some(TlsError::AlertReceived(alert)) if CERTIFICATE_REFUSED.contains(alert) => {
                return Some(Final(REFUSED));
            }
            Some(_) => {}
            None => {
                if let Some(text) = wrapped.map(ToString::to_string)
                    && CERTIFICATE_REFUSED
                        .iter()
                        .any(|&alert| TlsError::AlertReceived(alert).to_string() == text)
                {
                    return Some(Final(REFUSED));
                }
            }
        }
        cause = current.source();
    }
    None
}

/// A TLS set-up mistake among `error`'s causes that no retry can mend,
/// saying what to fix (in the actor's configuration keys).
pub(crate) fn tls_mistake(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    match certificate_trouble(error) {
        Some(CertificateTrouble::Final(problem)) => Some(problem),
        _ => None,
    }
}

/// A call the learner did not answer within [`HANDSHAKE_TIMEOUT`]: worth
/// another try (a learner loading its checkpoint holds calls until it
/// serves).
fn no_answer(call: &str) -> SessionError {
    retry(
        format!(
            "no answer to the {call} call in {HANDSHAKE_TIMEOUT:?} (a learner loading its checkpoint answers once it serves)"
        ),
        false,
    )
}

/// Refusals are final, and so are certificates refused either way;
/// anything else (unavailable, reset, a full learner, ...) is retried,
/// unless the learner marked it final.
fn classify(status: Status, served: bool) -> SessionError {
    if status.metadata().contains_key(FINAL_REFUSAL_HEADER) {
        return SessionError::Refused(status);
    }
    let trouble = certificate_trouble(&status);
    if let Some(CertificateTrouble::Final(problem)) = trouble {
        // (A Status prints its source's Debug form: the causes read better.)
        let causes = status_causes(&status);
        return SessionError::Fatal(format!("tls: {problem} ({causes})"));
    }
    match status.code() {
        Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated => SessionError::Refused(status),
        // A message over a size limit (weights larger than this actor
        // takes, or a chunk larger than the learner takes) would be over
        // it again on every retry. A refusal that names its key (the
        // learner's learner.max_chunk_trajectories) is left as it is.
        Code::OutOfRange if status.message().contains("learner.") => SessionError::Refused(status),
        Code::OutOfRange => SessionError::Refused(Status::out_of_range(format!(
            "{} (learner.max_message_bytes of the side that refused it)",
            status.message()
        ))),
        // A gRPC server without flgfn's Learner service (another program
        // on that port): retrying, by default for ever, would hide it.
        Code::Unimplemented => SessionError::Refused(Status::unimplemented(format!(
            "{} (is actor.learner the address of a flgfn learner?)",
            status.message()
        ))),
        // The learner cut a session that sent nothing for its stall
        // timeout: rollouts slower than that would be cut every time.
        Code::DeadlineExceeded if !served => retry(
            format!(
                "{} (no chunk of this actor reached the learner in time: if one rollout of actor.envs environments takes longer than learner.stall_timeout_s, lower actor.envs)",
                status.message()
            ),
            served,
        ),
        // What answers before any session is not an HTTP/2 server (a web
        // server on that port, whose HTTP/1 reply reads as a frame too
        // large). Maybe passing, so retried, but saying what to check.
        _ if !served && not_http2(&status) => retry_not_http2(format!(
            "{}: {} (is actor.learner the address of a flgfn learner, with http:// or https:// as it serves?)",
            status.code(),
            status_causes(&status)
        )),
        _ => retry(
            format!(
                "{}{}: {}",
                CertificateTrouble::retry_prefix(trouble),
                status.code(),
                status_causes(&status)
            ),
            served,
        ),
    }
}

/// Why a call failed: a status the transport made says only "transport
/// error", and keeps why in its source.
pub(crate) fn status_causes(status: &Status) -> String {
    std::error::Error::source(status).map_or_else(|| status.message().to_owned(), with_causes)
}

/// Whether HTTP/2 itself found the peer breaking the protocol (it closed
/// the connection over an error it detected), rather than the peer going
/// away (an I/O error) or refusing something.
pub(crate) fn not_http2(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(current) = cause {
        if let Some(http2) = current.downcast_ref::<h2::Error>() {
            return http2.is_go_away() && http2.is_library();
        }
        cause = current.source();
    }
    false
}

impl Session<'_> {
    /// Adds the bearer token, if any, to a call's metadata.
    fn authorize(&self, metadata: &mut tonic::metadata::MetadataMap) -> Result<(), SessionError> {
        if let Some(token) = self.token {
            let value = token.header_value().parse().map_err(|_| {
                SessionError::Fatal("auth: the token cannot travel in a header".to_owned())
            })?;
            metadata.insert(AUTHORIZATION_HEADER, value);
        }
        Ok(())
    }

    /// Whether the learner answers the open health check, which carries
    /// no token: only a server speaking plain HTTP/2 does.
    async fn speaks_plain_http2(
        &self,
        channel: &tonic::transport::Channel,
    ) -> Result<(), SessionError> {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let check = health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, check).await {
            Err(_) => Err(retry(
                format!(
                    "{}: no answer to the health check in {HANDSHAKE_TIMEOUT:?}",
                    self.url
                ),
                false,
            )),
            // Serving or not, or any status the peer sent (a gRPC server
            // without the health service, a proxy that wants the token
            // everywhere): it speaks HTTP/2, and the handshake may go.
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) if std::error::Error::source(&status).is_none() => Ok(()),
            // No answer at all: the transport failed.
            Ok(Err(status)) => {
                let foreign = not_http2(&status);
                let why = if foreign {
                    "it does not speak plain HTTP/2: is actor.learner a flgfn learner? If it serves TLS, use https:// and tls.ca_file"
                } else {
                    "no HTTP/2 answer yet (a learner restarting or full; or one serving TLS: then use https:// and tls.ca_file)"
                };
                let message = format!(
                    "{}: {} (the token was not sent to {}: {why})",
                    status.code(),
                    status_causes(&status),
                    self.url
                );
                Err(if foreign {
                    retry_not_http2(message)
                } else {
                    retry(message, false)
                })
            }
        }
    }

    /// Runs one connection to its end, or until `shutdown` resolves (then
    /// drains, and ends with [`SessionEnd::Stopped`], or with how the
    /// drain ended: training done, the worker stopped, a refusal. Once
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
            Err(SessionError::Retry { .. }) if stopping => Ok(SessionEnd::Stopped),
            other => other,
        }
    }

    /// Connects, shakes hands and opens the Session stream: in one call
    /// where the learner takes the handshake in the Session's headers, in
    /// two (Handshake, then Session) where it predates that or the
    /// handshake is too large for a header.
    async fn open(&mut self) -> Result<Opened, SessionError> {
        let weight_bytes = f32_weight_bytes(self.model, self.task);
        let window = stream_window(weight_bytes);
        let endpoint = Endpoint::from_shared(self.url.to_owned())
            .map_err(|e| SessionError::Fatal(format!("actor.learner ({}): {e}", self.url)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // What comes this way (grants, weights) comes only as asked
            // for, so the receive windows can be wide from the start, as
            // wide as the weights: an adaptive window starts at 64 KiB and
            // grows over round trips (to 16 MiB at most), which behind a
            // slow link took the first weights three of them (the
            // start-up behind 25 ms each way: 0.43 s, 0.32 s with these).
            // A window allocates nothing. The learner's windows, for the
            // chunks, stay adaptive.
            .http2_adaptive_window(false)
            .initial_stream_window_size(window)
            .initial_connection_window_size(2 * window)
            // Notice a learner host that vanished without closing the
            // connection (power loss, partition) and reconnect.
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive * 2)
            .keep_alive_while_idle(true);
        let endpoint = match self.tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| SessionError::Fatal(format!("tls: {}", with_causes(&e))))?,
            None => endpoint,
        };
        // `connect_timeout` bounds the TCP connect only: a learner whose
        // kernel accepts but whose process is frozen would hold the TLS
        // handshake forever.
        let channel = tokio::time::timeout(HANDSHAKE_TIMEOUT, endpoint.connect())
            .await
            .map_err(|_| {
                retry(
                    format!(
                        "cannot connect to {}: no answer in {HANDSHAKE_TIMEOUT:?}",
                        self.url
                    ),
                    false,
                )
            })?
            .map_err(|e| match certificate_trouble(&e) {
                Some(CertificateTrouble::Final(problem)) => SessionError::Fatal(format!(
                    "tls: {problem} (connecting to {}: {})",
                    self.url,
                    with_causes(&e)
                )),
                trouble => retry(
                    format!(
                        "{}cannot connect to {}: {}",
                        CertificateTrouble::retry_prefix(trouble),
                        self.url,
                        with_causes(&e)
                    ),
                    false,
                ),
            })?;
        // A token over plain text goes out only once the address has
        // answered as plain HTTP/2: an http:// address of a TLS learner
        // would otherwise be sent it in clear on every retry.
        if self.tls.is_none() && self.token.is_some() {
            self.speaks_plain_http2(&channel).await?;
        }
        let client = LearnerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        let handshake = proto::HandshakeRequest {
            protocol_version: PROTOCOL_VERSION,
            actor_name: self.actor_name.to_owned(),
            task: Some(self.task.into()),
            model: Some(self.model.into()),
            trajectories_per_chunk: u32::try_from(self.envs).unwrap_or(u32::MAX),
        };
        // An actor that truncates every trajectory learns whether the
        // learner would drop them all before it opens a session: two calls.
        let in_one_call = if *self.handshake_in_session
            && handshake.encoded_len() <= MAX_HANDSHAKE_HEADER_BYTES
            && self.truncate_fraction < 1.0
        {
            let opened = self
                .session_shaking_hands(client.clone(), &handshake, weight_bytes)
                .await?;
            // A learner that predates it is not asked again on reconnects:
            // each try costs a round trip, and a refusal in its counts.
            *self.handshake_in_session = opened.is_some();
            opened
        } else {
            None
        };
        let (reply, grants, upload) = match in_one_call {
            Some(opened) => {
                self.check_truncation(&opened.0)?;
                opened
            }
            None => self.handshake_then_session(client, handshake).await?,
        };
        let as_size = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
        // Never send more than the learner accepts (the chunks are
        // checked against it before they go); 0 says nothing, as in
        // `max_grant_bytes` (every chunk would be over it).
        let learner_max = match reply.max_message_bytes {
            0 => usize::MAX,
            bytes => as_size(bytes),
        };
        let max_bytes = self.max_message_bytes.min(learner_max);
        // Named in the error of a chunk over it: the fix is in one file.
        let max_bytes_of = if self.max_message_bytes < learner_max {
            "this actor's learner.max_message_bytes"
        } else {
            "the learner's learner.max_message_bytes"
        };
        let actor_id = reply.actor_id;
        *self.actor_id = actor_id;
        flgfn_common::telemetry::record_latest(&tracing::Span::current(), "actor_id", actor_id);
        // From now on only this session's orders are rolled out.
        self.current_session.store(self.session, Ordering::Release);
        info!(
            actor_id,
            version = reply.version,
            url = self.url,
            build = crate::BUILD,
            "connected to the learner"
        );
        self.counts.sessions_opened += 1;
        Ok(Opened {
            grants,
            upload,
            actor_id,
            max_bytes,
            max_bytes_of,
        })
    }

    /// Truncated trajectories to a learner that drops them: every one
    /// wasted when all are cut short (an end the actor could never see
    /// otherwise: the learner only counts them), a share otherwise.
    fn check_truncation(&self, reply: &proto::HandshakeReply) -> Result<(), SessionError> {
        if reply.drops_truncated && self.truncate_fraction > 0.0 {
            if self.truncate_fraction >= 1.0 {
                return Err(SessionError::Fatal(
                    "the learner's objective trains on complete trajectories only (TB) and drops truncated ones, and actor.truncate_fraction = 1 cuts every trajectory short: every rollout would be thrown away; set actor.truncate_fraction below 1 (0 for this learner)".to_owned(),
                ));
            }
            // Once per process: the same on every reconnect, and for every
            // connection of a load generator.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!(
                truncate_fraction = self.truncate_fraction,
                "the learner's objective trains on complete trajectories only (TB): the truncated share of this actor's rollouts is dropped unused (set actor.truncate_fraction = 0 for this learner)"
            );
            });
        }
        Ok(())
    }

    /// Opens the Session with the handshake in its headers, in one round
    /// trip. `None` where the learner predates that (it asks for an
    /// earlier handshake's id): the two calls follow.
    async fn session_shaking_hands(
        &self,
        client: LearnerClient<Channel>,
        handshake: &proto::HandshakeRequest,
        weight_bytes: u128,
    ) -> Result<Option<OpenedStreams>, SessionError> {
        // The learner says what it sends only in its reply, which comes
        // with the first grant: take this network's weights (as with two
        // calls, where the reply's max_grant_bytes raises the limit).
        let mut client = client
            .max_decoding_message_size(grant_decode_limit(self.max_message_bytes, weight_bytes));
        let (upload, upload_receiver) = mpsc::channel(UPLOAD_BUFFER);
        let mut request = tonic::Request::new(ReceiverStream::new(upload_receiver));
        request.metadata_mut().insert_bin(
            HANDSHAKE_HEADER,
            MetadataValue::from_bytes(&handshake.encode_to_vec()),
        );
        self.authorize(request.metadata_mut())?;
        let response = match tokio::time::timeout(HANDSHAKE_TIMEOUT, client.session(request))
            .await
            .map_err(|_| no_answer("Session"))?
        {
            Ok(response) => response,
            Err(status) if predates_handshake_header(&status) => {
                info!("the learner takes the handshake as a call of its own: shaking hands first");
                return Ok(None);
            }
            Err(status) => return Err(handshake_refused(status)),
        };
        let reply = response
            .metadata()
            .get_bin(HANDSHAKE_REPLY_HEADER)
            .and_then(|value| value.to_bytes().ok())
            .and_then(|bytes| proto::HandshakeReply::decode(bytes).ok());
        let mut grants = response.into_inner();
        let Some(reply) = reply else {
            // An answer without gRPC's status in its headers (an HTTP
            // error from a proxy, say) shows its error on the first read.
            let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, grants.message()).await;
            return Err(match first {
                Ok(Err(status)) => handshake_refused(status),
                _ => SessionError::Fatal(format!(
                    "the learner opened the session without its handshake reply (header `{HANDSHAKE_REPLY_HEADER}`): is actor.learner a flgfn learner?"
                )),
            });
        };
        Ok(Some((reply, grants, upload)))
    }

    /// Shakes hands with a Handshake call, then opens the Session with the
    /// id and key it issued.
    async fn handshake_then_session(
        &self,
        mut client: LearnerClient<Channel>,
        handshake: proto::HandshakeRequest,
    ) -> Result<OpenedStreams, SessionError> {
        let mut request = tonic::Request::new(handshake);
        self.authorize(request.metadata_mut())?;
        let handshake = client.handshake(request);
        let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| no_answer("Handshake"))?
            .map_err(handshake_refused)?
            .into_inner();
        // Before a session opens: one that truncates everything stops here.
        self.check_truncation(&reply)?;
        // Take whatever weights the learner sends (it refuses to start
        // with weights over its own limit), even if this actor's
        // learner.max_message_bytes, from another file, is lower.
        client = client.max_decoding_message_size(grant_decode_limit(
            self.max_message_bytes,
            u128::from(reply.max_grant_bytes),
        ));
        let (upload, upload_receiver) = mpsc::channel(UPLOAD_BUFFER);
        let mut request = tonic::Request::new(ReceiverStream::new(upload_receiver));
        let metadata = request.metadata_mut();
        metadata.insert(ACTOR_ID_HEADER, reply.actor_id.into());
        // Proves this actor shook hands for that id (ids come in order).
        let session_key = reply.session_key.parse().map_err(|_| {
            SessionError::Fatal(
                "the learner's session key is not header text: is actor.learner a flgfn learner?"
                    .to_owned(),
            )
        })?;
        metadata.insert(SESSION_KEY_HEADER, session_key);
        metadata.insert(TRAJECTORIES_PER_CHUNK_HEADER, (self.envs as u64).into());
        self.authorize(metadata)?;
        let grants = tokio::time::timeout(HANDSHAKE_TIMEOUT, client.session(request))
            .await
            .map_err(|_| no_answer("Session"))?
            .map_err(|s| classify(s, false))?
            .into_inner();
        Ok((reply, grants, upload))
    }

    /// Turns grants into orders and forwards chunks until the session ends.
    async fn serve<S: Future<Output = ()>>(
        self,
        opened: Opened,
        mut shutdown: Pin<&mut S>,
        stopping: &mut bool,
    ) -> Result<SessionEnd, SessionError> {
        let Opened {
            mut grants,
            upload,
            actor_id,
            max_bytes,
            max_bytes_of,
        } = opened;
        let session = self.session;
        // Set once a chunk is sent: only a session that served resets the
        // reconnect backoff.
        let mut served = false;
        let drain = tokio::time::sleep(DRAIN_TIMEOUT);
        tokio::pin!(drain);

        let (chunks, counts, orders) = (self.chunks, self.counts, self.orders);
        let progress = self.progress;
        let mut weights: Option<Arc<Weights>> = None;
        loop {
            tokio::select! {
                () = progress.due() => {
                    progress.log(counts, weights.as_ref().map(|w| w.version));
                }
                () = shutdown.as_mut(), if !*stopping => {
                    *stopping = true;
                    drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    // Orders still queued are skipped (the learner takes
                    // their credits back when the session ends); the
                    // worker answers the flush once the rollout in
                    // progress is out, so every chunk is then in `chunks`.
                    self.current_session
                        .store(session | crate::worker::DRAINING, Ordering::Release);
                    let flush = weights.as_ref().map(|weights| Order {
                        session: FLUSH_SESSION,
                        actor_id,
                        weights: weights.clone(),
                    });
                    // No grant yet: nothing was rolled out.
                    let Some(flush) = flush else {
                        return finish(upload, &mut grants).await;
                    };
                    // Behind at most a queue of orders the worker now skips.
                    let queued = tokio::time::timeout(DRAIN_TIMEOUT, orders.send(flush)).await;
                    if !matches!(queued, Ok(Ok(()))) {
                        return finish(upload, &mut grants).await;
                    }
                }
                () = &mut drain, if *stopping => {
                    warn!(after = ?DRAIN_TIMEOUT, "the rollout in progress did not finish; leaving without it");
                    return finish(upload, &mut grants).await;
                }
                grant = grants.message() => {
                    let grant = match grant {
                        Ok(Some(grant)) => grant,
                        // A refusal stays one; anything else ends the drain.
                        Err(status) if *stopping => {
                            return match classify(status, served) {
                                SessionError::Retry { .. } => Ok(SessionEnd::Stopped),
                                refused => Err(refused),
                            };
                        }
                        Ok(None) if *stopping => return Ok(SessionEnd::Stopped),
                        Ok(None) => return Err(retry("the learner ended the session", served)),
                        Err(status) => return Err(classify(status, served)),
                    };
                    if grant.training_done {
                        // The chunks already handed to the upload go out
                        // and the learner counts them (as arrived after
                        // the end) before it ends the session: the two
                        // sides' counts then agree.
                        let _ = finish(upload, &mut grants).await;
                        return Ok(SessionEnd::TrainingDone);
                    }
                    if grant.learner_restarting {
                        // As above: the learner counts what is on its way.
                        // (An actor stopping leaves once that is done.)
                        let _ = finish(upload, &mut grants).await;
                        return Ok(if *stopping {
                            SessionEnd::Stopped
                        } else {
                            SessionEnd::LearnerRestarting
                        });
                    }
                    if *stopping {
                        // No new rollouts.
                        continue;
                    }
                    if let Some(new) = grant.weights {
                        counts.versions_received += 1;
                        flgfn_common::telemetry::record_latest(
                            &tracing::Span::current(),
                            "policy_version",
                            new.version,
                        );
                        weights = Some(Arc::new(Weights {
                            session,
                            version: new.version,
                            bytes: new.safetensors,
                            received_at: std::time::Instant::now(),
                        }));
                    }
                    // A grant of no credits needs no weights (a later
                    // learner may send one carrying only fields added since).
                    if grant.credits == 0 {
                        continue;
                    }
                    let Some(weights) = &weights else {
                        return Err(SessionError::Fatal(
                            "protocol error: the learner granted a credit before sending any weights".to_owned(),
                        ));
                    };
                    for _ in 0..grant.credits {
                        counts.credits += 1;
                        let order = Order { session, actor_id, weights: weights.clone() };
                        // Never wait here: this loop must keep reading
                        // grants and forwarding chunks.
                        match orders.try_send(order) {
                            Ok(()) => {}
                            // The learner holds back credits it would not
                            // train on soon (flgfn's: 64 a session at most);
                            // one that floods them breaks the protocol, and
                            // would again after a reconnect.
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                return Err(SessionError::Fatal(format!(
                                    "protocol error: the learner granted more than {} credits not yet used",
                                    crate::MAX_QUEUED_ORDERS
                                )));
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                return Ok(SessionEnd::WorkerStopped);
                            }
                        }
                    }
                }
                sampled = chunks.recv() => {
                    let Some(SampledChunk { session: sampled_in, mut chunk }) = sampled else {
                        return Ok(SessionEnd::WorkerStopped);
                    };
                    if sampled_in == FLUSH_SESSION {
                        // Every chunk rolled out is sent.
                        return finish(upload, &mut grants).await;
                    }
                    if sampled_in != session {
                        // Its credit died with an earlier session.
                        counts.stale_chunks_dropped += 1;
                        continue;
                    }
                    chunk.actor_id = actor_id;
                    let transitions = chunk.transitions() as u64;
                    let message = proto::TrajectoryChunk::from(&chunk);
                    if message.encoded_len() > max_bytes {
                        counts.stale_chunks_dropped += 1;
                        // Every chunk would fail alike: retrying cannot help.
                        return Err(SessionError::Fatal(format!(
                            "a chunk encodes to {} bytes, more than the {max_bytes} of {max_bytes_of}; lower actor.envs",
                            message.encoded_len()
                        )));
                    }
                    match upload.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            counts.stale_chunks_dropped += 1;
                            return Err(retry(
                                format!("the learner read none of the last {UPLOAD_BUFFER} chunks sent (a stalled link or learner); reconnecting"),
                                served,
                            ));
                        }
                        // The stream broke; the grant side reports why.
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            counts.stale_chunks_dropped += 1;
                            continue;
                        }
                    }
                    counts.chunks_sent += 1;
                    counts.transitions_sent += transitions;
                    served = true;
                }
            }
        }
    }
}

/// What opening a session yields: the handshake's reply, the grants
/// coming in, and the chunks going out.
type OpenedStreams = (
    proto::HandshakeReply,
    tonic::Streaming<proto::Grant>,
    mpsc::Sender<proto::TrajectoryChunk>,
);

/// Whether a refused Session that carried its handshake came from a
/// learner that predates that: it asks for the id of an earlier Handshake
/// call, which the two calls then give it.
fn predates_handshake_header(status: &Status) -> bool {
    status.code() == Code::InvalidArgument
        && status
            .message()
            .starts_with(&format!("`{ACTOR_ID_HEADER}` is missing"))
}

/// What a refused handshake means to this actor (see [`classify`]).
fn handshake_refused(status: Status) -> SessionError {
    match status.code() {
        // Larger than the learner decodes at all: a handshake is small
        // unless its task has many more parameters than the learner's own.
        Code::OutOfRange => SessionError::Refused(Status::failed_precondition(format!(
            "{} (the handshake is larger than this learner takes: this actor's task or model differs from the learner's; or the reply is larger than this actor's learner.max_message_bytes)",
            status.message()
        ))),
        _ => classify(status, false),
    }
}

/// A session opened: its streams and what the handshake settled.
struct Opened {
    grants: tonic::Streaming<proto::Grant>,
    upload: mpsc::Sender<proto::TrajectoryChunk>,
    actor_id: u64,
    /// Largest message to send (the smaller of both sides' limits).
    max_bytes: usize,
    /// Which side's limit that is, for the error.
    max_bytes_of: &'static str,
}

/// Closes the upload and waits, at most [`DRAIN_TIMEOUT`], for the learner
/// to end the session: it reads every chunk sent before the close first.
/// A refusal of those chunks is one still (as outside a stop), and a
/// learner that finished training meanwhile says so.
async fn finish(
    upload: mpsc::Sender<proto::TrajectoryChunk>,
    grants: &mut tonic::Streaming<proto::Grant>,
) -> Result<SessionEnd, SessionError> {
    drop(upload);
    let ended = async {
        loop {
            match grants.message().await {
                Ok(Some(grant)) if grant.training_done => return Ok(SessionEnd::TrainingDone),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(SessionEnd::Stopped),
                Err(status) => {
                    return match classify(status, true) {
                        SessionError::Retry { .. } => Ok(SessionEnd::Stopped),
                        refused => Err(refused),
                    };
                }
            }
        }
    };
    tokio::time::timeout(DRAIN_TIMEOUT, ended)
        .await
        .unwrap_or_else(|_| {
            warn!(after = ?DRAIN_TIMEOUT, "the learner did not end the session; leaving");
            Ok(SessionEnd::Stopped)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An actor's receive window holds its network's weights in f32, 4 MiB
    /// at least, 1 GiB at most.
    #[test]
    fn the_receive_window_holds_the_weights() {
        let model = |hidden: Vec<usize>| ModelSpec {
            input_dim: 60,
            hidden,
            forward_actions: 31,
            backward_actions: 30,
        };
        let task = TaskSpec {
            name: "set_generation".to_owned(),
            params: vec!["universe=30".to_owned()],
        };
        let window = |hidden| stream_window(f32_weight_bytes(&model(hidden), &task));
        assert_eq!(window(vec![256, 256]), MIN_STREAM_WINDOW);
        let weights = u32::try_from(model(vec![2048, 2048, 2048]).parameter_count() * 4).unwrap();
        assert!(weights > MIN_STREAM_WINDOW);
        assert!(window(vec![2048, 2048, 2048]) >= weights);
        assert_eq!(window(vec![1 << 20, 1 << 20]), 1 << 30);
    }

    /// A stand-in HTTP/2 server on `127.0.0.1:0` that records each
    /// request (path, and whether it carried a token) and either drops the
    /// connection unanswered, as a TLS server drops plain text, or answers
    /// every request HTTP 401, as a proxy that wants a token everywhere.
    async fn recording_server(
        answer_401: bool,
    ) -> (
        std::net::SocketAddr,
        Arc<std::sync::Mutex<Vec<(String, bool)>>>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
        let recorded = Arc::clone(&requests);
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    continue;
                };
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        recorded.lock().unwrap().push((
                            request.uri().path().to_owned(),
                            request.headers().contains_key(AUTHORIZATION_HEADER),
                        ));
                        if !answer_401 {
                            return;
                        }
                        let response = tonic::codegen::http::Response::builder()
                            .status(401)
                            .body(())
                            .unwrap();
                        let _ = respond.send_response(response, true);
                    }
                });
            }
        });
        (address, requests, server)
    }

    /// An actor with a token against `address`, at most 2 attempts.
    async fn actor_with_token(address: std::net::SocketAddr, name: &str) -> crate::ActorError {
        let dir = std::env::temp_dir().join(format!("flgfn-probe-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "a-token-for-the-probe-test-0123456789\n").unwrap();
        let mut config = flgfn_common::config::Config::default();
        config.actor.learner = format!("http://{address}");
        config.actor.reconnect_attempts = 2;
        config.auth.token_file = token_file.display().to_string();
        let options = crate::ActorOptions {
            name: name.to_owned(),
            seed_offset: None,
        };
        let error = crate::run(config, options, std::future::pending())
            .await
            .unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        error
    }

    /// An http:// address that has not answered as plain HTTP/2 (a TLS
    /// learner's port, say) never gets the token: only the open health
    /// check goes first. One that answers anything, even a refusal, speaks
    /// HTTP/2: the handshake follows (in the Session call), with the token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_token_goes_to_an_address_that_has_not_answered() {
        let (address, requests, server) = recording_server(false).await;
        let error = actor_with_token(address, "silent").await;
        server.abort();
        assert!(
            matches!(error, crate::ActorError::GaveUp { .. }),
            "{error:?}"
        );
        let error = error.to_string();
        assert!(
            error.contains("the token was not sent") && error.contains("https://"),
            "{error}"
        );
        {
            let requests = requests.lock().unwrap();
            assert!(!requests.is_empty());
            assert!(
                requests
                    .iter()
                    .all(|(path, token)| path.starts_with("/grpc.health.v1.Health/") && !token),
                "{requests:?}"
            );
        }

        let (address, requests, server) = recording_server(true).await;
        let error = actor_with_token(address, "answered").await;
        server.abort();
        assert!(matches!(error, crate::ActorError::Refused(_)), "{error:?}");
        let requests = requests.lock().unwrap();
        assert!(
            requests
                .iter()
                .any(|(path, token)| path.ends_with("/Session") && *token),
            "{requests:?}"
        );
    }

    /// The probe tells a TLS server's alert from anything else a server
    /// answers plain text with, or no server.
    #[tokio::test]
    async fn a_tls_alert_is_told_from_other_answers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn answering(reply: &'static [u8]) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut probe = [0u8; PLAIN_TEXT_PROBE.len()];
                stream.read_exact(&mut probe).await.unwrap();
                assert_eq!(&probe, PLAIN_TEXT_PROBE);
                stream.write_all(reply).await.unwrap();
            });
            format!("http://{address}")
        }
        // An alert record (TLS 1.2 framing), as rustls sends one.
        assert!(
            answers_as_tls(&answering(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]).await).await
        );
        // An HTTP/1 server's reply, a handshake record, nothing at all.
        assert!(!answers_as_tls(&answering(b"HTTP/1.1 400 Bad Request\r\n").await).await);
        assert!(!answers_as_tls(&answering(&[0x16, 0x03, 0x03]).await).await);
        assert!(!answers_as_tls(&answering(b"").await).await);
        // No server there.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = closed.local_addr().unwrap();
        drop(closed);
        assert!(!answers_as_tls(&format!("http://{address}")).await);
    }

    fn retried(error: SessionError) -> (String, bool) {
        match error {
            SessionError::Retry {
                message, served, ..
            } => (message, served),
            other => panic!("not retried: {other}"),
        }
    }

    #[test]
    fn a_session_cut_for_stalling_before_its_first_chunk_says_what_to_lower() {
        let stalled =
            || Status::deadline_exceeded("held a credit for 30s without sending its chunk");
        let (message, served) = retried(classify(stalled(), false));
        assert!(!served);
        assert!(
            message.contains("held a credit") && message.contains("lower actor.envs"),
            "{message}"
        );
        // Once a chunk went through, rollouts are fast enough: no hint.
        let (message, served) = retried(classify(stalled(), true));
        assert!(served);
        assert!(!message.contains("actor.envs"), "{message}");
    }

    #[test]
    fn refusals_are_final_and_outages_retried() {
        for status in [
            Status::invalid_argument("bad chunk"),
            Status::failed_precondition("another task"),
            Status::unauthenticated("wrong token"),
        ] {
            assert!(matches!(classify(status, true), SessionError::Refused(_)));
        }
        let (_, served) = retried(classify(Status::unavailable("restarting"), false));
        assert!(!served);
    }
}
