//! A learner whose trainer takes nothing holds its actors back: they stop
//! sampling once the bounded queue and the small transport windows are full,
//! instead of piling chunks up in memory.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use flgfn_actor::ActorOptions;
use flgfn_common::policy::{ModelSpec, Policy};
use flgfn_common::tasks;
use flgfn_common::wire::proto::learner_server::LearnerServer;
use flgfn_learner::ingest::IngestStats;
use flgfn_learner::publisher::Publisher;
use flgfn_learner::service::LearnerService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_trainer_stops_the_actor_within_a_few_chunks() {
    let config = support::tiny_config();
    let env = tasks::build(&config.task).unwrap();
    let model = ModelSpec::new(env.as_ref(), &config.model);
    let policy = Policy::new(&model, tch::Device::Cpu);
    let (_publisher, weights) = Publisher::new(Bytes::from(policy.to_bytes().unwrap()));
    // The queue's receiver is kept but never read: a trainer stuck forever.
    let (queue, _stalled_trainer) = mpsc::channel(config.learner.ingest_queue_chunks);
    let (stop_server, stop) = watch::channel(false);
    let stats = Arc::new(IngestStats::default());
    let service = LearnerService {
        env: env.clone(),
        task: env.spec(),
        model,
        keep_truncated: true,
        max_policy_lag: config.learner.max_policy_lag,
        max_message_bytes: config.learner.max_message_bytes,
        max_chunk_trajectories: config.learner.max_chunk_trajectories,
        last_actor_id: AtomicU64::new(0),
        queue,
        weights,
        stats: stats.clone(),
        stop: stop.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut server_stop = stop.clone();
    let server = tokio::spawn(
        flgfn_learner::transport(&config.learner)
            .add_service(LearnerServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = server_stop.wait_for(|stopped| *stopped).await;
            }),
    );

    let mut actor_config = config.clone();
    actor_config.actor.learner = url;
    let (stop_actor, actor_stopped) = oneshot::channel::<()>();
    let actor = tokio::spawn(flgfn_actor::run(
        actor_config,
        ActorOptions {
            name: "held-back".to_owned(),
            seed_offset: 0,
        },
        async move {
            let _ = actor_stopped.await;
        },
    ));
    // Unthrottled, this actor produces thousands of chunks in 3 s (it sent
    // 7,445 to a trainer that kept taking them).
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_actor.send(()).unwrap();
    let report = actor.await.unwrap().unwrap();
    stop_server.send_replace(true);
    server.await.unwrap().unwrap();

    let accepted = IngestStats::get(&stats.accepted_chunks);
    eprintln!("chunks: {} sent, {accepted} accepted", report.chunks_sent);
    // The queue holds 2; one more waits in the handler; the rest sit in the
    // 4 KiB HTTP/2 window (a tiny-task chunk encodes to ~215 bytes) and the
    // actor's one-chunk buffers.
    assert!(accepted >= 2, "{accepted}");
    // 21 measured; the bound leaves room for timing, not for a leak.
    assert!(
        report.chunks_sent < 64,
        "{} chunks sent",
        report.chunks_sent
    );
}
