//! Opening a session: the channel and its windows, the token, the
//! handshake (in the Session's headers, or as its own call for a learner
//! that predates that), and what the learner's reply sets.

use std::sync::atomic::Ordering;
use std::time::Duration;

use flgfn_common::auth::AUTHORIZATION_HEADER;
use flgfn_common::env::TaskSpec;
use flgfn_common::policy::ModelSpec;
use flgfn_common::telemetry::with_causes;
use flgfn_common::weights::WeightEncoding;
use flgfn_common::wire::proto::{self, learner_client::LearnerClient};
use flgfn_common::wire::{
    ACTOR_ID_HEADER, HANDSHAKE_HEADER, HANDSHAKE_REPLY_HEADER, MAX_HANDSHAKE_HEADER_BYTES,
    PROTOCOL_VERSION, SESSION_KEY_HEADER, TRAJECTORIES_PER_CHUNK_HEADER,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use super::status::{
    classify, handshake_refused, no_answer, not_http2, predates_handshake_header, retry,
    retry_not_http2, status_causes,
};
use super::tls::{CertificateTrouble, certificate_trouble};
use super::{Session, SessionError};

/// The smallest HTTP/2 receive window per stream of an actor (twice that
/// per connection): the default network's weights (0.36 MB in f32) ten
/// times over.
pub(super) const MIN_STREAM_WINDOW: u32 = 4 << 20;

/// The most bytes this actor's weights take in a grant: in f32 (the
/// larger encoding), with their safetensors header, as the learner bounds
/// its own.
pub(super) fn f32_weight_bytes(model: &ModelSpec, task: &TaskSpec) -> u128 {
    model.weight_bytes(WeightEncoding::F32, &model.weight_metadata(task))
}

/// HTTP/2's largest window, 2^31 - 1 bytes: h2 panics on a larger one.
pub(super) const MAX_WINDOW: u32 = (1 << 31) - 1;

/// The actor's HTTP/2 receive window per stream for weights of
/// `weight_bytes`: room for them, so that a grant comes in one round trip
/// whatever the network's size; at most half of HTTP/2's largest window,
/// so that the connection's (see [`connection_window`]) fits too.
pub(super) fn stream_window(weight_bytes: u128) -> u32 {
    u32::try_from(weight_bytes)
        .unwrap_or(u32::MAX)
        .clamp(MIN_STREAM_WINDOW, MAX_WINDOW / 2)
}

/// The connection's receive window for streams of `stream_window`: room
/// for two (a grant's weights while the last one's are read), within
/// HTTP/2's largest.
pub(super) fn connection_window(stream_window: u32) -> u32 {
    stream_window.saturating_mul(2).min(MAX_WINDOW)
}

/// A grant's bytes beyond its weights' (version, credits, field tags):
/// a few dozen, with room to spare.
const GRANT_FIELDS_BYTES: u128 = 64 << 10;

/// The decode limit for grants: this actor's own limit, raised to take
/// this network's weights of `weight_bytes` (whatever the actor's own
/// file says), or the grants the learner `declared` it sends where that
/// is less (0: a learner that did not say); gRPC frames a message in at
/// most 4 GiB. (Never more than the weights take: a learner that
/// declared 4 GiB would have each grant reserve that much.)
pub(super) fn grant_decode_limit(own: usize, weight_bytes: u128, declared: Option<u128>) -> usize {
    let grants = weight_bytes.saturating_add(GRANT_FIELDS_BYTES);
    let grants = declared
        .filter(|&declared| declared > 0)
        .map_or(grants, |declared| declared.min(grants));
    own.max(usize::try_from(grants).unwrap_or(usize::MAX))
        .min(u32::MAX as usize)
}

/// Chunks queued towards the learner. Credits bound them; the session
/// never waits to queue one, so it always keeps reading grants (a session
/// blocked on its upload while the learner waits for it to read a grant
/// would deadlock once both HTTP/2 windows fill).
pub(super) const UPLOAD_BUFFER: usize = 4096;

/// A learner that accepts the connection but never answers is as good as
/// gone.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What opening a session yields: the handshake's reply, the grants
/// coming in, and the chunks going out.
type OpenedStreams = (
    proto::HandshakeReply,
    tonic::Streaming<proto::Grant>,
    mpsc::Sender<proto::TrajectoryChunk>,
);

/// A session opened: its streams and what the handshake settled.
pub(super) struct Opened {
    pub(super) grants: tonic::Streaming<proto::Grant>,
    pub(super) upload: mpsc::Sender<proto::TrajectoryChunk>,
    pub(super) actor_id: u64,
    /// Largest message to send (the smaller of both sides' limits).
    pub(super) max_bytes: usize,
    /// Which side's limit that is, for the error.
    pub(super) max_bytes_of: &'static str,
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

    /// Connects, shakes hands and opens the Session stream: in one call
    /// where the learner takes the handshake in the Session's headers, in
    /// two (Handshake, then Session) where it predates that or the
    /// handshake is too large for a header.
    pub(super) async fn open(&mut self) -> Result<Opened, SessionError> {
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
            .initial_connection_window_size(connection_window(window))
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
        let in_one_call = if *self.handshake_in_session
            && handshake.encoded_len() <= MAX_HANDSHAKE_HEADER_BYTES
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
                self.warn_of_dropped_truncation(&opened.0);
                opened
            }
            None => {
                self.handshake_then_session(client, handshake, weight_bytes)
                    .await?
            }
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

    /// Truncated trajectories to a learner that drops them: their share
    /// of this actor's rollouts is wasted, which the actor could never see
    /// otherwise (the learner only counts them). (None cuts every one
    /// short: the configuration refuses `actor.truncate_fraction = 1`.)
    fn warn_of_dropped_truncation(&self, reply: &proto::HandshakeReply) {
        if reply.drops_truncated && self.truncate_fraction > 0.0 {
            // Once per process: the same on every reconnect, and for every
            // connection of a load generator.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!(
                truncate_fraction = self.truncate_fraction,
                "the learner trains on complete trajectories only (objective tb, or objective.drop_truncated): the truncated share of this actor's rollouts is dropped unused (set actor.truncate_fraction = 0 for this learner)"
            );
            });
        }
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
        // in the response's headers, after the limit is set: take this
        // network's weights (as with two calls, where the reply's
        // max_grant_bytes raises the limit).
        let mut client = client.max_decoding_message_size(grant_decode_limit(
            self.max_message_bytes,
            weight_bytes,
            None,
        ));
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
        weight_bytes: u128,
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
        self.warn_of_dropped_truncation(&reply);
        // Take whatever weights the learner sends (it refuses to start
        // with weights over its own limit), even if this actor's
        // learner.max_message_bytes, from another file, is lower.
        client = client.max_decoding_message_size(grant_decode_limit(
            self.max_message_bytes,
            weight_bytes,
            Some(u128::from(reply.max_grant_bytes)),
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
}
