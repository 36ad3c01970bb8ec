//! A cap on the TCP connections the learner holds open.
//!
//! tonic serves every connection it is handed. A client that opens
//! connections and never sends a call, or a fleet misconfigured to connect
//! in a loop, would hold file descriptors and HTTP/2 state without bound;
//! `learner.max_sessions` only counts actors that opened a session. Here
//! each accepted connection holds one of `learner.max_connections` permits
//! until it closes. At the cap, the oldest connection on which no Learner
//! call has ever started (a client that only connected, or only checks
//! health), if at least [`EVICTION_MIN_AGE`] old, is closed to make room
//! ([`EVICTION_WAIT`]), counted under
//! `closed_for_room`, so that clients without a token cannot keep actors
//! out by reconnecting faster than the timeouts below close them; where
//! every connection has started a call, the one accepted is closed at
//! once, before any byte is read (its client sees UNAVAILABLE, and actors
//! retry with backoff), and counted under `too_many_connections`. A connection whose
//! client has not sent its first [`FIRST_BYTES`] bytes within
//! [`FIRST_BYTES_WITHIN`] is closed (HTTP/2 keepalive only starts after the
//! client's preface, and a server waits for the rest of a partial preface
//! without a timeout), so silent sockets, or sockets that send one byte,
//! cannot keep the places for ever. Nor can a client that sent its preface
//! and then calls nothing: a connection with no call in progress for
//! `learner.idle_connection_s` is closed, and one on which no call has
//! ever started after [`FIRST_CALL_WITHIN`]. Each call learns of its
//! connection through [`ConnectionInfo`] (tonic puts it in the request's
//! extensions), and the Learner service, behind its token check, is wrapped
//! in [`CountsCalls`], which holds the call as in progress until its
//! response ends; an actor's session is one call, open while it trains.
//! Health checks (open to anyone; a Watch never ends) and calls refused for
//! their token do not count. A call in progress keeps its connection, so
//! [`CountsCalls`] also bounds how long a call may take to be answered
//! ([`CALL_ANSWERED_WITHIN`]): tonic reads a Handshake's whole request,
//! reserving its declared length, before the learner sees it, and a
//! client that never finishes sending one would otherwise hold that
//! buffer, and its connection, for ever.
//!
//! A client of the other transport, or whose TLS handshake fails, is told
//! so on its side only: tonic drops such connections with a debug line
//! that names no peer. Each connection therefore notes its first byte (a
//! TLS record starts with 0x16, the HTTP/2 preface with `P`) and whether
//! tonic ever served it (it asks for [`ConnectionInfo`] once, after the
//! handshake), and the learner counts and logs the mismatch, naming the
//! peer and the fix (`Transport::other_transport`,
//! `Transport::failed_handshake`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};
use tracing::warn;

use crate::error::{framing_fault_as_sender_error, unreadable_reason};
use crate::ingest::IngestStats;

/// A client must send its first bytes (the HTTP/2 preface, or a TLS hello)
/// this soon after connecting.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);

/// How many: the length of the HTTP/2 client preface (a TLS hello is
/// longer).
pub const FIRST_BYTES: usize = 24;

/// A connection on which no Learner call (past the token check) has ever
/// started is idle after this, not `learner.idle_connection_s`: an actor
/// shakes hands at once, a probe's check is over in a moment, and
/// connections that only sent a preface or health checks would otherwise
/// hold the learner's places for minutes.
pub const FIRST_CALL_WITHIN: Duration = Duration::from_secs(10);

/// A call of the Learner service not answered this soon is ended
/// (DEADLINE_EXCEEDED; see [`CountsCalls`]). Longer than an actor waits
/// for an answer (10 s) before it gives up the call itself and retries, so
/// an actor never meets it, even while the learner loads its checkpoint.
pub const CALL_ANSWERED_WITHIN: Duration = Duration::from_secs(15);

/// At the connection cap, how long the one accepted waits for the place
/// of the connection closed for it (a moment: that one's task only has to
/// see the close and drop it).
pub const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// A connection this young is not closed for room: its first call may be
/// on its way (a call counts once its headers are read and its service
/// runs, or after a TLS handshake).
pub const EVICTION_MIN_AGE: Duration = Duration::from_secs(1);

/// What the learner's listener speaks, to tell the clients that speak
/// something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/2 in clear.
    PlainText,
    /// TLS.
    Tls {
        /// Client certificates are required (`tls.ca_file`).
        mutual: bool,
    },
}

