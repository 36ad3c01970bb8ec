//! A raw gRPC client that misbehaves: the learner refuses with a status that
//! names the field, keeps what it had accepted, and does not panic.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flgfn_common::config::{Config, TaskConfig};
use flgfn_common::policy::ModelSpec;
use flgfn_common::tasks::{self, set_generation::SetGenerationConfig};
use flgfn_common::wire::proto::{self, learner_client::LearnerClient};
use flgfn_common::wire::{ACTOR_ID_HEADER, PROTOCOL_VERSION, TRAJECTORIES_PER_CHUNK_HEADER};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

fn config() -> Config {
    let mut config = Config {
        task: TaskConfig::SetGeneration(SetGenerationConfig {
            universe: Some(4),
            set_size: Some(2),
            levels: Some(vec![0.0, 1.0]),
            ..SetGenerationConfig::default()
        }),
        ..Config::default()
    };
    config.model.hidden = vec![8];
    config.learner.checkpoint_dir = String::new();
    // One complete trajectory (2 transitions) makes a batch; two steps end
    // the run, so the test sees exactly what was trained. The credit room
    // is one batch: one credit at a time, learner-wide.
    config.learner.batch_transitions = 2;
    config.learner.max_batch_transitions = 2;
    config.learner.max_in_flight_batches = 1;
    config.learner.max_steps = 2;
    config.learner.eval_samples = 16;
    config.learner.max_message_bytes = 1 << 20;
    config.learner.max_chunk_trajectories = 8;
    config
}

fn handshake_request(config: &Config) -> proto::HandshakeRequest {
    let env = tasks::build(&config.task).unwrap();
    proto::HandshakeRequest {
        protocol_version: PROTOCOL_VERSION,
        actor_name: "raw-client".to_owned(),
        task: Some((&env.spec()).into()),
        model: Some((&ModelSpec::new(env.as_ref(), &config.model)).into()),
        trajectories_per_chunk: 1,
    }
}

fn chunk(actor_id: u64, actions: Vec<u32>) -> proto::TrajectoryChunk {
    let energies = vec![0.5; actions.len()];
    proto::TrajectoryChunk {
        actor_id,
        policy_version: 0,
        sequence: 0,
        trajectories: vec![proto::Trajectory { actions, energies }],
        credits_left: 0,
    }
}

/// One Session call driven by hand.
struct RawSession {
    upload: mpsc::Sender<proto::TrajectoryChunk>,
    grants: Streaming<proto::Grant>,
}

async fn open(
    client: &mut LearnerClient<Channel>,
    actor_id: Option<u64>,
) -> Result<RawSession, Status> {
    let (upload, chunks) = mpsc::channel(8);
    let mut request = tonic::Request::new(ReceiverStream::new(chunks));
    if let Some(actor_id) = actor_id {
        request
            .metadata_mut()
            .insert(ACTOR_ID_HEADER, actor_id.into());
    }
    request
        .metadata_mut()
        .insert(TRAJECTORIES_PER_CHUNK_HEADER, 1u64.into());
    let grants = client.session(request).await?.into_inner();
    Ok(RawSession { upload, grants })
}

impl RawSession {
    /// The next grant (a credit, or the end of training).
    async fn grant(&mut self) -> proto::Grant {
        tokio::time::timeout(Duration::from_secs(30), self.grants.message())
            .await
            .expect("a grant comes")
            .unwrap()
            .expect("the session is open")
    }

    /// Sends `chunk` and returns the status that ends the session.
    async fn refused(mut self, chunk: proto::TrajectoryChunk) -> Status {
        self.upload.send(chunk).await.unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.grants.message())
                .await
                .expect("the learner answers");
            match message {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the session ended without a refusal"),
                Err(status) => return status,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunks_are_refused_by_field_and_good_ones_are_kept() {
    let config = config();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        Default::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = LearnerClient::connect(url).await.unwrap();

    // Handshake problems are refused before anything is sent.
    let mut wrong = handshake_request(&config);
    wrong.protocol_version = 99;
    let status = client.handshake(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("protocol_version 99"),
        "{status:?}"
    );
    let mut wrong = handshake_request(&config);
    wrong.task = None;
    let status = client.handshake(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`task` is missing"), "{status:?}");

    let mut zero = handshake_request(&config);
    zero.trajectories_per_chunk = 0;
    let status = client.handshake(zero).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("trajectories_per_chunk"),
        "{status:?}"
    );

    // A session without its headers, or for an actor id never issued.
    let status = open(&mut client, None).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains(ACTOR_ID_HEADER), "{status:?}");
    let status = open(&mut client, Some(42)).await.err().unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("actor_id"), "{status:?}");

    let actor_id = client
        .handshake(handshake_request(&config))
        .await
        .unwrap()
        .into_inner()
        .actor_id;

    // The first grant of a session carries the weights, as safetensors.
    let mut session = open(&mut client, Some(actor_id)).await.unwrap();
    let first = session.grant().await;
    assert_eq!(first.credits, 1);
    let weights = first.weights.expect("the first grant carries weights");
    assert_eq!(weights.version, 0);
    let decoded = flgfn_common::weights::decode(&weights.safetensors).unwrap();
    assert!(decoded.arrays.iter().any(|a| a.name == "heads.weight"));

