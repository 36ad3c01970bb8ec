//! A raw gRPC client that misbehaves: the learner refuses with a status that
//! names the field, keeps what it had accepted, and does not panic.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flgfn_common::config::{Config, TaskConfig};
use flgfn_common::policy::ModelSpec;
use flgfn_common::tasks::{self, set_generation::SetGenerationConfig};
use flgfn_common::wire::PROTOCOL_VERSION;
use flgfn_common::wire::proto::{self, learner_client::LearnerClient};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

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
    // One complete trajectory (2 transitions) makes a batch; two steps end
    // the run, so the test sees exactly what was trained.
    config.learner.batch_transitions = 2;
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
    }
}

fn chunk(actor_id: u64, actions: Vec<u32>) -> proto::TrajectoryChunk {
    let energies = vec![0.5; actions.len()];
    proto::TrajectoryChunk {
        actor_id,
        policy_version: 0,
        sequence: 0,
        trajectories: vec![proto::Trajectory { actions, energies }],
    }
}

async fn send(
    client: &mut LearnerClient<Channel>,
    chunks: Vec<proto::TrajectoryChunk>,
) -> Result<proto::StreamSummary, tonic::Status> {
    client
        .stream_trajectories(tokio_stream::iter(chunks))
        .await
        .map(tonic::Response::into_inner)
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

    // Data from an actor id the learner never issued.
    let status = send(&mut client, vec![chunk(42, vec![0, 1])])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("actor_id"), "{status:?}");

    let actor_id = client
        .handshake(handshake_request(&config))
        .await
        .unwrap()
        .into_inner()
        .actor_id;

    // An illegal action (element 1 twice), after nothing else: refused whole.
    let status = send(&mut client, vec![chunk(actor_id, vec![1, 1])])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trajectories[0]"), "{status:?}");
    assert!(status.message().contains("actions[1]"), "{status:?}");

    // A policy version the learner never published.
    let mut future = chunk(actor_id, vec![0, 1]);
    future.policy_version = 7;
    let status = send(&mut client, vec![future]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("policy_version"), "{status:?}");

    // A message over the size limit.
    let huge = proto::TrajectoryChunk {
        actor_id,
        trajectories: vec![proto::Trajectory {
            actions: vec![0; 2 << 20],
            energies: vec![],
        }],
        ..Default::default()
    };
    let status = send(&mut client, vec![huge]).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");

    // A finite energy far beyond any task's: its square would overflow f32.
    let mut extreme = chunk(actor_id, vec![0, 1]);
    extreme.trajectories[0].energies[1] = 1e30;
    let status = send(&mut client, vec![extreme]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trajectories[0]"), "{status:?}");
    assert!(status.message().contains("energies[1]"), "{status:?}");

    // More trajectories than learner.max_chunk_trajectories (8).
    let mut crowded = chunk(actor_id, vec![0, 1]);
    crowded.trajectories = vec![crowded.trajectories[0].clone(); 9];
    let status = send(&mut client, vec![crowded]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`trajectories` has 9 entries"),
        "{status:?}"
    );

    // Nothing so far trained the model; now one good chunk followed by a bad
    // one: the stream is refused, but the good chunk still trains.
    let bad = chunk(actor_id, vec![3, 9]);
    let status = send(&mut client, vec![chunk(actor_id, vec![0, 3]), bad])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("actions[1]"), "{status:?}");

    // The refusal above was counted before its status reached us, so the
    // final report (after this second good chunk) sees every refusal.
    let summary = send(&mut client, vec![chunk(actor_id, vec![2, 1])]).await;
    // Training may end, and the stream with it, as soon as this chunk is in.
    if let Err(status) = &summary {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    let outcome = tokio::time::timeout(Duration::from_secs(60), learner)
        .await
        .expect("two good chunks complete the two training steps")
        .unwrap()
        .unwrap();
    drop(stop);
    assert_eq!(outcome.steps, 2);
    assert_eq!(outcome.final_report.trained_transitions, 4);
    // Unknown actor, illegal action, future version, oversized, extreme
    // energy, crowded, bad after good.
    assert_eq!(outcome.final_report.rejected_chunks, 7);
}