/// The first byte of every TLS record of a handshake (a ClientHello
/// included).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The first byte of the HTTP/2 client preface (`PRI * HTTP/2.0`).
const HTTP2_PREFACE_START: u8 = b'P';

impl Transport {
    /// The transport `[tls]` asks for: TLS with a certificate, mutual
    /// with a client CA too.
    pub fn configured(tls: &flgfn_common::auth::TlsConfig) -> Self {
        if tls.cert_file.is_empty() {
            Transport::PlainText
        } else {
            Transport::Tls {
                mutual: !tls.ca_file.is_empty(),
            }
        }
    }

    /// As the listening line says it.
    pub fn name(self) -> &'static str {
        match self {
            Transport::PlainText => "plain text",
            Transport::Tls { mutual: false } => "tls",
            Transport::Tls { mutual: true } => "mutual tls",
        }
    }

    /// A client of the other transport, told by its first byte: its
    /// counter's name and what to tell the operator.
    fn other_transport(self, first_byte: u8) -> Option<(&'static str, String)> {
        match self {
            Transport::PlainText if first_byte == TLS_HANDSHAKE_RECORD => Some((
                "tls_at_plain_text",
                "a client began a TLS handshake, but this learner serves plain HTTP/2: give the client an http:// learner address, or the learner tls.cert_file and tls.key_file".to_owned(),
            )),
            Transport::Tls { .. } if first_byte == HTTP2_PREFACE_START => Some((
                "plain_text_at_tls",
                "a client spoke plain HTTP/2, but this learner serves TLS: give the client an https:// learner address and tls.ca_file".to_owned(),
            )),
            _ => None,
        }
    }

    /// A TLS client whose connection closed before tonic served it: its
    /// handshake failed (or it gave up half-way). None for any other
    /// connection, and for one that sent nothing (a TCP probe's).
    fn failed_handshake(
        self,
        first_byte: Option<u8>,
        served: bool,
    ) -> Option<(&'static str, String)> {
        let Transport::Tls { mutual } = self else {
            return None;
        };
        (first_byte == Some(TLS_HANDSHAKE_RECORD) && !served).then(|| {
            (
                "tls_handshake_failed",
                format!(
                    "a TLS handshake did not complete: the client may not trust this learner's certificate (its tls.ca_file must hold the CA that signed it, and the certificate must name the host the client dials){}, or it gave up half-way; the client's log says which",
                    if mutual {
                        ", or sent no client certificate that this learner's tls.ca_file signed"
                    } else {
                        ""
                    }
                ),
            )
        })
    }
}

/// Counts a connection of the wrong kind under `reason` and logs it, with
/// its peer, where [`IngestStats::refuse`] says a line is due: a fleet
/// configured wrong retries in a loop.
fn report_mismatch(stats: &IngestStats, reason: &str, message: &str, peer: Option<SocketAddr>) {
    if let Some(count) = stats.refuse(reason) {
        warn!(peer = %peer_text(peer), refused_so_far = count, counted_as = reason, "{message}");
    }
}

/// A peer's address for a log line ("unknown" where the socket no longer
/// knows it).
fn peer_text(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "unknown".to_owned(), |address| address.to_string())
}

/// A connection found idle just as bytes arrived waits this much longer
/// (once), for a call those bytes may start.
const CALL_START_GRACE: Duration = Duration::from_millis(500);