    // An illegal action (element 1 twice): refused whole.
    let status = session.refused(chunk(actor_id, vec![1, 1])).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trajectories[0]"), "{status:?}");
    assert!(status.message().contains("actions[1]"), "{status:?}");

    // Each refusal ends its session; the next one gets the credit back.
    let mut session = open(&mut client, Some(actor_id)).await.unwrap();
    session.grant().await;
    let mut future = chunk(actor_id, vec![0, 1]);
    future.policy_version = 7;
    let status = session.refused(future).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("policy_version"), "{status:?}");

    // A message over the size limit.
    let mut session = open(&mut client, Some(actor_id)).await.unwrap();
    session.grant().await;
    let huge = proto::TrajectoryChunk {
        actor_id,
        trajectories: vec![proto::Trajectory {
            actions: vec![0; 2 << 20],
            energies: vec![],
        }],
        ..Default::default()
    };
    let status = session.refused(huge).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");

    // A finite energy far beyond any task's: its square would overflow f32.
    let mut session = open(&mut client, Some(actor_id)).await.unwrap();
    session.grant().await;
    let mut extreme = chunk(actor_id, vec![0, 1]);
    extreme.trajectories[0].energies[1] = 1e30;
    let status = session.refused(extreme).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trajectories[0]"), "{status:?}");
    assert!(status.message().contains("energies[1]"), "{status:?}");

    // More trajectories than the one per chunk this session declared.
    let mut session = open(&mut client, Some(actor_id)).await.unwrap();
    session.grant().await;
    let mut crowded = chunk(actor_id, vec![0, 1]);
    crowded.trajectories = vec![crowded.trajectories[0].clone(); 2];
    let status = session.refused(crowded).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`trajectories` has 2 entries"),
        "{status:?}"
    );

    // The one credit of the learner is held by `holder`: a chunk on
    // another session has no credit.
    let mut holder = open(&mut client, Some(actor_id)).await.unwrap();
    holder.grant().await;
    let without = open(&mut client, Some(actor_id)).await.unwrap();
    let status = without.refused(chunk(actor_id, vec![0, 1])).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("without a credit"), "{status:?}");

    // Nothing so far trained the model; now one good chunk followed by a bad
    // one: the session is refused, but the good chunk still trains.
    holder
        .upload
        .send(chunk(actor_id, vec![0, 3]))
        .await
        .unwrap();
    let status = holder.refused(chunk(actor_id, vec![3, 9])).await;
    // Refused for its action, or for having no credit if it overtook the
    // next grant: refused either way.
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::FailedPrecondition
        ),
        "{status:?}"
    );

    // The second good chunk completes the run; the learner says so.
    let mut last = open(&mut client, Some(actor_id)).await.unwrap();
    last.grant().await;
    last.upload.send(chunk(actor_id, vec![2, 1])).await.unwrap();
    // A credit freed by that chunk may come first.
    while !last.grant().await.training_done {}

    let outcome = tokio::time::timeout(Duration::from_secs(60), learner)
        .await
        .expect("two good chunks complete the two training steps")
        .unwrap()
        .unwrap();
    drop(stop);
    assert_eq!(outcome.steps, 2);
    assert_eq!(outcome.final_report.trained_transitions, 4);
    // Illegal action, future version, oversized, extreme energy, crowded,
    // no credit, bad after good.
    assert_eq!(outcome.final_report.rejected_chunks, 7);
    // Each refusal is counted under its reason, and they add up.
    let rejections = &outcome.final_report.rejections;
    assert_eq!(rejections.values().sum::<u64>(), 7, "{rejections:?}");
    for reason in [
        "invalid_action",
        "future_version",
        "too_large",
        "energy_out_of_range",
        "no_credit",
    ] {
        assert!(
            rejections.contains_key(reason),
            "{reason} missing from {rejections:?}"
        );
    }
}

/// Sends raw bytes as the request message of a unary RPC.
#[derive(Debug, Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes::Buf;
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_bytes_are_a_client_error_never_internal() {
    use rand::{Rng, SeedableRng};

    let config = config();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let learner = tokio::spawn(flgfn_learner::serve(
        config.clone(),
        listener,
        Default::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/flgfn.v1.Learner/Handshake");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut undecodable = 0;
    for i in 0..300 {
        let len = rng.random_range(1..200);
        let mut garbage: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 3 == 0 {
            // A field tag announcing more bytes than follow.
            garbage.splice(0..0, [0x0a, 0xff, 0x01]);
        }
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(tonic::Request::new(garbage), path.clone(), RawBytes)
            .await
            .unwrap_err();
        // Bytes that happen to decode fail validation (protocol version,
        // task); none is the server's fault.
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::FailedPrecondition
            ),
            "try {i}: {status:?}"
        );
        if status.message().contains("does not decode") {
            undecodable += 1;
        }
    }
    assert!(undecodable >= 100, "{undecodable} of 300 failed to decode");
    eprintln!(
        "300 garbage handshakes: {undecodable} undecodable (INVALID_ARGUMENT), the rest refused by validation"
    );
    stop.send(()).unwrap();
    learner.await.unwrap().unwrap();
}
