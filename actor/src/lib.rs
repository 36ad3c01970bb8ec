//! An flgfn actor: samples trajectories with the latest policy, computes
//! their local energy terms, and streams them to the learner.
//!
//! # Layout
//!
//! - [`worker`]: the rollout thread that owns the policy and rolls out one
//!   chunk per credit, with the weights that came with the credit.
//! - [`cli`]: flags shared by the actor and load-generator binaries.
//! - [`connection`]: one session with the learner (handshake, then grants
//!   in and chunks out on one stream).
//! - [`loadgen`]: many synthetic actors in one process, for load tests.
//! - [`health`]: the learner's health check, as `flgfn-health` asks it.
//! - [`run`] (this file): starts the worker and keeps a session open,
//!   reconnecting with exponential backoff when the learner goes away.

pub mod cli;
pub mod connection;
pub mod health;
pub mod loadgen;
pub mod worker;

/// What this actor is built from: its version and commit, with
/// ", modified" when the code differs from the commit (see
/// `common/build_support/provenance.rs`). Logged when it connects, shown by
/// `--version`.
pub const BUILD: &str = env!("FLGFN_BUILD");

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use flgfn_common::config::Config;
use flgfn_common::env::TaskSpec;
use flgfn_common::policy::{ModelSpec, set_threads};
use flgfn_common::rollout::Behaviour;
use flgfn_common::tasks;
use rand::Rng;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error_span, info, warn};

use crate::connection::{Counts, ProgressLine, Session, SessionEnd, SessionError};
use crate::worker::{Order, Seeding, Worker, WorkerReport};

/// Settings that are not part of the shared configuration file.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// Shown in the learner's logs.
    pub name: String,
    /// `Some(n)`: draw actions from seed `config.seed + 1 + n`, to
    /// reproduce a run. `None` (the default): a stream of its own, mixed
    /// from the seed, the learner-assigned actor id and OS entropy, so
    /// actors of one configuration never draw the same trajectories.
    pub seed_offset: Option<u64>,
}

/// What an actor did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActorReport {
    /// Weight versions loaded, in order: the first
    /// [`worker::VERSIONS_KEPT`].
    pub versions_applied: Vec<u64>,
    /// Weight versions loaded, all of them.
    pub versions_loaded: u64,
    /// Sum over the versions loaded of the microseconds from their arrival
    /// to the rollout that loaded them (see [`ActorReport::received_to_use_ms`]).
    pub received_to_use_us: u64,
    /// Weight versions received (each came with a credit).
    pub versions_received: u64,
    /// Credits received: rollouts the learner asked for.
    pub credits: u64,
    /// Rollouts done.
    pub rollouts: u64,
    /// Chunks handed to the gRPC stream (the learner acknowledges none
    /// individually; see [`connection::Counts`]).
    pub chunks_sent: u64,
    /// Transitions sent to the learner.
    pub transitions_sent: u64,
    /// The seed of the action draws.
    pub seed: Option<u64>,
    /// A hash of the first chunk's actions (see [`WorkerReport`]).
    pub first_chunk_digest: Option<u64>,
    /// The actor id of the latest session opened.
    pub actor_id: u64,
    /// Connection attempts made, successful or not (each a session, by
    /// number, once it connects).
    pub connection_attempts: u32,
    /// Of those, sessions the learner opened.
    pub sessions_opened: u32,
    /// Whether the learner said training was over.
    pub training_done: bool,
    /// Chunks rolled out but not sent: their credit belonged to an earlier
    /// session (the learner may have restarted since), their session broke
    /// or training ended before they could be sent, or the upload refused
    /// them (full: the learner read none of the last ones; or a chunk over
    /// the message limit).
    pub stale_chunks_dropped: u64,
    /// Rollouts still running when the actor left, dropped half-way (not
    /// in `rollouts`): a stop's drain gave up waiting for them, or the
    /// actor left for training's end, an error or giving up.
    pub abandoned_rollouts: u64,
    /// Credits not rolled out, or rollouts dropped half-way, because their
    /// session ended first (the learner restarted or ended training, the
    /// connection broke, or the learner cut a session whose rollouts were
    /// too slow) or a stop's drain skipped them.
    pub orders_skipped: u64,
    /// Whether a stop's drain ended with the connection broken before the
    /// learner ended the session: its last chunks may not have arrived.
    pub stop_unconfirmed: bool,
}

/// Why an actor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] flgfn_common::config::ConfigError),
    /// The learner refused this actor (task or model mismatch, bad data).
    #[error(transparent)]
    Refused(SessionError),
    /// A fault no retry can fix, found on this side (a learner URL or TLS
    /// setting that cannot be used, chunks too large for the learner) or
    /// in what the learner sent.
    #[error("{0}")]
    Fatal(String),
    /// `actor.reconnect_attempts` tries in a row found no working session
    /// (the learner unreachable, full, or cutting sessions short).
    #[error(
        "gave up after {attempts} attempts in a row without a working session (actor.reconnect_attempts; 0 retries for ever); last error: {last}"
    )]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The rollout worker failed (e.g. weights that do not load), or its
    /// thread could not start.
    #[error("rollout worker: {0}")]
    Worker(String),
}