/// Idle TCP connections are probed this often by the kernel (a peer that
/// vanished is noticed even before HTTP/2 keepalive would).
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Open files kept for everything but connections (checkpoints, the
/// metrics file, libtorch, the runtime) when the open-file limit caps the
/// connections: 256, or a quarter of a smaller limit (macOS starts shells
/// at 256).
fn files_kept(limit: u64) -> u64 {
    (limit / 4).min(256)
}

/// macOS refuses a soft open-file limit above this (its OPEN_MAX), even
/// when the hard limit is unlimited.
const OPEN_MAX_MACOS: u64 = 10_240;

/// After an error accepting a connection (out of file descriptors, most
/// likely), the listener waits this long before accepting again: tonic
/// retries at once, and would spin a worker until a descriptor frees.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How many connections the learner can hold: `configured`, or fewer
/// where the open-file limit would run out first. The soft limit is
/// raised to the hard one first (as Go's runtime does at start): the
/// usual soft default of 1,024 would otherwise stop accepts, and every
/// file the learner opens (a checkpoint), long before 4,096 connections.
pub fn connection_cap(configured: usize) -> usize {
    let Some(limit) = raise_open_file_limit() else {
        return configured;
    };
    let kept = files_kept(limit);
    let room = usize::try_from(limit - kept).unwrap_or(usize::MAX);
    if configured > room {
        warn!(
            configured,
            open_file_limit = limit,
            using = room,
            "learner.max_connections is more than the open-file limit leaves ({kept} kept for files): raise the limit (ulimit -n, LimitNOFILE, docker --ulimit nofile) or lower the setting"
        );
        room
    } else {
        configured
    }
}

/// This process's open-file limits (None where they cannot be read).
#[cfg(unix)]
#[allow(unsafe_code)]
fn open_file_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed by pointer, which
    // lives for the call.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// Raises this process's soft open-file limit to its hard limit; returns
/// the soft limit now (None where it cannot be read).
#[cfg(unix)]
#[allow(unsafe_code)]
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = open_file_limit()?;
    // The hard limit, or where that is refused (macOS, with an unlimited
    // hard limit), its OPEN_MAX; else the soft limit stays.
    #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
    let open_max = libc::rlim_t::try_from(OPEN_MAX_MACOS).unwrap_or(limit.rlim_max);
    for target in [limit.rlim_max, limit.rlim_max.min(open_max)] {
        if limit.rlim_cur >= target {
            break;
        }
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct passed by pointer, which
        // lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = target;
            break;
        }
    }
    #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
    Some(u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX))
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

/// What a call knows of its connection (tonic puts it in the request's
/// extensions, inside a [`TlsConnectInfo`] with TLS).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    tcp: TcpConnectInfo,
    calls: Arc<Calls>,
}

impl ConnectionInfo {
    /// The connection of `request`, if it came through [`incoming`].
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&ConnectionInfo> {
        Self::in_extensions(request.extensions())
    }

    /// The same, from an HTTP request (below the gRPC layer).
    fn of_http<B>(request: &http::Request<B>) -> Option<&ConnectionInfo> {
        Self::in_extensions(request.extensions())
    }

    /// Plain or under TLS, which wraps it.
    fn in_extensions(extensions: &http::Extensions) -> Option<&ConnectionInfo> {
        extensions.get::<ConnectionInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }

    /// Marks a call in progress on this connection, until dropped: the
    /// connection is not idle meanwhile.
    fn call(&self) -> CallInProgress {
        // In progress first: a reader that sees the new start also sees
        // the call running (or already ended).
        self.calls.in_progress.fetch_add(1, Ordering::AcqRel);
        self.calls.started.fetch_add(1, Ordering::AcqRel);
        CallInProgress(self.calls.clone())
    }
}

/// A connection's calls, counted by its calls and read by its reads.
#[derive(Debug, Default)]
struct Calls {
    /// Calls running now.
    in_progress: AtomicUsize,
    /// Calls ever started: a call that began and ended between two reads
    /// still restarts the idle clock.
    started: AtomicU64,
    /// The connection's reader, woken when its last call ends so that the
    /// idle clock starts then, not at the next bytes from the client, and
    /// when the connection is closed for room.
    reader: Mutex<Option<Waker>>,
    /// Set to close the connection for a newer one (see [`incoming`]).
    evicted: AtomicBool,
}

impl Calls {
    /// Wakes the connection's reader with `cx`'s task next time.
    fn register_reader(&self, cx: &Context<'_>) {
        let mut reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !reader.as_ref().is_some_and(|r| r.will_wake(cx.waker())) {
            *reader = Some(cx.waker().clone());
        }
    }

    /// Closes the connection (at its reader's next poll, which this
    /// wakes) if no Learner call ever started on it; whether it did.
    fn evict_if_never_called(&self) -> bool {
        if self.started.load(Ordering::Acquire) != 0 || self.evicted.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.wake_reader();
        true
    }

