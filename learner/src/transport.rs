//! The gRPC transport: TLS, the token every call shows, the HTTP/2
//! settings every connection gets, and the largest messages and
//! handshakes the learner accepts.

use std::sync::Arc;
use std::time::Duration;

use flgfn_common::auth;
use flgfn_common::config::{Config, ConfigError, LearnerConfig};
use flgfn_common::env::Environment;
use flgfn_common::policy::ModelSpec;
use flgfn_common::wire;
use tonic::Status;
use tracing::warn;

use crate::error::LearnerError;
use crate::ingest::IngestStats;
use crate::{connections, service};

/// The gRPC transport, serving TLS (and requiring client certificates for
/// mutual TLS) when `[tls]` says so.
pub fn secured_transport(config: &Config) -> Result<tonic::transport::Server, LearnerError> {
    let files = auth::read_tls(&config.tls, auth::TlsRole::Learner)?;
    let Some((cert, key)) = files.identity else {
        if files.ca.is_some() {
            return Err(ConfigError::invalid(
                "tls.ca_file",
                "client certificates need the learner to serve TLS: set tls.cert_file and tls.key_file",
            )
            .into());
        }
        return Ok(server_builder(&config.learner));
    };
    let mut tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    if let Some(ca) = files.ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
    }
    server_builder(&config.learner)
        .tls_config(tls)
        .map_err(|e| {
            // tonic's own text is only "transport error": the cause says
            // which file is wrong.
            let why = flgfn_common::telemetry::with_causes(&e);
            ConfigError::invalid("tls.cert_file, tls.key_file or tls.ca_file", why).into()
        })
}

/// The learner's flow-control and keepalive settings. Credits bound what is
/// in flight, so the HTTP/2 windows only need to cover the
/// bandwidth-delay product: hyper sizes them adaptively.
/// (TCP_NODELAY and TCP keepalive are set where connections are accepted,
/// in [`connections`]: tonic applies its own settings only to the listener
/// it binds itself.)
fn server_builder(learner: &LearnerConfig) -> tonic::transport::Server {
    let keepalive = Duration::from_secs_f64(learner.keepalive_s);
    tonic::transport::Server::builder()
        .http2_adaptive_window(Some(true))
        // An actor uses two streams at a time (its session, a handshake):
        // without a limit (tonic sets none), one connection could open
        // thousands, each holding a message of up to the decode limit.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Streams the server must reset for a client's protocol errors
        // (streams beyond the limit above, bad window updates) end the
        // connection after this many; tonic passes "no limit" on unless
        // told, and a client that stops reading would queue resets
        // without end (RUSTSEC-2024-0003's pattern). Actors cause none.
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .http2_max_pending_accept_reset_streams(Some(20))
        // Free the sessions of actors that stopped answering (frozen, or
        // whose host vanished silently).
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive * 2))
}

/// Most concurrent HTTP/2 streams (calls) on one connection: further calls
/// wait for one to end.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 8;

/// Streams reset for a client's protocol errors before its connection is
/// ended with GOAWAY (ENHANCE_YOUR_CALM).
pub const MAX_LOCAL_ERROR_RESETS: usize = 256;

/// Largest health request the learner decodes: a service name (ours,
/// `flgfn.v1.Learner`, is 16 bytes).
pub const HEALTH_REQUEST_BYTES: usize = 1024;

/// The largest message the learner decodes: `max_message_bytes`, or less
/// when the largest valid chunk (`max_chunk_trajectories` trajectories of
/// the task's longest) or a handshake needs less, since a message is
/// decoded whole before its fields are checked. A handshake
/// (`handshake_bytes`, [`accepted_handshake_bytes`]) carries the task's
/// parameters, which can exceed the usual 64 KiB (thousands of set
/// levels): the learner's own task and model, plus those 64 KiB for names,
/// always fit. Weights go the other way and keep the configured limit.
pub(crate) fn accepted_message_bytes(
    learner: &LearnerConfig,
    env: &dyn Environment,
    handshake_bytes: usize,
) -> usize {
    let chunk = wire::largest_chunk_bytes(learner.max_chunk_trajectories, env.max_trajectory_len());
    learner.max_message_bytes.min(chunk.max(handshake_bytes))
}