/// The exit status of an actor (or load generator) that gave up reaching
/// the learner (`actor.reconnect_attempts`): EX_TEMPFAIL, so that a job
/// system or script can tell "try again later" from a fault no retry
/// fixes (status 1) and from a run that ended (0).
pub const EXIT_LEARNER_UNREACHABLE: u8 = 75;

/// The exit status of `flgfn-actor` and `flgfn-loadgen` for `result`
/// (the error said as [`flgfn_common::telemetry::exit_status`] says it):
/// [`EXIT_LEARNER_UNREACHABLE`] where the error is, or wraps, an actor
/// that gave up reaching the learner.
pub fn exit_status(program: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    let unreachable = result.as_ref().is_err_and(|error| {
        error.chain().any(|cause| {
            matches!(
                cause.downcast_ref::<ActorError>(),
                Some(ActorError::GaveUp { .. })
            )
        })
    });
    let status = flgfn_common::telemetry::exit_status(program, result);
    if unreachable {
        std::process::ExitCode::from(EXIT_LEARNER_UNREACHABLE)
    } else {
        status
    }
}

/// Most orders (and chunks) queued inside an actor.
const MAX_QUEUED_ORDERS: usize = 4096;

/// Warnings about `actor.learner` that are no error (once per process: a
/// load generator runs many connections): a token in plain text beyond
/// loopback, no port, a path.
fn warn_about_learner_url(learner: &str, has_token: bool) {
    static PLAIN_TEXT_WARNED: std::sync::Once = std::sync::Once::new();
    if has_token && plain_text_beyond_loopback(learner) {
        PLAIN_TEXT_WARNED.call_once(|| warn!(
            learner = %learner,
            "the token travels in clear to a learner beyond loopback (http://): fine on a private network; elsewhere serve TLS and use https:// with tls.ca_file"
        ));
    }
    // (Validated as a URL already; parsed here for two warnings.)
    let learner_uri = learner.parse::<tonic::codegen::http::Uri>().ok();
    // An http:// URL without a port means port 80: most likely not where
    // the learner listens, and refusals there read as an outage. (An
    // https:// one may well be an ingress on 443.)
    static NO_PORT_WARNED: std::sync::Once = std::sync::Once::new();
    if learner.starts_with("http://")
        && learner_uri.as_ref().is_some_and(|uri| uri.port().is_none())
    {
        NO_PORT_WARNED.call_once(|| warn!(
            learner = %learner,
            "actor.learner names no port: connecting to port 80; a learner listens on 50051 unless told otherwise"
        ));
    }
    // A path is not used: gRPC calls go to /flgfn.v1.Learner/... on the
    // host and port whatever follows them.
    static PATH_WARNED: std::sync::Once = std::sync::Once::new();
    if let Some(uri) = &learner_uri
        && !matches!(uri.path(), "" | "/")
    {
        PATH_WARNED.call_once(|| warn!(
            learner = %learner,
            path = uri.path(),
            "actor.learner names a path, which is not used: the actor calls the learner's gRPC service on that host and port"
        ));
    }
}

/// What every session of one actor shows the learner, read once.
struct Connecting {
    task: TaskSpec,
    model: ModelSpec,
    envs: usize,
    token: Option<flgfn_common::auth::Token>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Connecting {
    fn new(config: &Config) -> Result<Self, ActorError> {
        let env = tasks::build(&config.task)?;
        Ok(Connecting {
            task: env.spec(),
            model: ModelSpec::new(env.as_ref(), &config.model),
            envs: config.envs_for(env.as_ref()),
            token: flgfn_common::auth::load_token(&config.auth)?,
            tls: client_tls(config)?,
        })
    }
}

/// Waits `pause` before the next attempt; false where the actor is to
/// stop instead (asked to, or its rollout side has stopped).
async fn wait_to_reconnect<S: Future<Output = ()>>(
    pause: Duration,
    shutdown: std::pin::Pin<&mut S>,
    orders: &mpsc::Sender<Order>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        () = shutdown => false,
        () = orders.closed() => false,
    }
}