    /// Wakes the connection's reader, if it waits, to look again.
    fn wake_reader(&self) {
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// The open connections' calls, oldest first, to find one to close for
/// room at the cap. Closed ones are forgotten whenever the list holds
/// twice the cap, so it stays within that however many come and go.
#[derive(Debug)]
struct OpenConnections {
    open: Mutex<std::collections::VecDeque<Accepted>>,
    /// The connection cap.
    max: usize,
}

impl OpenConnections {
    fn new(max: usize) -> Self {
        OpenConnections {
            open: Mutex::default(),
            max,
        }
    }

    fn add(&self, calls: &Arc<Calls>) {
        let mut open = self.list();
        if open.len() >= self.max.saturating_mul(2).max(64) {
            open.retain(|(_, calls)| calls.strong_count() > 0);
        }
        open.push_back((Instant::now(), Arc::downgrade(calls)));
    }

    fn list(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Accepted>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the oldest open connection on which no Learner call ever
    /// started, at least [`EVICTION_MIN_AGE`] old (forgetting closed ones
    /// on the way); whether there was one.
    fn evict_oldest_never_called(&self) -> bool {
        let mut open = self.list();
        open.retain(|(_, calls)| calls.strong_count() > 0);
        open.iter()
            .take_while(|(accepted, _)| accepted.elapsed() >= EVICTION_MIN_AGE)
            .filter_map(|(_, calls)| calls.upgrade())
            .any(|calls| calls.evict_if_never_called())
    }
}

/// A connection in [`OpenConnections`]: when it was accepted, and its
/// calls (gone once it closes).
type Accepted = (Instant, std::sync::Weak<Calls>);

/// Set by the Handshake handler as it starts: a Handshake refused
/// without it was refused by the codec (bytes that do not decode, a
/// message larger than the learner takes), which no handler counts.
#[derive(Debug, Clone, Default)]
pub struct HandshakeHandled(Arc<AtomicBool>);

impl HandshakeHandled {
    /// Marks `request`'s Handshake as reaching its handler.
    pub fn mark<T>(request: &tonic::Request<T>) {
        if let Some(handled) = request.extensions().get::<Self>() {
            handled.0.store(true, Ordering::Release);
        }
    }
}

/// Counts and logs a Handshake the codec refused, as the handler counts
/// its own refusals (`handshake_<reason>`, logged where
/// [`IngestStats::refuse`] says): without it, an actor of a much larger task left no
/// trace at the learner.
fn count_unread_handshake(stats: &IngestStats, peer: &str, status: &tonic::Status) {
    // (UNAUTHENTICATED, which is none of these, is counted where the
    // token is checked.)
    let Some(reason) = unreadable_reason(status.code()) else {
        return;
    };
    let reason = format!("handshake_{reason}");
    if let Some(refused_so_far) = stats.refuse(&reason) {
        warn!(
            %peer,
            %reason,
            status = %crate::error::clip(status.message().to_owned()),
            refused_so_far,
            "refused a handshake that could not be read"
        );
    }
}

/// A call in progress on a connection (see [`ConnectionInfo::call`]).
#[derive(Debug)]
struct CallInProgress(Arc<Calls>);

impl Drop for CallInProgress {
    fn drop(&mut self) {
        if self.0.in_progress.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.wake_reader();
        }
    }
}

/// A gRPC service whose calls count as in progress on their connection
/// (`ConnectionInfo::call`) from the request until the response's body
/// ends: a unary call until it answers, a stream until its last message.
/// A call not answered within [`CALL_ANSWERED_WITHIN`] (its response's headers:
/// a Handshake's once its whole request is read and checked, a Session's
/// once it opens; either waits while the learner loads its checkpoint) is
/// ended with DEADLINE_EXCEEDED: a client that never finishes sending a
/// request would otherwise hold a buffer of up to the decode limit, and
/// keep its connection from being idle, for ever.
#[derive(Debug, Clone)]
pub struct CountsCalls<S> {
    /// The Learner service.
    pub service: S,
    /// Where calls ended so are counted (`call_not_answered_in_time`).
    pub stats: Arc<IngestStats>,
}

impl<S: NamedService> NamedService for CountsCalls<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<Body>> for CountsCalls<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let connection = ConnectionInfo::of_http(&request);
        let peer = peer_text(connection.and_then(ConnectionInfo::remote_addr));
        let call = connection.map(ConnectionInfo::call);
        let method = request.uri().path().to_owned();
        let handshake = method.ends_with("/Handshake");
        let reached = HandshakeHandled::default();
        if handshake {
            request.extensions_mut().insert(reached.clone());
        }
        let response = self.service.call(request);
        let stats = self.stats.clone();
        Box::pin(async move {
            // Dropped at the deadline: the request's buffer goes with it.
            let Ok(response) = tokio::time::timeout(CALL_ANSWERED_WITHIN, response).await else {
                // A flood logs a few lines (see `IngestStats::refuse`).
                if let Some(count) = stats.refuse("call_not_answered_in_time") {
                    warn!(
                        %peer,
                        %method,
                        within_s = CALL_ANSWERED_WITHIN.as_secs_f64(),
                        refused_so_far = count,
                        "ended a call not answered in time: its request never arrived whole, or the learner was still loading"
                    );
                }
                return Ok(tonic::Status::deadline_exceeded(format!(
                    "the call was not answered within {CALL_ANSWERED_WITHIN:?}: \
                     its request did not arrive whole, or the learner was still loading"
                ))
                .into_http());
            };
            let response = response?;
            let refused = tonic::Status::from_header_map(response.headers());
            // A unary call's framing fault, answered by tonic before the
            // learner saw the call (trailers only): the sender's.
            let reframed = refused
                .as_ref()
                .filter(|status| status.code() == tonic::Code::Internal)
                .map(|status| framing_fault_as_sender_error(status.clone(), "request"))
                .filter(|status| status.code() != tonic::Code::Internal);
            if handshake && !reached.0.load(Ordering::Acquire) {
                let refused = reframed.as_ref().or(refused.as_ref());
                if let Some(status) = refused {
                    count_unread_handshake(&stats, &peer, status);
                }
            }
            if let Some(status) = reframed {
                return Ok(status.into_http());
            }
            Ok(response.map(|body| {
                Body::new(BodyOfCall {
                    body: Body::new(body),
                    _call: call,
                })
            }))
        })
    }
}

