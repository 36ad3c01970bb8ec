use std::sync::Arc;

use flgfn_common::auth::AUTHORIZATION_HEADER;
use flgfn_common::wire::proto;

use super::open::{
    MAX_WINDOW, MIN_STREAM_WINDOW, connection_window, f32_weight_bytes, grant_decode_limit,
    stream_window,
};
use super::status::classify;
use super::tls::PLAIN_TEXT_PROBE;
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
    // The largest networks: windows within HTTP/2's largest, which h2
    // asserts (a connection window of 2^31 panicked every connect).
    for hidden in [vec![16384, 16384], vec![1 << 20, 1 << 20]] {
        let stream = window(hidden.clone());
        assert!(stream >= (1 << 30) - 1, "{hidden:?}: {stream}");
        assert!(connection_window(stream) <= MAX_WINDOW, "{hidden:?}");
        assert!(connection_window(stream) >= 2 * stream, "{hidden:?}");
    }
    assert_eq!(MAX_WINDOW, 2_147_483_647);
}

/// Grants are decoded up to this network's weights (and a grant's few
/// fields), above a lower limit of the actor's own, below a lower one the
/// learner declared; never up to the 4 GiB a learner could declare.
#[test]
fn grants_are_decoded_up_to_the_weights_whatever_the_learner_declares() {
    let (own, weights) = (1 << 20, 10 << 20);
    let limit = |declared| grant_decode_limit(own, weights, declared);
    let weights = usize::try_from(weights).unwrap();
    assert!((weights..weights + (64 << 10) + 1).contains(&limit(None)));
    assert_eq!(limit(Some(u128::from(u32::MAX))), limit(None));
    assert_eq!(limit(Some(5 << 20)), 5 << 20);
    assert_eq!(limit(Some(1)), own, "never below the actor's own");
    assert_eq!(limit(Some(0)), limit(None), "0: not declared");
    assert_eq!(grant_decode_limit(own, 1 << 40, None), u32::MAX as usize);
}

/// A stand-in HTTP/2 server on `127.0.0.1:0` that records each
/// request (path, and whether it carried a token) and either drops the
/// connection unanswered (`answer` None), as a TLS server drops plain
/// text, or answers every request with that HTTP status and no gRPC
/// status, as a proxy does (401: it wants a token everywhere; 404: it has
/// no route there).
async fn recording_server(
    answer: Option<u16>,
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
                    let Some(status) = answer else {
                        return;
                    };
                    let response = tonic::codegen::http::Response::builder()
                        .status(status)
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
    let (address, requests, server) = recording_server(None).await;
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

    let (address, requests, server) = recording_server(Some(401)).await;
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

/// A proxy's HTTP 404 (tonic reads it as UNIMPLEMENTED) is retried, as a
/// route not there yet, not taken for a gRPC server without flgfn's
/// service, which is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_404_is_retried_a_grpc_unimplemented_is_final() {
    let (address, requests, server) = recording_server(Some(404)).await;
    let error = actor_with_token(address, "not-found").await;
    server.abort();
    assert!(
        matches!(error, crate::ActorError::GaveUp { .. }),
        "{error:?}"
    );
    let error = error.to_string();
    assert!(error.contains("404") && error.contains("proxy"), "{error}");
    let sessions = requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _)| path.ends_with("/Session"))
        .count();
    assert_eq!(sessions, 2, "one Session call per attempt");

    let unimplemented = Status::unimplemented("unknown service flgfn.Learner");
    let SessionError::Refused(status) = classify(unimplemented, false) else {
        panic!("a gRPC UNIMPLEMENTED is retried");
    };
    assert!(status.message().contains("actor.learner"), "{status:?}");
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
    assert!(answers_as_tls(&answering(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]).await).await);
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
    let stalled = || Status::deadline_exceeded("held a credit for 30s without sending its chunk");
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