/// Runs an actor until the learner finishes training, `shutdown` resolves,
/// the learner refuses it, `actor.reconnect_attempts` run out, or its
/// rollout worker fails. It sets libtorch's thread count for the whole
/// process to `actor.threads` (an actor is a process of its own; tests
/// that run several in one process set them all alike).
pub async fn run(
    config: Config,
    options: ActorOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ActorReport, ActorError> {
    let span = actor_span(&options.name, &config.actor.learner);
    run_actor(config, options, shutdown).instrument(span).await
}

/// The span every event of one actor (a generated one too) carries: who
/// it is and which policy it samples with; the connection records the
/// last two (in JSON logs only: see `telemetry::record_latest`). At the
/// error level, so that a log filtered to warnings keeps these fields on
/// the warnings it shows.
pub(crate) fn actor_span(name: &str, learner: &str) -> tracing::Span {
    error_span!(
        "actor",
        actor_name = %name,
        learner = %learner,
        actor_id = tracing::field::Empty,
        policy_version = tracing::field::Empty,
    )
}

async fn run_actor(
    config: Config,
    options: ActorOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ActorReport, ActorError> {
    config.validate()?;
    let env = tasks::build(&config.task)?;
    let model = ModelSpec::new(env.as_ref(), &config.model);
    set_threads(config.actor.threads);
    let actor = &config.actor;
    let envs = config.envs_for(env.as_ref());
    // Said before the first attempt, which may take up to its timeout:
    // the span names the learner.
    info!(
        envs,
        threads = actor.threads,
        "actor starting; connecting to the learner"
    );

    // Orders are bounded by the learner's credits; this only caps what a
    // misbehaving learner could make us queue.
    let (order_sender, orders) = mpsc::channel(MAX_QUEUED_ORDERS);
    let (chunk_sender, mut chunks) = mpsc::channel(MAX_QUEUED_ORDERS);
    let current_session = Arc::new(AtomicU32::new(0));
    let abandon = Arc::new(AtomicBool::new(false));
    let seeding = match options.seed_offset {
        Some(offset) => Seeding::Fixed(config.seed.wrapping_add(1).wrapping_add(offset)),
        None => Seeding::Distinct(config.seed),
    };
    let worker = Worker {
        env,
        model: model.clone(),
        orders,
        out: chunk_sender,
        current_session: current_session.clone(),
        behaviour: Behaviour::from(actor),
        envs,
        seeding,
        abandon: abandon.clone(),
    };
    // The rollout thread's events (its seed) say which actor they are.
    let span = tracing::Span::current();
    let worker = std::thread::Builder::new()
        .name("flgfn-rollout".to_owned())
        .spawn(move || span.in_scope(|| worker.run()))
        .map_err(|e| ActorError::Worker(format!("cannot start its thread: {e}")))?;

    let mut report = ActorReport::default();
    let (result, counts) = stay_connected(
        &config,
        &options.name,
        Plumbing {
            chunks: &mut chunks,
            orders: &order_sender,
            current_session: &current_session,
        },
        &mut report,
        shutdown,
    )
    .await;

    // Closing both channels stops the worker at its next rollout, and the
    // one in progress (if the drain gave up on it) at its next step: its
    // chunk could not be sent any more.
    let unsent = close_and_count(&mut chunks);
    drop(chunks);
    drop(order_sender);
    abandon.store(true, Ordering::Relaxed);
    let joined: Result<WorkerReport, ActorError> =
        match tokio::task::spawn_blocking(move || worker.join()).await {
            Err(e) => Err(ActorError::Worker(e.to_string())),
            Ok(Err(payload)) => Err(ActorError::Worker(format!(
                "the rollout thread panicked: {}",
                flgfn_common::telemetry::panic_message(&*payload)
            ))),
            Ok(Ok(worked)) => worked.map_err(|e| ActorError::Worker(e.to_string())),
        };
    // A rollout thread that failed ends the actor in error, whatever the
    // connection's end; what was sent still says how far it got (the
    // thread's own counts went with it), in the same final line.
    let (worker_report, result) = match joined {
        Ok(worker_report) => (worker_report, result),
        Err(error) => (WorkerReport::default(), Err(error)),
    };
    report.versions_applied = worker_report.versions_applied;
    report.versions_loaded = worker_report.versions_loaded;
    report.received_to_use_us = worker_report.received_to_use_us;
    report.rollouts = worker_report.rollouts;
    report.seed = worker_report.seed;
    report.first_chunk_digest = worker_report.first_chunk_digest;
    report.add_counts(counts);
    report.stale_chunks_dropped += worker_report.undelivered + unsent;
    report.abandoned_rollouts = worker_report.abandoned;
    report.orders_skipped = worker_report.orders_skipped;
    if worker_report.abandoned > 0 {
        if report.training_done {
            // Its chunk could not have been trained: no news.
            info!("left the rollout in progress unfinished: training is over");
        } else {
            warn!("left without the rollout in progress (abandoned half-way)");
        }
    }
    // Named as in `rolling out` and the report (a trial read `chunks`
    // beside `chunks_sent` as two counts). Not for an actor that never
    // tried to connect (its token or TLS files unreadable): its error
    // says all there is.
    if report.connection_attempts == 0 {
        return result.map(|()| report);
    }
    // Why, in the line itself: training's end also has its own line, a
    // stop its `stop requested`, an error the message that follows.
    let ended_by = if result.is_err() {
        "error"
    } else if report.training_done {
        "training_done"
    } else {
        "stop"
    };
    info!(
        %ended_by,
        chunks_sent = report.chunks_sent,
        transitions_sent = report.transitions_sent,
        versions_loaded = report.versions_loaded,
        // To the microsecond it is measured in.
        received_to_use_ms = (report.received_to_use_ms() * 1000.0).round() / 1000.0,
        connection_attempts = report.connection_attempts,
        sessions_opened = report.sessions_opened,
        // Rolled out but never sent (an earlier session's, or a broken one's).
        unsent_chunks = report.stale_chunks_dropped,
        // Credits whose session ended before or during their rollout.
        skipped_orders = report.orders_skipped,
        "actor stopped"
    );
    result.map(|()| report)
}

/// Closes the channel of rolled-out chunks and counts those still in it:
/// chunks the connection never took (training ended, or the session
/// failed, with them queued). A rollout that finishes after the close
/// finds the channel closed and counts itself.
fn close_and_count(chunks: &mut mpsc::Receiver<worker::SampledChunk>) -> u64 {
    chunks.close();
    let mut left = 0;
    while let Ok(sampled) = chunks.try_recv() {
        if sampled.session != worker::FLUSH_SESSION {
            left += 1;
        }
    }
    left
}

/// Reconnection delays: doubling from `initial` up to `max`, each drawn
/// between half and all of the current delay, so that a fleet that lost
/// its learner at one moment does not come back in lockstep.
#[derive(Debug, Clone)]
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial.min(max),
        }
    }

    /// Back to `initial`: a connection worked, the next outage is new.
    fn reset(&mut self) {
        self.current = self.initial.min(self.max);
    }

    /// The pause before the next attempt; the delay after it doubles.
    fn next_pause(&mut self, rng: &mut impl Rng) -> Duration {
        let pause = self.current.mul_f64(rng.random_range(0.5..=1.0));
        self.current = (self.current * 2).min(self.max);
        pause
    }
}