/// A response body holding its call in progress until it is dropped.
struct BodyOfCall {
    body: Body,
    _call: Option<CallInProgress>,
}

impl http_body::Body for BodyOfCall {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// An accepted connection and its place under the cap, given back when
/// tonic drops the connection.
#[derive(Debug)]
pub struct CountedConnection {
    stream: TcpStream,
    /// Until the client's first bytes arrive.
    first_bytes_deadline: Option<Pin<Box<Sleep>>>,
    /// Of those, the ones not yet received.
    first_bytes_missing: usize,
    /// Its calls (shared with them through [`ConnectionInfo`]).
    calls: Arc<Calls>,
    /// `learner.idle_connection_s`.
    idle_after: Duration,
    /// When the connection will have been idle that long (armed while no
    /// call is in progress).
    idle_deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes arrived since the idle clock was last checked: perhaps a call
    /// whose service has not started yet (hyper starts it in a task of its
    /// own).
    read_since_check: bool,
    /// The grace for such a call was given in this idle period (once, so
    /// that bytes alone, pings say, never keep a connection open).
    graced: bool,
    /// `Calls::started` when the deadline was last set.
    calls_seen: u64,
    /// What the listener speaks, and what this client began with.
    transport: Transport,
    first_byte: Option<u8>,
    /// Set when tonic serves the connection (it asks for its
    /// [`ConnectionInfo`] then): under TLS, once the handshake is done.
    served: AtomicBool,
    /// Where mismatches are counted.
    stats: Arc<IngestStats>,
    /// True once the learner stops: handshakes it cuts short then are not
    /// the client's failure.
    stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        // A handshake cut short for room is not the client's failure.
        let served = *self.served.get_mut()
            || *self.stopping.borrow()
            || self.calls.evicted.load(Ordering::Acquire);
        if let Some((reason, message)) = self.transport.failed_handshake(self.first_byte, served) {
            report_mismatch(&self.stats, reason, &message, self.stream.peer_addr().ok());
        }
    }
}

impl CountedConnection {
    /// An error once the connection was closed for a newer one (see
    /// [`incoming`]).
    fn closed_for_room(&self) -> io::Result<()> {
        if self.calls.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for a new connection at learner.max_connections: no Learner call had started on it",
            ));
        }
        Ok(())
    }

    /// Whether the connection has had no call in progress for
    /// `idle_after`. Arms the clock when it finds no call running, and
    /// restarts it when a call has started since it last looked.
    fn idle_for_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let read = std::mem::take(&mut self.read_since_check);
        let started = self.calls.started.load(Ordering::Acquire);
        if self.calls.in_progress.load(Ordering::Acquire) > 0 {
            self.idle_deadline = None;
            self.calls_seen = started;
            self.graced = false;
            return false;
        }
        let restart = started != self.calls_seen;
        self.calls_seen = started;
        if restart {
            self.graced = false;
        }
        let idle_after = if started == 0 {
            self.idle_after.min(FIRST_CALL_WITHIN)
        } else {
            self.idle_after
        };
        let deadline = match self.idle_deadline.as_mut() {
            Some(deadline) => {
                if restart {
                    deadline.as_mut().reset(Instant::now() + idle_after);
                }
                deadline
            }
            None => self
                .idle_deadline
                .insert(Box::pin(tokio::time::sleep(idle_after))),
        };
        if deadline.as_mut().poll(cx).is_pending() {
            return false;
        }
        if read && !self.graced {
            // Due, but bytes just came: a call they start gets the moment
            // it needs to be counted.
            self.graced = true;
            deadline.as_mut().reset(Instant::now() + CALL_START_GRACE);
            return deadline.as_mut().poll(cx).is_ready();
        }
        true
    }
}