/// The largest handshake the learner decodes: its own task and model, plus
/// 64 KiB for names. (A handshake of thousands of empty task parameters
/// takes ~15 times its size once decoded; it is refused before.)
pub(crate) fn accepted_handshake_bytes(env: &dyn Environment, model: &ModelSpec) -> usize {
    use prost::Message;
    let own_handshake = wire::proto::HandshakeRequest {
        protocol_version: wire::PROTOCOL_VERSION,
        actor_name: String::new(),
        task: Some((&env.spec()).into()),
        model: Some(model.into()),
        trajectories_per_chunk: u32::MAX,
    }
    .encoded_len();
    wire::HANDSHAKE_BYTES + own_handshake
}

/// The check every Learner call passes first: it shows the token, when
/// the learner has one (the health service stays open to probes).
/// Refusals are counted in `rejections`.
pub(crate) fn token_check(
    token: Option<auth::Token>,
    rejections: Arc<IngestStats>,
) -> impl tonic::service::Interceptor + Clone + Send + Sync + 'static {
    move |request: tonic::Request<()>| match &token {
        None => Ok(request),
        Some(token) => {
            let shown = request.metadata().get(auth::AUTHORIZATION_HEADER);
            if shown.is_some_and(|value| token.matches(value.as_bytes())) {
                Ok(request)
            } else {
                // Never the token shown; a flood logs a few lines (see
                // `IngestStats::refuse`).
                if let Some(refused_so_far) = rejections.refuse("unauthenticated") {
                    let peer = service::peer_name(connections::ConnectionInfo::of(&request));
                    // (Wrong or none: this call's, which may not be
                    // every refused caller's.)
                    let what = if shown.is_some() { "a wrong" } else { "no" };
                    warn!(
                        %peer,
                        refused_so_far,
                        "refused a call with {what} token (actors need the learner's token, from FLGFN_TOKEN or auth.token_file)"
                    );
                }
                Err(Status::unauthenticated(
                    "missing or wrong token: this learner needs its own token from every actor (FLGFN_TOKEN or auth.token_file; on the wire `authorization: Bearer <token>`)",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flgfn_common::config::TaskConfig;
    use flgfn_common::tasks;
    use flgfn_common::tasks::set_generation::SetGenerationConfig;
    use prost::Message;

    /// Thousands of set levels make a handshake larger than the usual
    /// 64 KiB floor, while the task's chunks stay small: the learner still
    /// decodes the handshake its own configuration implies.
    #[test]
    fn a_handshake_of_the_learners_own_task_always_fits() {
        let mut config = Config::default();
        let levels: Vec<f64> = (0..4096).map(|j| f64::from(j).sin() / 3.0).collect();
        config.task = TaskConfig::SetGeneration(SetGenerationConfig {
            universe: Some(4096),
            set_size: Some(2),
            levels: Some(levels),
            ..SetGenerationConfig::default()
        });
        config.learner.max_chunk_trajectories = 4;
        let env = tasks::build(&config.task).unwrap();
        let model = ModelSpec::new(env.as_ref(), &config.model);
        let handshake = wire::proto::HandshakeRequest {
            protocol_version: wire::PROTOCOL_VERSION,
            actor_name: "host/12345".to_owned(),
            task: Some((&env.spec()).into()),
            model: Some((&model).into()),
            trajectories_per_chunk: 4,
        };
        assert!(handshake.encoded_len() > wire::HANDSHAKE_BYTES);
        assert!(
            handshake.encoded_len()
                <= accepted_message_bytes(
                    &config.learner,
                    env.as_ref(),
                    accepted_handshake_bytes(env.as_ref(), &model)
                )
        );
    }
}