/// The host of `uri`, an IPv6 address without its brackets (`Uri` keeps
/// them: `[fd00::5]`).
fn url_host(uri: &tonic::codegen::http::Uri) -> &str {
    uri.host().unwrap_or_default().trim_matches(['[', ']'])
}

/// Whether `url` is plain text (`http://`) to a host other than this one.
fn plain_text_beyond_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    let host = url_host(&uri);
    let host = host.strip_suffix('.').unwrap_or(host);
    uri.scheme_str() == Some("http")
        && !host.eq_ignore_ascii_case("localhost")
        && !host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// TLS for an `https://` learner URL: the CA of `tls.ca_file`, the name of
/// `tls.domain` (default: the URL's host), and a client certificate when
/// `tls.cert_file` is set (mutual TLS). None for `http://`, which is
/// refused when `[tls]` names files: the learner then serves TLS, and the
/// plain-text attempts would carry the token in clear, again at every
/// retry.
pub fn client_tls(
    config: &Config,
) -> Result<Option<tonic::transport::ClientTlsConfig>, flgfn_common::config::ConfigError> {
    let tls = &config.tls;
    if config.actor.learner.starts_with("http://") && tls.names_client_files() {
        return Err(flgfn_common::config::ConfigError::invalid(
            "actor.learner",
            format!(
                "{} is plain text, but [tls] names certificate files: use https:// (in plain text the token would travel in clear)",
                config.actor.learner
            ),
        ));
    }
    client_tls_for(&config.actor.learner, tls)
}

/// TLS for `url` with the files and name of `tls` (see [`client_tls`]);
/// None unless `url` is `https://`.
pub fn client_tls_for(
    url: &str,
    tls: &flgfn_common::auth::TlsConfig,
) -> Result<Option<tonic::transport::ClientTlsConfig>, flgfn_common::config::ConfigError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    if !url.starts_with("https://") {
        return Ok(None);
    }
    let files = flgfn_common::auth::read_tls(tls, flgfn_common::auth::TlsRole::Client)?;
    let Some(ca) = files.ca else {
        return Err(flgfn_common::config::ConfigError::invalid(
            "tls.ca_file",
            "an https:// learner needs the CA that signed its certificate",
        ));
    };
    let name = server_name(url, &tls.domain)?;
    let mut client = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(name);
    if let Some((cert, key)) = files.identity {
        client = client.identity(Identity::from_pem(cert, key));
    }
    Ok(Some(client))
}

/// The name the learner's certificate is checked against: `tls.domain`,
/// else the URL's host, brackets taken off an IPv6 address (tonic would
/// pass `[fd00::5]` on, which is no name, and every connection would fail
/// naming no key). One that is neither a DNS name nor an IP address is
/// refused here, naming where it came from.
fn server_name(url: &str, domain: &str) -> Result<String, flgfn_common::config::ConfigError> {
    let (field, name) = if domain.is_empty() {
        let host = url
            .parse::<tonic::codegen::http::Uri>()
            .map(|uri| url_host(&uri).to_owned())
            .unwrap_or_default();
        ("actor.learner", host)
    } else {
        ("tls.domain", domain.to_owned())
    };
    match rustls::pki_types::ServerName::try_from(name.as_str()) {
        Ok(_) => Ok(name),
        Err(_) => Err(flgfn_common::config::ConfigError::invalid(
            field,
            format!(
                "`{name}` is not a name a certificate can be checked against: a DNS name or an IP address, without scheme or port"
            ),
        )),
    }
}