/// The connections `listener` accepts (with TCP_NODELAY and keepalive, as
/// tonic's own listener would set them), at most `max` open at once: at
/// that many, the oldest on which no Learner call ever started is closed
/// for the one accepted, or else that one is closed; both are counted in
/// `stats`. Each is closed once it has had
/// no call in progress for `idle_after`. Clients that do not speak
/// `transport`, or fail its handshake before `stopping` turns true, are
/// counted there too. Once `stopping` turns true the stream ends and the
/// listener is closed: later connections are refused.
pub fn incoming(
    listener: TcpListener,
    transport: Transport,
    max: usize,
    idle_after: Duration,
    stats: Arc<IngestStats>,
    stopping: watch::Receiver<bool>,
) -> impl Stream<Item = io::Result<CountedConnection>> {
    let places = Arc::new(Places {
        permits: Arc::new(Semaphore::new(max)),
        open: OpenConnections::new(max),
        max,
        transport,
        idle_after,
        stats,
        stopping,
    });
    let failed_accepts = Arc::new(AtomicU64::new(0));
    let mut stopped = places.stopping.clone();
    let accepted = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
        .then(move |accepted| {
            let failed_accepts = failed_accepts.clone();
            async move {
                match &accepted {
                    Ok(_) => failed_accepts.store(0, Ordering::Relaxed),
                    Err(error) => {
                        // Failures in a row log a line at 1, 2, 4, 8, ...
                        let count = failed_accepts.fetch_add(1, Ordering::Relaxed) + 1;
                        if count.is_power_of_two() {
                            warn!(%error, failed_in_a_row = count, "cannot accept a connection");
                        }
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                }
                accepted
            }
        })
        .then(move |accepted| {
            let places = places.clone();
            async move {
                match accepted {
                    // tonic skips accept errors (logged above).
                    Err(error) => Some(Err(error)),
                    Ok(stream) => places.admit(stream).await.map(Ok),
                }
            }
        })
        .filter_map(|admitted| admitted);
    UntilStopping {
        accepted: Some(Box::pin(accepted)),
        stopped: Box::pin(async move {
            // (A sender gone is a stop too.)
            let _ = stopped.wait_for(|stopping| *stopping).await;
        }),
    }
}

/// Connections until the learner stops taking them, then the end of the
/// stream, its listening socket closed: tonic keeps the stream until its
/// graceful shutdown is over (the last step, the final checkpoint, the
/// drain), and meanwhile the kernel would complete connections that
/// nobody serves: a health check or an actor's reconnect would wait for
/// its timeout instead of being refused at once.
struct UntilStopping<S> {
    /// `None` once stopped: dropped, which closes the listener.
    accepted: Option<Pin<Box<S>>>,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<S: Stream> Stream for UntilStopping<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        if this.accepted.is_some() && this.stopped.as_mut().poll(cx).is_ready() {
            this.accepted = None;
        }
        match &mut this.accepted {
            Some(accepted) => accepted.as_mut().poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

/// What [`incoming`] admits connections with.
struct Places {
    /// One per connection open, `max` in all.
    permits: Arc<Semaphore>,
    /// The connections open, to find one to close for room.
    open: OpenConnections,
    /// `learner.max_connections` (as the process's file limit allows).
    max: usize,
    /// What each admitted connection needs (see [`CountedConnection`]).
    transport: Transport,
    idle_after: Duration,
    stats: Arc<IngestStats>,
    stopping: watch::Receiver<bool>,
}

impl Places {
    /// `stream` with a place under the cap: a free one, else the place of
    /// the oldest connection that never called (closed for it); `None`,
    /// closed and counted, where there is neither.
    async fn admit(&self, stream: TcpStream) -> Option<CountedConnection> {
        let stats = &self.stats;
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if self.open.evict_oldest_never_called() => {
                if let Some(count) = stats.refuse("closed_for_room") {
                    warn!(
                        new_peer = %peer_text(stream.peer_addr().ok()),
                        max = self.max,
                        refused_so_far = count,
                        "at learner.max_connections: closed the oldest connection that never called the learner, for a new one"
                    );
                }
                tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            // A flood logs a few lines (see `IngestStats::refuse`).
            if let Some(count) = stats.refuse("too_many_connections") {
                warn!(
                    peer = %peer_text(stream.peer_addr().ok()),
                    max = self.max,
                    refused_so_far = count,
                    "closed a connection beyond learner.max_connections"
                );
            }
            return None;
        };
        // Known from the start, so that a later newcomer can close it
        // before it even sends its first bytes.
        let calls = Arc::<Calls>::default();
        self.open.add(&calls);
        Some(CountedConnection {
            stream,
            first_bytes_deadline: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_WITHIN))),
            first_bytes_missing: FIRST_BYTES,
            calls,
            idle_after: self.idle_after,
            idle_deadline: None,
            read_since_check: false,
            graced: false,
            calls_seen: 0,
            transport: self.transport,
            first_byte: None,
            served: AtomicBool::new(false),
            stats: stats.clone(),
            stopping: self.stopping.clone(),
            _permit: permit,
        })
    }
}