/// A stand-in learner that opens every session (the handshake in its
/// headers), grants one credit with weights of the actor's own network,
/// and fails the session (INTERNAL, which actors retry) as soon as its
/// first chunk arrives; counting sessions and chunks.
struct CuttingLearner {
    sessions: Arc<std::sync::atomic::AtomicUsize>,
    chunks: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl proto::learner_server::Learner for CuttingLearner {
    async fn handshake(
        &self,
        _: tonic::Request<proto::HandshakeRequest>,
    ) -> Result<tonic::Response<proto::HandshakeReply>, Status> {
        Err(Status::internal(
            "this stand-in takes handshakes in sessions only",
        ))
    }

    type SessionStream = tokio_stream::wrappers::ReceiverStream<Result<proto::Grant, Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<proto::TrajectoryChunk>>,
    ) -> Result<tonic::Response<Self::SessionStream>, Status> {
        use prost::Message as _;
        use std::sync::atomic::Ordering;
        let handshake = request
            .metadata()
            .get_bin(flgfn_common::wire::HANDSHAKE_HEADER)
            .and_then(|value| value.to_bytes().ok())
            .and_then(|bytes| proto::HandshakeRequest::decode(bytes).ok())
            .ok_or_else(|| Status::invalid_argument("no handshake header"))?;
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let model = ModelSpec::from(handshake.model.clone().unwrap_or_default());
        let weights = flgfn_common::policy::Policy::new(&model, tch::Device::Cpu)
            .to_bytes(flgfn_common::weights::WeightEncoding::F32)
            .map_err(|e| Status::internal(e.to_string()))?;
        let reply = proto::HandshakeReply {
            actor_id: 1,
            task: handshake.task,
            model: handshake.model,
            version: 1,
            session_key: "0".repeat(32),
            ..Default::default()
        };
        let (grants, outbound) = tokio::sync::mpsc::channel(4);
        let mut inbound = request.into_inner();
        let chunks = Arc::clone(&self.chunks);
        tokio::spawn(async move {
            let grant = proto::Grant {
                credits: 1,
                weights: Some(proto::Weights {
                    version: 1,
                    safetensors: weights.into(),
                }),
                ..Default::default()
            };
            if grants.send(Ok(grant)).await.is_err() {
                return;
            }
            if let Ok(Some(_)) = inbound.message().await {
                chunks.fetch_add(1, Ordering::SeqCst);
                let _ = grants
                    .send(Err(Status::internal("cut after the first chunk")))
                    .await;
            }
        });
        let mut response =
            tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
        response.metadata_mut().insert_bin(
            flgfn_common::wire::HANDSHAKE_REPLY_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&reply.encode_to_vec()),
        );
        Ok(response)
    }
}

/// A learner that takes each session's first chunk and then fails the
/// session does not serve: the actor backs off and, after
/// `actor.reconnect_attempts` such sessions in a row, gives up (a chunk
/// handed to the upload reset the count, and it retried for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cut_at_their_first_chunk_count_as_failed_attempts() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (sessions, chunks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let learner = CuttingLearner {
        sessions: Arc::clone(&sessions),
        chunks: Arc::clone(&chunks),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::learner_server::LearnerServer::new(learner))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut config = flgfn_common::config::Config::default();
    config.actor.learner = format!("http://{address}");
    config.actor.envs = 4;
    config.actor.reconnect_attempts = 3;
    config.actor.reconnect_initial_s = 0.01;
    config.actor.reconnect_max_s = 0.02;
    let options = crate::ActorOptions {
        name: "cut".to_owned(),
        seed_offset: None,
    };
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        crate::run(config, options, std::future::pending()),
    )
    .await;
    server.abort();
    let (sessions, chunks) = (
        sessions.load(Ordering::SeqCst),
        chunks.load(Ordering::SeqCst),
    );
    let error = ended
        .unwrap_or_else(|_| {
            panic!("still retrying after 60 s: {sessions} sessions, {chunks} chunks")
        })
        .expect_err("the actor gives up");
    assert!(
        matches!(error, crate::ActorError::GaveUp { attempts: 3, .. }),
        "{error}"
    );
    assert_eq!(sessions, 3, "one session per attempt");
    assert_eq!(chunks, 3, "each sent its chunk before it was cut");
}