/// The channels between a connection and whatever rolls out its orders.
pub struct Plumbing<'a> {
    /// Chunks rolled out.
    pub chunks: &'a mut mpsc::Receiver<worker::SampledChunk>,
    /// One order per credit.
    pub orders: &'a mpsc::Sender<worker::Order>,
    /// The session now open.
    pub current_session: &'a AtomicU32,
}

/// This machine's name, for actor names in the learner's logs and its
/// lost-chunk counts: `HOSTNAME` where the shell exports it (containers,
/// most login shells), else the kernel's (systemd units and Slurm steps
/// often lack the variable), else "localhost".
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A wait as seconds to the millisecond, a number in JSON logs (a
/// `Duration` field is text there, `107.071808ms`).
fn to_the_millisecond(wait: Duration) -> f64 {
    (wait.as_secs_f64() * 1e3).round() / 1e3
}

/// Whether the `failures`-th failed attempt in a row is logged as a
/// warning (the others at debug): an outage's first two, then the 4th,
/// 8th, 16th... Dozens of actors, or a load generator's hundreds,
/// retrying a wrong port would otherwise fill the log.
fn worth_a_warning(failures: u32) -> bool {
    failures <= 2 || failures.is_power_of_two()
}

/// The failed attempts in a row since a session was last served (or the
/// learner announced its restart): counted for `actor.reconnect_attempts`,
/// and logged above debug where [`worth_a_warning`], and at least every
/// `actor.progress_log_s` however long the outage lasts. Doubling alone
/// thins the lines out to one after 16 minutes of default backoff, then
/// after 32, 64...: an actor reconnecting for hours would say nothing for
/// hours, where a running one says `rolling out` every minute.
struct Outage {
    /// `actor.progress_log_s` (None: 0, no periodic line).
    every: Option<Duration>,
    /// Failed attempts so far.
    failures: u32,
    /// When its first attempt failed.
    started: Option<std::time::Instant>,
    /// When it last had a line above debug.
    last_line: Option<std::time::Instant>,
}

/// A failed attempt, as [`Outage::failed`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FailedAttempt {
    /// Its number in the outage, from 1.
    number: u32,
    /// Whether it is logged above debug.
    worth_a_line: bool,
    /// Since the outage's first failed attempt.
    lasted: Duration,
}

impl Outage {
    fn new(every: Option<Duration>) -> Self {
        Self {
            every,
            failures: 0,
            started: None,
            last_line: None,
        }
    }

    /// A session was served, or the learner announced its restart: the
    /// next failure starts a new outage.
    fn end(&mut self) {
        self.failures = 0;
        self.started = None;
        self.last_line = None;
    }

    /// Records a failed attempt at `now`.
    fn failed(&mut self, now: std::time::Instant) -> FailedAttempt {
        self.failures += 1;
        let started = *self.started.get_or_insert(now);
        let overdue = self.every.is_some_and(|every| {
            self.last_line
                .is_some_and(|line| now.duration_since(line) >= every)
        });
        let worth_a_line = worth_a_warning(self.failures) || overdue;
        if worth_a_line {
            self.last_line = Some(now);
        }
        FailedAttempt {
            number: self.failures,
            worth_a_line,
            lasted: now.duration_since(started),
        }
    }
}

/// How long after a learner said it stops for a restart its absence is
/// expected: failed attempts in that time are logged at info, not as
/// warnings (an operator alerting on warnings is not paged for a restart
/// by hand); later ones are warnings again, as for any outage.
const RESTART_EXPECTED_WITHIN: Duration = Duration::from_secs(60);