impl Connected for CountedConnection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.served.store(true, Ordering::Relaxed);
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            calls: self.calls.clone(),
        }
    }
}

impl AsyncRead for CountedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.calls.register_reader(cx);
        this.closed_for_room()?;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(deadline) = this.first_bytes_deadline.as_mut() else {
            // Checked only while nothing arrives: bytes being read may be
            // a call starting.
            if !read.is_pending() {
                this.read_since_check = true;
            } else if this.idle_for_too_long(cx) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no call in progress for {:?} (learner.idle_connection_s; {:?} before a first Learner call)",
                        this.idle_after, FIRST_CALL_WITHIN
                    ),
                )));
            }
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if this.first_byte.is_none() {
                    let first_byte = buf.filled()[before];
                    this.first_byte = Some(first_byte);
                    if let Some((reason, message)) = this.transport.other_transport(first_byte) {
                        let peer = this.stream.peer_addr().ok();
                        report_mismatch(&this.stats, reason, &message, peer);
                    }
                }
                this.first_bytes_missing = this
                    .first_bytes_missing
                    .saturating_sub(buf.filled().len() - before);
                if this.first_bytes_missing == 0 {
                    this.first_bytes_deadline = None;
                }
            }
            // Polled while the read waits: it wakes this task when due.
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client sent fewer than {FIRST_BYTES} bytes within {FIRST_BYTES_WITHIN:?}"
                    ),
                )));
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for CountedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // (Here too: a client that stops reading leaves the server
        // flushing, and never reading, where the close would be seen.)
        self.closed_for_room()?;
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.closed_for_room()?;
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.closed_for_room()?;
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Connections that come and go below the cap (never an eviction to
    /// prune the list) leave it within twice the cap, not one entry each.
    #[test]
    fn the_list_of_open_connections_stays_bounded_under_churn() {
        let open = OpenConnections::new(4);
        let kept: Vec<Arc<Calls>> = (0..3).map(|_| Arc::default()).collect();
        kept.iter().for_each(|calls| open.add(calls));
        for _ in 0..10_000 {
            open.add(&Arc::default());
        }
        assert!(open.list().len() <= 65, "{} entries", open.list().len());
        assert_eq!(
            open.list()
                .iter()
                .filter(|(_, calls)| calls.strong_count() > 0)
                .count(),
            3
        );
    }

    /// The oldest connection on which no call started is evicted, once,
    /// not before EVICTION_MIN_AGE; one that called never is.
    #[tokio::test(start_paused = true)]
    async fn the_oldest_connection_that_never_called_is_evicted() {
        let open = OpenConnections::new(3);
        let [called, first, second]: [Arc<Calls>; 3] = std::array::from_fn(|_| Arc::default());
        called.started.store(1, Ordering::Release);
        [&called, &first, &second]
            .into_iter()
            .for_each(|calls| open.add(calls));
        tokio::time::advance(EVICTION_MIN_AGE - Duration::from_millis(1)).await;
        assert!(!open.evict_oldest_never_called(), "too young");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(open.evict_oldest_never_called());
        assert!(first.evicted.load(Ordering::Acquire));
        assert!(!second.evicted.load(Ordering::Acquire));
        assert!(open.evict_oldest_never_called());
        assert!(second.evicted.load(Ordering::Acquire));
        assert!(
            !open.evict_oldest_never_called(),
            "only one that called is left"
        );
        assert!(!called.evicted.load(Ordering::Acquire));
    }

    /// A connection `transport`'s listener accepted from a client that
    /// sent `first_bytes`, read until they are in, and dropped, served by
    /// tonic first (as a finished handshake is) if `served`: the
    /// refusals it left.
    #[allow(clippy::unwrap_used)] // a test's helper: a panic fails the test
    async fn refusals_after(
        transport: Transport,
        first_bytes: &[u8],
        served: bool,
    ) -> std::collections::BTreeMap<String, u64> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stats = Arc::new(IngestStats::default());
        let (_stop, stopping) = watch::channel(false);
        let mut accepted = Box::pin(incoming(
            listener,
            transport,
            4,
            Duration::from_secs(60),
            stats.clone(),
            stopping,
        ));
        let mut client = TcpStream::connect(address).await.unwrap();
        client.write_all(first_bytes).await.unwrap();
        let mut connection = accepted.next().await.unwrap().unwrap();
        let mut received = vec![0; first_bytes.len()];
        if !first_bytes.is_empty() {
            connection.read_exact(&mut received).await.unwrap();
        }
        assert_eq!(received, first_bytes);
        if served {
            let _ = connection.connect_info();
        }
        drop(connection);
        stats.rejections()
    }

    /// Once the learner stops taking connections, its port refuses them
    /// (it accepted them into a backlog nobody served until its graceful
    /// shutdown was over: a health check waited for its timeout).
    #[tokio::test]
    #[allow(clippy::unwrap_used)] // a test: a panic fails it
    async fn a_stopping_learner_closes_its_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopping) = watch::channel(false);
        let mut accepted = Box::pin(incoming(
            listener,
            Transport::PlainText,
            4,
            Duration::from_secs(60),
            Arc::new(IngestStats::default()),
            stopping,
        ));
        let _client = TcpStream::connect(address).await.unwrap();
        assert!(accepted.next().await.unwrap().is_ok());
        stop.send_replace(true);
        let next = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await;
        assert!(matches!(next, Ok(None)), "the stream ends");
        // Kept, as tonic keeps it through its graceful shutdown.
        let refused = TcpStream::connect(address).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn clients_of_the_other_transport_or_a_failed_handshake_are_counted() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        // A TLS ClientHello's record header (then the rest of the hello).
        let hello = [TLS_HANDSHAKE_RECORD, 0x03, 0x01, 0x00, 0xf4, 0x01];
        let count = |reason: &str| [(reason.to_owned(), 1)].into();
        let mutual = Transport::Tls { mutual: true };

        // Plain HTTP/2 at a TLS listener, and TLS at a plain one.
        let plain_at_tls = refusals_after(mutual, preface, false).await;
        assert_eq!(plain_at_tls, count("plain_text_at_tls"));
        let tls_at_plain = refusals_after(Transport::PlainText, &hello, true).await;
        assert_eq!(tls_at_plain, count("tls_at_plain_text"));
        // A TLS hello whose connection closed before tonic served it: its
        // handshake failed. Once served, it did not.
        let failed = refusals_after(mutual, &hello, false).await;
        assert_eq!(failed, count("tls_handshake_failed"));
        assert!(refusals_after(mutual, &hello, true).await.is_empty());
        // Each listener's own clients count nothing, nor does a client
        // that sent nothing (a TCP probe).
        assert!(
            refusals_after(Transport::PlainText, preface, true)
                .await
                .is_empty()
        );
        assert!(refusals_after(mutual, b"", false).await.is_empty());
        assert!(
            refusals_after(Transport::PlainText, b"", false)
                .await
                .is_empty()
        );
    }

    #[test]
    fn the_open_file_limit_caps_the_connections() {
        let cap = connection_cap(usize::MAX);
        let limit = open_file_limit().unwrap();
        // Raised as far as it goes, and the connections leave room for
        // the learner's own files.
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(cap as u64, limit.rlim_cur - files_kept(limit.rlim_cur));
        // A small limit keeps a quarter for files, never all of it.
        assert_eq!(256 - files_kept(256), 192);
        assert_eq!(8 - files_kept(8), 6);
        // A setting within the limit is kept.
        assert_eq!(connection_cap(8), 8);
    }
}