/// Keeps a session with the learner open, reconnecting with exponential
/// backoff, until training ends, `shutdown` resolves, the learner refuses
/// us, `actor.reconnect_attempts` run out, or the rollout side stops.
/// Counts connection attempts and training's end in `report`, and what
/// the sessions did in the [`Counts`] it gives back.
pub async fn stay_connected(
    config: &Config,
    name: &str,
    plumbing: Plumbing<'_>,
    report: &mut ActorReport,
    shutdown: impl Future<Output = ()>,
) -> (Result<(), ActorError>, Counts) {
    let actor = &config.actor;
    let Connecting {
        task,
        model,
        envs,
        token,
        tls,
    } = match Connecting::new(config) {
        Ok(connecting) => connecting,
        Err(error) => return (Err(error), Counts::default()),
    };
    warn_about_learner_url(&config.actor.learner, token.is_some());
    let Plumbing {
        chunks,
        orders,
        current_session,
    } = plumbing;
    let mut counts = Counts::default();
    let mut actor_id = 0u64;
    let mut handshake_in_session = true;
    // A line this often, while rolling out or while unable to.
    let progress_every =
        (actor.progress_log_s > 0.0).then(|| Duration::from_secs_f64(actor.progress_log_s));
    let mut progress = ProgressLine::new(progress_every);
    let mut outage = Outage::new(progress_every);
    // When the learner last said it stops for a restart, until a session
    // is served again.
    let mut restart_announced: Option<std::time::Instant> = None;
    let mut backoff = Backoff::new(
        Duration::from_secs_f64(actor.reconnect_initial_s),
        Duration::from_secs_f64(actor.reconnect_max_s),
    );
    tokio::pin!(shutdown);
    let result = loop {
        report.connection_attempts += 1;
        let chunks_before = counts.chunks_sent;
        let session = Session {
            url: &actor.learner,
            keepalive: Duration::from_secs_f64(actor.keepalive_s),
            progress: &mut progress,
            actor_name: name,
            task: &task,
            model: &model,
            envs,
            truncate_fraction: actor.truncate_fraction,
            max_message_bytes: config.learner.max_message_bytes,
            chunks: &mut *chunks,
            orders,
            current_session,
            counts: &mut counts,
            actor_id: &mut actor_id,
            handshake_in_session: &mut handshake_in_session,
            session: report.connection_attempts,
            token: token.as_ref(),
            tls: tls.as_ref(),
        };
        // Stopping is the session's to handle: it drains first.
        let outcome = session.run(shutdown.as_mut()).await;
        // Orders of the session that ended are not rolled out while the
        // next one connects: their chunks could not be sent (sessions are
        // numbered from 1). A stopped session keeps its number: no other
        // follows, and a rollout its drain gave up on is then counted as
        // abandoned when the actor leaves, not as skipped.
        if !matches!(
            outcome,
            Ok(SessionEnd::Stopped | SessionEnd::StoppedUnconfirmed(_))
        ) {
            current_session.store(0, Ordering::Release);
        }
        match outcome {
            Ok(SessionEnd::TrainingDone) => {
                report.training_done = true;
                // (At max_steps, or stopped on purpose: the learner's
                // news does not say which, and both end the run.)
                info!(actor_id, "the learner ended training");
                break Ok(());
            }
            Ok(SessionEnd::WorkerStopped | SessionEnd::Stopped) => break Ok(()),
            Ok(SessionEnd::StoppedUnconfirmed(why)) => {
                // Told apart from a clean drain: the learner (crashed,
                // say) never said it took them. (A session that sent
                // nothing had nothing to lose.)
                let session_chunks_sent = counts.chunks_sent - chunks_before;
                if session_chunks_sent > 0 {
                    warn!(
                        actor_id,
                        %why,
                        session_chunks_sent,
                        "stopping, the session ended before the learner confirmed the last chunks: those on their way may not have arrived (its `session ended` line counts what it took)"
                    );
                    report.stop_unconfirmed = true;
                }
                break Ok(());
            }
            Ok(SessionEnd::LearnerRestarting) => {
                // Planned, not an outage: no failure so far, and the
                // first wait is the shortest.
                outage.end();
                backoff.reset();
                restart_announced = Some(std::time::Instant::now());
                let pause = backoff.next_pause(&mut rand::rng());
                info!(
                    actor_id,
                    retry_in_s = to_the_millisecond(pause),
                    session_chunks_sent = counts.chunks_sent - chunks_before,
                    "the learner stops for a restart; reconnecting"
                );
                if !wait_to_reconnect(pause, shutdown.as_mut(), orders).await {
                    break Ok(());
                }
            }
            Err(SessionError::Refused(status)) if status.code() == tonic::Code::Unauthenticated => {
                let whose = match &token {
                    None => "this actor has no token".to_owned(),
                    Some(token) => format!("this actor's token is from {}", token.from()),
                };
                break Err(ActorError::Refused(SessionError::Refused(
                    tonic::Status::unauthenticated(format!("{} ({whose})", status.message())),
                )));
            }
            Err(refused @ SessionError::Refused(_)) => break Err(ActorError::Refused(refused)),
            Err(SessionError::Fatal(message)) => break Err(ActorError::Fatal(message)),
            Err(SessionError::Retry {
                message, served, ..
            }) => {
                // The rollout side stopped (its error is the actor's, and
                // the caller reports it): no point in reconnecting.
                if orders.is_closed() {
                    break Ok(());
                }
                let failed = if served {
                    // The connection worked: this is a new outage.
                    outage.end();
                    backoff.reset();
                    restart_announced = None;
                    None
                } else {
                    Some(outage.failed(std::time::Instant::now()))
                };
                if let Some(failed) = failed
                    && actor.reconnect_attempts > 0
                    && failed.number >= actor.reconnect_attempts
                {
                    break Err(ActorError::GaveUp {
                        attempts: failed.number,
                        last: message,
                    });
                }
                let pause = backoff.next_pause(&mut rand::rng());
                if let Some(failed) = failed {
                    let expected =
                        restart_announced.is_some_and(|at| at.elapsed() < RESTART_EXPECTED_WITHIN);
                    let what = if expected {
                        "the learner is not back from its restart yet; reconnecting"
                    } else {
                        "learner unavailable; reconnecting"
                    };
                    let failures = failed.number;
                    let unavailable_s = failed.lasted.as_secs();
                    match (failed.worth_a_line, expected) {
                        (true, false) => {
                            warn!(error = %message, retry_in_s = to_the_millisecond(pause), failures, unavailable_s, "{what}");
                        }
                        (true, true) => {
                            info!(error = %message, retry_in_s = to_the_millisecond(pause), failures, unavailable_s, "{what}");
                        }
                        (false, _) => {
                            debug!(error = %message, retry_in_s = to_the_millisecond(pause), failures, unavailable_s, "{what}");
                        }
                    }
                } else {
                    // Nothing failed yet: the line says so rather than
                    // count `failures=0`. What the session sent lets an
                    // operator match it with the learner's `session
                    // ended` (none, where the learner crashed).
                    warn!(
                        error = %message,
                        retry_in_s = to_the_millisecond(pause),
                        session_chunks_sent = counts.chunks_sent - chunks_before,
                        "connection to the learner lost; reconnecting"
                    );
                }
                if !wait_to_reconnect(pause, shutdown.as_mut(), orders).await {
                    break Ok(());
                }
            }
        }
    };
    report.actor_id = actor_id;
    (result, counts)
}

impl ActorReport {
    /// Mean milliseconds from a version's arrival to the rollout that
    /// loaded it: the actor's share of publish-to-use latency (the
    /// learner's is its `publish_to_send_ms`, and the link's in between).
    pub fn received_to_use_ms(&self) -> f64 {
        self.received_to_use_us as f64 / 1e3 / self.versions_loaded.max(1) as f64
    }

    /// Copies the connection's counters into the report.
    pub fn add_counts(&mut self, counts: Counts) {
        self.chunks_sent = counts.chunks_sent;
        self.transitions_sent = counts.transitions_sent;
        self.credits = counts.credits;
        self.versions_received = counts.versions_received;
        self.stale_chunks_dropped = counts.stale_chunks_dropped;
        self.sessions_opened = counts.sessions_opened;
    }

    /// Adds `other`'s counts to this report's (several actors' totals, as
    /// the load generator sums its own); what is not a count (the seed,
    /// the versions applied, the flags) stays.
    pub fn add_totals(&mut self, other: &ActorReport) {
        self.versions_loaded += other.versions_loaded;
        self.received_to_use_us += other.received_to_use_us;
        self.versions_received += other.versions_received;
        self.credits += other.credits;
        self.rollouts += other.rollouts;
        self.chunks_sent += other.chunks_sent;
        self.transitions_sent += other.transitions_sent;
        self.connection_attempts = self
            .connection_attempts
            .saturating_add(other.connection_attempts);
        self.sessions_opened = self.sessions_opened.saturating_add(other.sessions_opened);
        self.stale_chunks_dropped += other.stale_chunks_dropped;
        self.abandoned_rollouts += other.abandoned_rollouts;
        self.orders_skipped += other.orders_skipped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Totals add every count of two reports, and keep what is not one.
    #[test]
    fn totals_add_every_count() {
        let one = ActorReport {
            versions_loaded: 1,
            received_to_use_us: 2,
            versions_received: 3,
            credits: 4,
            rollouts: 5,
            chunks_sent: 6,
            transitions_sent: 7,
            connection_attempts: 8,
            sessions_opened: 9,
            stale_chunks_dropped: 10,
            abandoned_rollouts: 11,
            orders_skipped: 12,
            seed: Some(13),
            training_done: true,
            ..ActorReport::default()
        };
        let mut total = one.clone();
        total.add_totals(&one);
        let doubled = ActorReport {
            versions_loaded: 2,
            received_to_use_us: 4,
            versions_received: 6,
            credits: 8,
            rollouts: 10,
            chunks_sent: 12,
            transitions_sent: 14,
            connection_attempts: 16,
            sessions_opened: 18,
            stale_chunks_dropped: 20,
            abandoned_rollouts: 22,
            orders_skipped: 24,
            ..one.clone()
        };
        assert_eq!(total, doubled);
    }

    /// The certificate is checked against the URL's host, an IPv6 one
    /// without its brackets, or `tls.domain`; a name that is neither a DNS
    /// name nor an IP address is refused naming where it came from.
    #[test]
    fn the_server_name_is_the_hosts_or_tls_domain_and_checked() {
        assert_eq!(
            server_name("https://[fd00::5]:50051", "").unwrap(),
            "fd00::5"
        );
        assert_eq!(server_name("https://learner:50051", "").unwrap(), "learner");
        assert_eq!(
            server_name("https://10.0.0.7:50051", "").unwrap(),
            "10.0.0.7"
        );
        assert_eq!(
            server_name("https://[fd00::5]:50051", "learner.example").unwrap(),
            "learner.example"
        );
        for domain in ["learner:50051", "https://learner"] {
            let error = server_name("https://learner:50051", domain)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("tls.domain") && error.contains(domain),
                "{error}"
            );
        }
    }

    #[test]
    fn an_outage_warns_at_its_first_failures_then_ever_more_rarely() {
        let warned: Vec<u32> = (0..=70).filter(|&n| worth_a_warning(n)).collect();
        assert_eq!(warned, [0, 1, 2, 4, 8, 16, 32, 64]);
    }

    /// A long outage (an attempt every 4 s for an hour) has a line at
    /// least every minute on top of the doubling ones, and says how long
    /// it has lasted; with no periodic line, the doubling ones alone. A
    /// served session starts a new outage.
    #[test]
    fn a_long_outage_says_so_at_least_every_progress_interval() {
        let start = std::time::Instant::now();
        let lines = |outage: &mut Outage| -> Vec<(u32, u64)> {
            (1..=900u32)
                .filter_map(|n| {
                    let now = start + Duration::from_secs(4 * u64::from(n));
                    let failed = outage.failed(now);
                    assert_eq!(failed.number, n);
                    failed.worth_a_line.then_some((n, failed.lasted.as_secs()))
                })
                .collect()
        };
        let mut outage = Outage::new(Some(Duration::from_secs(60)));
        let periodic = lines(&mut outage);
        assert_eq!(periodic[..3], [(1, 0), (2, 4), (4, 12)]);
        assert!(
            periodic.windows(2).all(|w| 4 * (w[1].0 - w[0].0) <= 60),
            "{periodic:?}"
        );
        let (last, lasted) = *periodic.last().unwrap();
        assert!(900 - last < 15, "{periodic:?}");
        assert_eq!(lasted, 4 * u64::from(last - 1));
        let mut quiet = Outage::new(None);
        let doubling: Vec<u32> = lines(&mut quiet).into_iter().map(|(n, _)| n).collect();
        assert_eq!(doubling, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
        outage.end();
        let first = FailedAttempt {
            number: 1,
            worth_a_line: true,
            lasted: Duration::ZERO,
        };
        assert_eq!(outage.failed(start), first);
    }

    #[test]
    fn reconnection_delays_double_up_to_the_cap_with_jitter_and_reset() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(1000));
        let mut pauses = Vec::new();
        for delay in [100, 200, 400, 800, 1000, 1000] {
            let pause = backoff.next_pause(&mut rng);
            assert!(
                pause >= ms(delay) / 2 && pause <= ms(delay),
                "{pause:?} for a delay of {delay} ms"
            );
            pauses.push(pause);
        }
        // Jittered: not the same fraction of the delay every time.
        assert!(pauses[4] != pauses[5], "{pauses:?}");
        backoff.reset();
        assert!(backoff.next_pause(&mut rng) <= ms(100));
    }

    #[test]
    fn plain_text_is_told_apart_from_loopback_and_tls() {
        for (url, beyond) in [
            ("http://learner:50051", true),
            ("http://10.0.0.7:50051", true),
            ("http://127.0.0.1:50051", false),
            ("http://[::1]:50051", false),
            ("http://localhost:50051", false),
            ("http://LOCALHOST.:50051", false),
            ("http://[::ffff:127.0.0.1]:50051", false),
            ("https://learner:50051", false),
        ] {
            assert_eq!(plain_text_beyond_loopback(url), beyond, "{url}");
        }
    }

    #[test]
    fn a_plain_text_url_with_tls_files_is_refused() {
        let mut config = Config::default();
        config.actor.learner = "http://learner:50051".to_owned();
        assert!(client_tls(&config).unwrap().is_none());
        config.tls.ca_file = "ca.pem".to_owned();
        let error = client_tls(&config).unwrap_err().to_string();
        assert!(
            error.contains("actor.learner") && error.contains("https://"),
            "{error}"
        );
    }

    /// A rollout side that stopped (its receiver of orders dropped) ends
    /// the reconnect loop, even while the learner cannot be reached:
    /// otherwise the actor would retry for ever with nothing to roll out.
    #[tokio::test]
    async fn a_stopped_rollout_side_ends_the_reconnect_loop() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = Config::default();
        config.actor.learner = format!("http://127.0.0.1:{port}");
        config.actor.reconnect_initial_s = 0.05;
        let (_chunk_sender, mut chunks) = mpsc::channel(1);
        let (orders, order_receiver) = mpsc::channel(1);
        drop(order_receiver);
        let current_session = AtomicU32::new(0);
        let mut report = ActorReport::default();
        let (result, counts) = tokio::time::timeout(
            Duration::from_secs(20),
            stay_connected(
                &config,
                "test",
                Plumbing {
                    chunks: &mut chunks,
                    orders: &orders,
                    current_session: &current_session,
                },
                &mut report,
                std::future::pending(),
            ),
        )
        .await
        .expect("the loop ends by itself");
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(report.connection_attempts, 1);
        assert_eq!(counts.sessions_opened, 0, "nothing listens there");
    }
}
