//! A raw gRPC client that misbehaves: the learner refuses with a status that
//! names the field, keeps what it had accepted, and does not panic. And
//! the other way round, a learner that floods an actor with credits: the
//! actor stops, saying so.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use flgfn_common::config::{Config, TaskConfig};
use flgfn_common::policy::ModelSpec;
use flgfn_common::tasks::lattice::LatticeConfig;
use flgfn_common::tasks::{self, set_generation::SetGenerationConfig};
use flgfn_common::trajectory::ReplayedTrajectory;
use flgfn_common::wire::proto::{self, learner_client::LearnerClient};
use flgfn_common::wire::{
    ACTOR_ID_HEADER, HANDSHAKE_HEADER, HANDSHAKE_REPLY_HEADER, MAX_HANDSHAKE_HEADER_BYTES,
    PROTOCOL_VERSION, SESSION_KEY_HEADER, TRAJECTORIES_PER_CHUNK_HEADER,
};
use flgfn_common::wire::{FINAL_REFUSAL_HEADER, largest_chunk_bytes};
use flgfn_learner::connections::{
    CALL_ANSWERED_WITHIN, EVICTION_MIN_AGE, EVICTION_WAIT, FIRST_BYTES_WITHIN, FIRST_CALL_WITHIN,
};
use prost::Message;
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

/// A learner on `127.0.0.1:0` in this process: its URL, its outcome, and
/// the sender that stops it.
async fn start_learner(
    config: &Config,
) -> (
    String,
    tokio::task::JoinHandle<Result<flgfn_learner::TrainingOutcome, flgfn_learner::LearnerError>>,
    tokio::sync::oneshot::Sender<()>,
) {
    support::stoppable_learner(config, Default::default()).await
}

/// The outcome of the learner started by [`start_learner`], which must
/// finish within `seconds` (`why` says what should have ended it).
async fn finished_within(
    learner: tokio::task::JoinHandle<
        Result<flgfn_learner::TrainingOutcome, flgfn_learner::LearnerError>,
    >,
    seconds: u64,
    why: &str,
) -> flgfn_learner::TrainingOutcome {
    tokio::time::timeout(Duration::from_secs(seconds), learner)
        .await
        .expect(why)
        .unwrap()
        .unwrap()
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

/// What a handshake issued: the actor id, and the session key that opens
/// its session.
#[derive(Clone, Debug)]
struct Issued {
    actor_id: u64,
    key: String,
}

impl From<proto::HandshakeReply> for Issued {
    fn from(reply: proto::HandshakeReply) -> Self {
        Issued {
            actor_id: reply.actor_id,
            key: reply.session_key,
        }
    }
}

/// Shakes hands as an actor of `config`; what the learner issued.
async fn shake_hands(client: &mut LearnerClient<Channel>, config: &Config) -> Issued {
    client
        .handshake(handshake_request(config))
        .await
        .unwrap()
        .into_inner()
        .into()
}

/// A handshake and its one session: the session and its actor id.
async fn joined(client: &mut LearnerClient<Channel>, config: &Config) -> (RawSession, u64) {
    let issued = shake_hands(client, config).await;
    (open(client, Some(&issued)).await.unwrap(), issued.actor_id)
}

/// A real actor named `name` on `config`, never told to stop.
fn real_actor(
    config: Config,
    name: &str,
) -> impl std::future::Future<Output = Result<flgfn_actor::ActorReport, flgfn_actor::ActorError>> {
    flgfn_actor::run(
        config,
        flgfn_actor::ActorOptions {
            name: name.to_owned(),
            seed_offset: None,
        },
        std::future::pending(),
    )
}

/// Runs a real actor on `config` until it stops by itself (within 30 s)
/// with an error, and returns that error's text.
async fn actor_error(config: Config, name: &str) -> String {
    tokio::time::timeout(Duration::from_secs(30), real_actor(config, name))
        .await
        .expect("the actor stops by itself")
        .expect_err("with an error")
        .to_string()
}

/// A new connection's handshake: the client and the actor id, or why not.
async fn try_handshake(
    url: &str,
    config: &Config,
) -> Result<(LearnerClient<Channel>, Issued), String> {
    let call = async {
        let mut client = LearnerClient::connect(url.to_owned())
            .await
            .map_err(|e| e.to_string())?;
        let reply = client
            .handshake(handshake_request(config))
            .await
            .map_err(|status| format!("{status:?}"))?;
        Ok((client, reply.into_inner().into()))
    };
    answered(call, "a connection and a Handshake call").await
}

/// How long a raw client waits for the learner to answer a call (and a
/// connection), whatever it answers: a test that hangs says where.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// `call`'s outcome, or a failure naming `what` went unanswered.
async fn answered<T>(call: impl std::future::Future<Output = T>, what: &str) -> T {
    tokio::time::timeout(ANSWER_WITHIN, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in {ANSWER_WITHIN:?}"))
}

/// How long one attempt of [`served_within`] or [`assert_not_served`]
/// waits. Against a learner at its connection limit, which closes a new
/// connection on accept, tonic's client twice waited for ever (in full
/// suite runs only, with no connection left on either side): a client
/// hang, not the learner's, so an attempt that gets no answer is one that
/// was not served.
const ATTEMPT_WITHIN: Duration = Duration::from_secs(5);

/// [`try_handshake`] once, given [`ATTEMPT_WITHIN`].
async fn attempt_handshake(
    url: &str,
    config: &Config,
) -> Result<(LearnerClient<Channel>, Issued), String> {
    tokio::time::timeout(ATTEMPT_WITHIN, try_handshake(url, config))
        .await
        .unwrap_or_else(|_| Err(format!("no answer in {ATTEMPT_WITHIN:?}")))
}

/// Fails if `which` connection is served a handshake.
async fn assert_not_served(url: &str, config: &Config, which: &str) {
    let attempt = attempt_handshake(url, config).await;
    assert!(attempt.is_err(), "{which} was served: {attempt:?}");
}

/// [`attempt_handshake`] until it succeeds, within `limit` (else fails
/// with `failure` and the last error).
async fn served_within(
    url: &str,
    config: &Config,
    limit: Duration,
    failure: &str,
) -> (LearnerClient<Channel>, Issued) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match attempt_handshake(url, config).await {
            Ok(found) => return found,
            Err(error) => {
                assert!(tokio::time::Instant::now() < deadline, "{failure}: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One Session call driven by hand.
struct RawSession {
    upload: mpsc::Sender<proto::TrajectoryChunk>,
    grants: Streaming<proto::Grant>,
}

async fn open(
    client: &mut LearnerClient<Channel>,
    issued: Option<&Issued>,
) -> Result<RawSession, Status> {
    open_declaring(client, issued, 1).await
}

/// A Session call declaring `per_chunk` trajectories per chunk.
async fn open_declaring(
    client: &mut LearnerClient<Channel>,
    issued: Option<&Issued>,
    per_chunk: u64,
) -> Result<RawSession, Status> {
    let (upload, chunks) = mpsc::channel(8);
    let mut request = tonic::Request::new(ReceiverStream::new(chunks));
    if let Some(issued) = issued {
        let metadata = request.metadata_mut();
        metadata.insert(ACTOR_ID_HEADER, issued.actor_id.into());
        // (An empty key: the header left out.)
        if !issued.key.is_empty() {
            metadata.insert(SESSION_KEY_HEADER, issued.key.parse().unwrap());
        }
    }
    request
        .metadata_mut()
        .insert(TRAJECTORIES_PER_CHUNK_HEADER, per_chunk.into());
    let grants = answered(client.session(request), "a Session call")
        .await?
        .into_inner();
    Ok(RawSession { upload, grants })
}

/// A Session call that shakes hands itself: `handshake` (encoded, or raw
/// bytes) in its headers, and `extra` headers beside it. The session, and
/// the handshake reply from its response headers.
async fn open_shaking_hands(
    client: &mut LearnerClient<Channel>,
    handshake: &[u8],
    extra: impl FnOnce(&mut tonic::metadata::MetadataMap),
) -> Result<(RawSession, Issued), Status> {
    let (upload, chunks) = mpsc::channel(8);
    let mut request = tonic::Request::new(ReceiverStream::new(chunks));
    request.metadata_mut().insert_bin(
        HANDSHAKE_HEADER,
        tonic::metadata::MetadataValue::from_bytes(handshake),
    );
    extra(request.metadata_mut());
    let response = answered(client.session(request), "a Session call shaking hands").await?;
    let reply = response
        .metadata()
        .get_bin(HANDSHAKE_REPLY_HEADER)
        .expect("the reply is in the response headers")
        .to_bytes()
        .unwrap();
    let reply = proto::HandshakeReply::decode(reply).unwrap();
    let grants = response.into_inner();
    Ok((RawSession { upload, grants }, reply.into()))
}

impl RawSession {
    /// Sends `count` valid one-trajectory chunks, each for a credit.
    async fn send_good_chunks(&mut self, actor_id: u64, count: u64) {
        for sequence in 0..count {
            self.grant().await;
            let mut good = chunk(actor_id, vec![0, 1]);
            good.sequence = sequence;
            self.upload.send(good).await.unwrap();
        }
    }

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
        self.ended().await.1
    }

    /// Reads grants until the learner ends the session with an error: the
    /// grants read on the way, and that error.
    async fn ended(&mut self) -> (Vec<proto::Grant>, Status) {
        let mut grants = Vec::new();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.grants.message())
                .await
                .expect("the learner answers");
            match message {
                Ok(Some(grant)) => grants.push(grant),
                Ok(None) => panic!("the session ended without a refusal"),
                Err(status) => return (grants, status),
            }
        }
    }
}

/// A client that makes the learner reset stream after stream (here each
/// stream opens with malformed headers, a stream error) has its
/// connection ended with GOAWAY ENHANCE_YOUR_CALM once it passes the
/// limit: without one (tonic passes "none" on to hyper unless told), a
/// client that never reads queues resets without end. Frames are written
/// by hand: a well-behaved HTTP/2 client cannot send these.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_stream_errors_ends_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const STREAMS: u32 = 4 * flgfn_learner::MAX_LOCAL_ERROR_RESETS as u32;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let config = config();
    let (url, learner, stop) = start_learner(&config).await;
    let mut socket = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream.to_be_bytes());
        bytes.extend(payload);
        bytes
    };
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(frame(0x4, 0, 0, &[]));
    for i in 0..STREAMS {
        // HEADERS (END_STREAM, END_HEADERS) of `:method: POST` alone (from
        // HPACK's static table): no scheme nor path, a malformed request.
        flood.extend(frame(0x1, 0x5, 2 * i + 1, &[0x83]));
    }
    // Written while the learner answers; what it sends is read after.
    let _ = socket.write_all(&flood).await;
    let mut received = Vec::new();
    let read_all = async {
        let mut buffer = [0u8; 65536];
        while let Ok(n) = socket.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buffer[..n]);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), read_all).await;
    let mut goaway = None;
    let mut at = 0;
    while at + 9 <= received.len() {
        let length =
            u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]) as usize;
        let kind = received[at + 3];
        let payload =
            &received[(at + 9).min(received.len())..(at + 9 + length).min(received.len())];
        if kind == GOAWAY && payload.len() >= 8 {
            goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        at += 9 + length;
    }
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "{} bytes received, no GOAWAY ENHANCE_YOUR_CALM",
        received.len()
    );
    // The learner serves others as before.
    let mut client = LearnerClient::connect(url).await.unwrap();
    shake_hands(&mut client, &config).await;
    drop(stop);
    finished_within(learner, 60, "the learner stops").await;
}

/// Actor ids are issued in order, so a client can guess the next one. It
/// still cannot open that actor's session (and send data of a task the
/// handshake never checked): the session needs the key issued with the id,
/// which only the actor that shook hands has. The actor then opens its own
/// session as if nothing happened, and a chunk tagged with another actor's
/// id is refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opens_only_with_its_own_handshakes_key() {
    let mut config = config();
    config.learner.max_steps = 1;
    let (url, learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let mut intruder = LearnerClient::connect(url).await.unwrap();
    let own = shake_hands(&mut intruder, &config).await;
    let actor = shake_hands(&mut client, &config).await;
    assert_eq!(actor.actor_id, own.actor_id + 1, "ids come in order");
    assert_eq!(actor.key.len(), 32, "{}", actor.key);
    assert_ne!(actor.key, own.key);

    for key in [own.key.clone(), "0".repeat(32)] {
        let guessed = Issued {
            actor_id: actor.actor_id,
            key,
        };
        let status = open(&mut intruder, Some(&guessed)).await.err().unwrap();
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert!(status.message().contains("session key"), "{status:?}");
    }
    let keyless = Issued {
        actor_id: actor.actor_id,
        key: String::new(),
    };
    let status = open(&mut intruder, Some(&keyless)).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains(SESSION_KEY_HEADER), "{status:?}");

    // Nothing of that used the actor's handshake up.
    let mut session = open(&mut client, Some(&actor)).await.unwrap();
    session.grant().await;
    let status = session.refused(chunk(own.actor_id, vec![0, 1])).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("`actor_id`") && status.message().contains("not this session's"),
        "{status:?}"
    );
    drop(stop);
    let outcome = finished_within(learner, 60, "the learner stops").await;
    let rejections = &outcome.final_report.rejections;
    assert_eq!(
        rejections.get("session_unknown_actor"),
        Some(&2),
        "{rejections:?}"
    );
    assert_eq!(
        rejections.get("session_missing_field"),
        Some(&1),
        "{rejections:?}"
    );
}

/// A Session that carries its handshake in its headers opens in one call,
/// is checked as a Handshake call is (and its refusals counted as one's),
/// issues no id when refused, and trains as a session after a handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_shakes_hands_itself_is_checked_as_a_handshake() {
    let config = config();
    let (url, learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url).await.unwrap();
    let before = shake_hands(&mut client, &config).await;

    let mut other_task = config.clone();
    other_task.task = TaskConfig::SetGeneration(SetGenerationConfig {
        universe: Some(6),
        set_size: Some(2),
        levels: Some(vec![0.0, 1.0]),
        ..SetGenerationConfig::default()
    });
    let old_protocol = proto::HandshakeRequest {
        protocol_version: PROTOCOL_VERSION - 1,
        ..handshake_request(&config)
    };
    let good = handshake_request(&config).encode_to_vec();
    let refusals = [
        (
            handshake_request(&other_task).encode_to_vec(),
            None,
            Code::FailedPrecondition,
            "universe=6",
        ),
        (
            old_protocol.encode_to_vec(),
            None,
            Code::FailedPrecondition,
            "protocol",
        ),
        (
            b"\xff\xff not a handshake".to_vec(),
            None,
            Code::InvalidArgument,
            HANDSHAKE_HEADER,
        ),
        // A field at fault is named, as the Handshake call names it:
        // actor_name (field 2) that is not UTF-8.
        (
            [&good[..], b"\x12\x01\xff"].concat(),
            None,
            Code::InvalidArgument,
            "HandshakeRequest.actor_name",
        ),
        (
            good.clone(),
            Some(ACTOR_ID_HEADER),
            Code::InvalidArgument,
            ACTOR_ID_HEADER,
        ),
        (
            good.clone(),
            Some(TRAJECTORIES_PER_CHUNK_HEADER),
            Code::InvalidArgument,
            TRAJECTORIES_PER_CHUNK_HEADER,
        ),
    ];
    for (handshake, beside, code, named) in refusals {
        let status = open_shaking_hands(&mut client, &handshake, |metadata| {
            if let Some(header) = beside {
                metadata.insert(header, before.actor_id.into());
            }
        })
        .await
        .err()
        .unwrap();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(named), "{named}: {status:?}");
    }

    let (mut session, issued) = open_shaking_hands(&mut client, &good, |_| {})
        .await
        .unwrap();
    assert_eq!(
        issued.actor_id,
        before.actor_id + 1,
        "a refused session issued an id"
    );
    assert_eq!(issued.key.len(), 32, "{}", issued.key);
    // Its handshake is used up by its own session.
    let status = open(&mut client, Some(&issued)).await.err().unwrap();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let first = session.grant().await;
    assert!(first.weights.is_some(), "the first grant carries weights");
    assert_eq!(first.credits, 1, "{first:?}");
    session
        .upload
        .send(chunk(issued.actor_id, vec![0, 1]))
        .await
        .unwrap();
    session.grant().await;
    let mut second = chunk(issued.actor_id, vec![1, 0]);
    second.sequence = 1;
    session.upload.send(second).await.unwrap();
    let outcome = finished_within(learner, 60, "two chunks train both steps").await;
    drop(stop);
    assert_eq!(outcome.steps, 2);
    // Each counted once, under its reason, and nothing else.
    let expected = [
        ("handshake_task_mismatch", 1),
        ("handshake_protocol_version", 1),
        ("handshake_malformed", 4),
        ("session_unknown_actor", 1),
    ]
    .map(|(reason, count)| (reason.to_owned(), count));
    assert_eq!(
        outcome.final_report.rejections,
        std::collections::BTreeMap::from(expected)
    );
    // Calls turned away, not chunks: the final line's `refused_calls`.
    assert_eq!(outcome.final_report.rejected_chunks, 0);
    assert_eq!(outcome.final_report.refused_calls(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunks_are_refused_by_field_and_good_ones_are_kept() {
    let config = config();
    let (url, learner, stop) = start_learner(&config).await;
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
    let never = Issued {
        actor_id: 42,
        key: "0".repeat(32),
    };
    let status = open(&mut client, Some(&never)).await.err().unwrap();
    // ABORTED: an actor retries, shaking hands again (this learner may
    // have restarted since its handshake).
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("actor_id"), "{status:?}");

    // A handshake of a megabyte of layer sizes is not decoded: the learner
    // decodes no more than a handshake or its largest valid chunk needs
    // (decoding multiplies a message's size), well under the configured
    // max_message_bytes, and says so to every actor.
    let mut bloated = handshake_request(&config);
    bloated.model.as_mut().unwrap().hidden = vec![1; 1 << 20];
    let status = client.handshake(bloated).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let reply = client
        .handshake(handshake_request(&config))
        .await
        .unwrap()
        .into_inner();
    // 64 KiB plus this small task's own handshake.
    let floor = flgfn_common::wire::HANDSHAKE_BYTES as u64;
    assert!(
        (floor..floor + 1024).contains(&reply.max_message_bytes),
        "{}",
        reply.max_message_bytes
    );
    let issued = Issued::from(reply);
    let actor_id = issued.actor_id;

    // The first grant of a session carries the weights, as safetensors.
    let mut session = open(&mut client, Some(&issued)).await.unwrap();
    let first = session.grant().await;
    assert!(first.credits >= 1, "{}", first.credits);
    let weights = first.weights.expect("the first grant carries weights");
    assert_eq!(weights.version, 0);
    let decoded = flgfn_common::weights::decode(&weights.safetensors).unwrap();
    assert!(decoded.arrays.iter().any(|a| a.name == "heads.weight"));

    // One session per handshake: its id opens no second one, alongside
    // or later (a client with the token cannot skip the handshake's task
    // and model checks by borrowing an id).
    let status = open(&mut client, Some(&issued)).await.err().unwrap();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("Handshake"), "{status:?}");

    // An illegal action (element 1 twice): refused whole.
    let status = session.refused(chunk(actor_id, vec![1, 1])).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trajectories[0]"), "{status:?}");
    assert!(status.message().contains("actions[1]"), "{status:?}");

    // Each refusal ends its session; the next one gets the credit back.
    let (mut session, actor_id) = joined(&mut client, &config).await;
    session.grant().await;
    let mut future = chunk(actor_id, vec![0, 1]);
    future.policy_version = 7;
    let status = session.refused(future).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("policy_version"), "{status:?}");

    // A chunk that names another actor than the session's.
    let (mut session, actor_id) = joined(&mut client, &config).await;
    session.grant().await;
    let status = session.refused(chunk(actor_id + 1, vec![0, 1])).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains(&format!(
            "`actor_id` {} is not this session's actor",
            actor_id + 1
        )),
        "{status:?}"
    );

    // A message over the size limit: here a quarter of the configured
    // max_message_bytes, far more than any valid chunk of this task.
    let (mut session, actor_id) = joined(&mut client, &config).await;
    session.grant().await;
    let huge = proto::TrajectoryChunk {
        actor_id,
        trajectories: vec![proto::Trajectory {
            actions: vec![0; 256 << 10],
            energies: vec![],
        }],
        ..Default::default()
    };
    let status = session.refused(huge).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");

    // A finite energy far beyond any task's: its square would overflow f32.
    let (mut session, actor_id) = joined(&mut client, &config).await;
    session.grant().await;
    let mut extreme = chunk(actor_id, vec![0, 1]);
    extreme.trajectories[0].energies[1] = 1e30;
    let status = session.refused(extreme).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trajectories[0]"), "{status:?}");
    assert!(status.message().contains("energies[1]"), "{status:?}");

    // More trajectories than the one per chunk this session declared.
    let (mut session, actor_id) = joined(&mut client, &config).await;
    session.grant().await;
    let mut crowded = chunk(actor_id, vec![0, 1]);
    crowded.trajectories = vec![crowded.trajectories[0].clone(); 2];
    let status = session.refused(crowded).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`trajectories` has 2 entries")
            && status.message().contains("`trajectories_per_chunk`"),
        "{status:?}"
    );

    // 20,000 empty trajectories: 40 KB, within the decode limit, but
    // ~2 MB once decoded. Refused from their tags before decoding, naming
    // the learner's limit (here 8; the largest of the learners that this
    // test binary runs at once, 1,024 at most).
    let (mut session, actor_id) = joined(&mut client, &config).await;
    session.grant().await;
    let mut hollow = chunk(actor_id, vec![0, 1]);
    hollow.trajectories = vec![proto::Trajectory::default(); 20_000];
    let status = session.refused(hollow).await;
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status
            .message()
            .contains("`trajectories` has 20000 entries")
            && status.message().contains("learner.max_chunk_trajectories"),
        "{status:?}"
    );

    // The one credit of the learner is held by `holder`: a chunk on
    // another session has no credit.
    let (mut holder, actor_id) = joined(&mut client, &config).await;
    holder.grant().await;
    let (without, without_id) = joined(&mut client, &config).await;
    let status = without.refused(chunk(without_id, vec![0, 1])).await;
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
    let (mut last, actor_id) = joined(&mut client, &config).await;
    last.grant().await;
    last.upload.send(chunk(actor_id, vec![2, 1])).await.unwrap();
    // A credit freed by that chunk may come first.
    while !last.grant().await.training_done {}

    let outcome = finished_within(
        learner,
        60,
        "two good chunks complete the two training steps",
    )
    .await;
    drop(stop);
    assert_eq!(outcome.steps, 2);
    assert_eq!(outcome.final_report.trained_transitions, 4);
    // Illegal action, future version, another actor's id, oversized,
    // extreme energy, crowded, hollow, no credit, bad after good.
    assert_eq!(outcome.final_report.rejected_chunks, 9);
    // Each refusal is counted under its reason, and they add up: the
    // handshakes and session openings refused at the start, then the 9.
    let rejections = &outcome.final_report.rejections;
    for reason in [
        "handshake_protocol_version",
        "handshake_missing_field",
        "handshake_malformed",
        // (The megabyte of layer sizes, refused before its handler.)
        "handshake_too_large",
        "session_missing_field",
    ] {
        assert_eq!(rejections.get(reason), Some(&1), "{reason}: {rejections:?}");
    }
    // An id never issued, and one whose session had opened.
    assert_eq!(
        rejections.get("session_unknown_actor"),
        Some(&2),
        "{rejections:?}"
    );
    assert_eq!(rejections.values().sum::<u64>(), 7 + 9, "{rejections:?}");
    assert_eq!(outcome.final_report.refused_calls(), 7);
    assert_eq!(
        rejections.get("too_large"),
        Some(&2),
        "oversized and hollow: {rejections:?}"
    );
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
    let (url, learner, stop) = start_learner(&config).await;
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
    // Each counted once: the undecodable ones (which the handler never
    // saw) by the codec's reason, the others by the handler's.
    let outcome = learner.await.unwrap().unwrap();
    let rejections = &outcome.final_report.rejections;
    assert_eq!(
        rejections.get("handshake_undecodable"),
        Some(&undecodable),
        "{rejections:?}"
    );
    let handshakes: u64 = rejections
        .iter()
        .filter(|(reason, _)| reason.starts_with("handshake_"))
        .map(|(_, count)| count)
        .sum();
    assert_eq!(handshakes, 300, "{rejections:?}");
}

/// A chunk whose gRPC framing is broken is the actor's fault, not the
/// learner's: INVALID_ARGUMENT naming the framing (tonic says INTERNAL,
/// which actors retry for ever), counted as undecodable; a Handshake's
/// too is INVALID_ARGUMENT, counted as `handshake_undecodable` (tonic
/// answers it before the learner's handler sees the call); the learner
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_with_broken_framing_is_refused_as_the_senders_fault() {
    let config = config();
    let (url, learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    for (case, body) in [
        ("compressed, none agreed", framed(1, 2, &[0x08, 0x01])),
        ("an unknown flag", framed(7, 2, &[0x08, 0x01])),
        ("the stream ends inside a message", framed(0, 100, &[0; 10])),
    ] {
        let issued = shake_hands(&mut client, &config).await;
        let (code, message) = session_of_raw_bytes(&url, &issued, body).await;
        assert_eq!(code, Code::InvalidArgument, "{case}: {message}");
        assert!(
            message.contains("gRPC framing is invalid"),
            "{case}: {message}"
        );
    }
    // A Handshake's, answered by tonic before the learner sees the call,
    // likewise (an empty one, too: a unary call needs its message).
    for (case, body) in [
        ("compressed, none agreed", framed(1, 2, &[0x08, 0x01])),
        ("the stream ends inside a message", framed(0, 100, &[0; 10])),
        ("no message", Vec::new()),
    ] {
        let (code, message) = call_of_raw_bytes(&url, "Handshake", &[], body).await;
        assert_eq!(code, Code::InvalidArgument, "handshake, {case}: {message}");
        assert!(
            message.contains("request's gRPC framing is invalid"),
            "handshake, {case}: {message}"
        );
    }
    // Served as before.
    shake_hands(&mut client, &config).await;
    drop(stop);
    let outcome = finished_within(learner, 60, "the learner stops").await;
    let rejections = &outcome.final_report.rejections;
    assert_eq!(rejections.get("undecodable"), Some(&3), "{rejections:?}");
    assert_eq!(
        rejections.get("handshake_undecodable"),
        Some(&3),
        "{rejections:?}"
    );
    assert_eq!(outcome.final_report.rejected_chunks, 3);
}

/// Opens `issued`'s session over a bare HTTP/2 connection, sends `body`
/// as the whole request stream, and returns the call's status: its code
/// and message.
async fn session_of_raw_bytes(url: &str, issued: &Issued, body: Vec<u8>) -> (Code, String) {
    let headers = [
        (ACTOR_ID_HEADER, issued.actor_id.to_string()),
        (SESSION_KEY_HEADER, issued.key.clone()),
        (TRAJECTORIES_PER_CHUNK_HEADER, "1".to_owned()),
    ];
    call_of_raw_bytes(url, "Session", &headers, body).await
}

/// A bare HTTP/2 connection to the learner at `url`: its request sender,
/// and the task driving it, which ends when the connection does.
async fn raw_connection(
    url: &str,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let socket = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(socket).await.unwrap();
    (sender, tokio::spawn(connection))
}

/// A gRPC request to `path` (`package.Service/Method`) on `url`, with
/// `headers`.
fn raw_request(
    url: &str,
    path: &str,
    headers: &[(&str, String)],
) -> tonic::codegen::http::Request<()> {
    let mut request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("{url}/{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    request.body(()).unwrap()
}

/// A gRPC message as framed on the wire: its flag (1: compressed), its
/// length as declared (big-endian), then `body`, whatever its length.
fn framed(flag: u8, length: u32, body: &[u8]) -> Vec<u8> {
    [&[flag][..], &length.to_be_bytes(), body].concat()
}

/// Calls the Learner's `method` over a bare HTTP/2 connection with
/// `headers`, sends `body` as the whole request stream, and returns the
/// call's status: its code and message.
async fn call_of_raw_bytes(
    url: &str,
    method: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (Code, String) {
    let (sender, _connection) = raw_connection(url).await;
    let request = raw_request(url, &format!("flgfn.v1.Learner/{method}"), headers);
    let mut sender = sender.ready().await.unwrap();
    let (response, mut upload) = sender.send_request(request, false).unwrap();
    upload.send_data(body.into(), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("the learner answers")
        .unwrap();
    // The status: in the headers of a trailers-only answer, else in the
    // trailers after the grants.
    let (head, mut grants) = response.into_parts();
    let trailers = if head.headers.contains_key("grpc-status") {
        head.headers
    } else {
        while let Some(data) = grants.data().await {
            let data = data.unwrap();
            let _ = grants.flow_control().release_capacity(data.len());
        }
        grants.trailers().await.unwrap().expect("trailers")
    };
    let status = Status::from_header_map(&trailers).expect("a grpc-status");
    (status.code(), status.message().to_owned())
}

/// A structurally valid chunk made wrong in one of several ways, and the
/// name of the way.
fn corrupted(
    actor_id: u64,
    rng: &mut rand::rngs::SmallRng,
) -> (&'static str, proto::TrajectoryChunk) {
    use rand::Rng;
    let mut bad = chunk(actor_id, vec![0, 1]);
    let kind = rng.random_range(0..10);
    let trajectory = &mut bad.trajectories[0];
    let name = match kind {
        0 => {
            trajectory.actions[rng.random_range(0..2)] = rng.random_range(4..u32::MAX);
            "action out of range"
        }
        1 => {
            trajectory.actions = vec![3, 3];
            "element taken twice"
        }
        2 => {
            trajectory.energies[rng.random_range(0..2)] =
                [f32::NAN, f32::INFINITY, -f32::INFINITY, 2e6, -1e30][rng.random_range(0..5)];
            "energy out of range"
        }
        3 => {
            trajectory.energies.truncate(rng.random_range(0..2));
            "energies shorter than actions"
        }
        4 => {
            trajectory.actions = vec![0, 1, 2];
            trajectory.energies = vec![0.0; 3];
            "longer than the task allows"
        }
        5 => {
            trajectory.actions.clear();
            trajectory.energies.clear();
            "empty trajectory"
        }
        6 => {
            bad.trajectories.clear();
            "no trajectory"
        }
        7 => {
            bad.trajectories.push(bad.trajectories[0].clone());
            "more trajectories than declared"
        }
        8 => {
            bad.actor_id = actor_id.wrapping_add(rng.random_range(1..u64::MAX));
            "another actor's id"
        }
        _ => {
            bad.policy_version = rng.random_range(1_000_000..u64::MAX);
            "version from the future"
        }
    };
    (name, bad)
}

/// What one fuzzing worker sent and saw refused.
#[derive(Debug, Default)]
struct Tally {
    refused_handshakes: u64,
    refused_chunks: u64,
    sent_valid: u64,
    kinds: std::collections::BTreeMap<&'static str, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.refused_handshakes += other.refused_handshakes;
        self.refused_chunks += other.refused_chunks;
        self.sent_valid += other.sent_valid;
        for (kind, n) in other.kinds {
            *self.kinds.entry(kind).or_default() += n;
        }
    }
}

fn client_error(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::ResourceExhausted
    )
}

/// Plays `cases` (true: a valid chunk; false: a corrupted message of a
/// random kind) against the learner at `url`, as one actor id, one case at
/// a time, checking each answer.
async fn fuzz_worker(url: String, config: Config, cases: Vec<bool>, seed: u64) -> Tally {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    let handshake_path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/flgfn.v1.Learner/Handshake");
    let session_path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/flgfn.v1.Learner/Session");
    let mut tally = Tally::default();
    for (i, is_valid) in cases.into_iter().enumerate() {
        if is_valid {
            // A session of its own: a credit, the chunk, and goodbye.
            let (mut session, actor_id) = joined(&mut client, &config).await;
            let grant = session.grant().await;
            let version = grant.weights.map_or(0, |w| w.version);
            let mut good = chunk(
                actor_id,
                vec![rng.random_range(0..2), rng.random_range(2..4)],
            );
            good.policy_version = version;
            session.upload.send(good).await.unwrap();
            let RawSession { upload, mut grants } = session;
            drop(upload);
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(30), grants.message())
                .await
                .expect("the session ends")
            {}
            tally.sent_valid += 1;
            continue;
        }
        let kind = match rng.random_range(0..10) {
            // Raw bytes as a handshake.
            0 => {
                let garbage: Vec<u8> = (0..rng.random_range(1..300))
                    .map(|_| rng.random())
                    .collect();
                raw.ready().await.unwrap();
                let status = raw
                    .unary(
                        tonic::Request::new(garbage),
                        handshake_path.clone(),
                        RawBytes,
                    )
                    .await
                    .unwrap_err();
                assert!(client_error(status.code()), "case {i}: {status:?}");
                tally.refused_handshakes += 1;
                "raw handshake"
            }
            // Raw bytes as a session's chunk.
            1 | 2 => {
                let garbage: Vec<u8> = (0..rng.random_range(1..300))
                    .map(|_| rng.random())
                    .collect();
                let issued = shake_hands(&mut client, &config).await;
                let actor_id = issued.actor_id;
                let mut request = tonic::Request::new(tokio_stream::StreamExt::chain(
                    tokio_stream::iter([garbage]),
                    tokio_stream::pending(),
                ));
                let metadata = request.metadata_mut();
                metadata.insert(ACTOR_ID_HEADER, actor_id.into());
                metadata.insert(SESSION_KEY_HEADER, issued.key.parse().unwrap());
                metadata.insert(TRAJECTORIES_PER_CHUNK_HEADER, 1u64.into());
                raw.ready().await.unwrap();
                let status = match raw.streaming(request, session_path.clone(), RawBytes).await {
                    Err(status) => status,
                    Ok(response) => {
                        let mut grants = response.into_inner();
                        loop {
                            match tokio::time::timeout(Duration::from_secs(30), grants.message())
                                .await
                                .expect("the learner answers")
                            {
                                Ok(Some(_)) => continue,
                                Ok(None) => panic!("case {i}: the session ended without a refusal"),
                                Err(status) => break status,
                            }
                        }
                    }
                };
                assert!(client_error(status.code()), "case {i}: {status:?}");
                tally.refused_chunks += 1;
                "raw chunk"
            }
            // A well-formed chunk that is wrong.
            _ => {
                let issued = shake_hands(&mut client, &config).await;
                let actor_id = issued.actor_id;
                let (kind, bad) = corrupted(actor_id, &mut rng);
                let mut session = open(&mut client, Some(&issued)).await.unwrap();
                // With its credit, so that the chunk itself is judged.
                assert!(session.grant().await.credits > 0);
                let status = session.refused(bad).await;
                assert!(client_error(status.code()), "case {i} ({kind}): {status:?}");
                tally.refused_chunks += 1;
                kind
            }
        };
        *tally.kinds.entry(kind).or_default() += 1;
    }
    tally
}

/// Corrupted messages by the thousand, mixed with valid chunks, from 16
/// concurrent clients: every corrupted one is refused with a client error,
/// every valid one trains, and the counters add up. `FLGFN_FUZZ_CASES`
/// sets how many corrupted messages (10,000 by default), `FLGFN_FUZZ_SEED`
/// which ones (11 by default, so that CI runs the same cases each time;
/// `deploy/test.sh --long` draws a new seed per run and prints it, so a
/// failure can be replayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_corrupted_messages_are_refused_and_valid_ones_kept() {
    use rand::{Rng, SeedableRng};

    const WORKERS: usize = 16;
    let from_env = |name: &str, default: u64| -> u64 {
        std::env::var(name).map_or(default, |value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number"))
        })
    };
    let corrupted_total = from_env("FLGFN_FUZZ_CASES", 10_000) as usize;
    let seed = from_env("FLGFN_FUZZ_SEED", 11);
    eprintln!("fuzzing with FLGFN_FUZZ_SEED={seed} FLGFN_FUZZ_CASES={corrupted_total}");
    let valid_total = (corrupted_total / 10).max(1);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    // Each client draws its own cases from the run's seed.
    let client_seed = |client: u64| seed.wrapping_mul(1_000).wrapping_add(client);
    // Valid chunks spread among the corrupted ones; one more valid chunk
    // comes last, after every refusal, and its step ends the run.
    let mut cases: Vec<bool> = (0..corrupted_total + valid_total - 1)
        .map(|i| i < valid_total - 1)
        .collect();
    for i in (1..cases.len()).rev() {
        cases.swap(i, rng.random_range(0..=i));
    }

    let mut config = config();
    config.learner.max_steps = valid_total as u64;
    config.learner.max_in_flight_batches = 16;
    config.learner.first_report_s = 1e6;
    config.learner.report_every_s = 1e6;
    // Runs until its last step (the stop sender is kept unused).
    let (url, learner, _stop) = start_learner(&config).await;
    let started = std::time::Instant::now();
    let share = cases.len().div_ceil(WORKERS);
    let workers: Vec<_> = cases
        .chunks(share)
        .enumerate()
        .map(|(w, slice)| {
            tokio::spawn(fuzz_worker(
                url.clone(),
                config.clone(),
                slice.to_vec(),
                client_seed(100 + w as u64),
            ))
        })
        .collect();
    let mut tally = Tally::default();
    for worker in workers {
        tally.merge(worker.await.unwrap());
    }
    tally.merge(fuzz_worker(url, config.clone(), vec![true], client_seed(99)).await);
    let outcome = finished_within(learner, 120, "the learner finishes").await;
    let report = &outcome.final_report;
    let Tally {
        refused_handshakes,
        refused_chunks,
        sent_valid,
        kinds,
    } = tally;
    eprintln!(
        "{} corrupted ({refused_handshakes} raw handshakes, {refused_chunks} chunks) and {sent_valid} valid in {:.1} s: {kinds:?}; the learner counted {:?}",
        refused_handshakes + refused_chunks,
        started.elapsed().as_secs_f64(),
        report.rejections
    );
    assert_eq!(refused_handshakes + refused_chunks, corrupted_total as u64);
    assert_eq!(sent_valid, valid_total as u64);
    // Every valid chunk trained (2 transitions each), nothing else did.
    assert_eq!(outcome.steps, sent_valid);
    assert_eq!(report.trained_transitions, 2 * sent_valid);
    assert_eq!(report.ingested_transitions, 2 * sent_valid);
    // Every refused chunk was counted, once, under the reason it was sent
    // with.
    assert_eq!(report.rejected_chunks, refused_chunks);
    // Raw handshakes are refused by the transport (undecodable, not
    // counted) or, when the bytes decode, by the learner (counted under
    // `handshake_<reason>`).
    let (handshakes, chunks): (Vec<_>, Vec<_>) = report
        .rejections
        .iter()
        .partition(|(reason, _)| reason.starts_with("handshake_"));
    assert_eq!(chunks.iter().map(|(_, n)| **n).sum::<u64>(), refused_chunks);
    assert!(handshakes.iter().map(|(_, n)| **n).sum::<u64>() <= refused_handshakes);
    let count = |reason: &str| report.rejections.get(reason).copied().unwrap_or(0);
    let sent = |kind: &str| kinds.get(kind).copied().unwrap_or(0);
    // Raw bytes either fail to decode or (rarely) decode into a chunk,
    // refused as arriving before its credit or, when the session's first
    // credit came first, as not this session's (`actor_id`: malformed).
    let raw_decoded = sent("raw chunk") - count("undecodable");
    assert!(count("undecodable") > raw_decoded);
    assert!(count("no_credit") <= raw_decoded);
    assert_eq!(
        count("invalid_action"),
        sent("action out of range") + sent("element taken twice")
    );
    assert_eq!(count("energy_out_of_range"), sent("energy out of range"));
    assert_eq!(count("future_version"), sent("version from the future"));
    assert_eq!(
        count("malformed") + count("no_credit"),
        sent("no trajectory")
            + sent("more trajectories than declared")
            + sent("another actor's id")
            + raw_decoded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_limit_are_refused_as_resource_exhausted() {
    let mut config = config();
    config.learner.max_sessions = 2;
    let (url, learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let (mut first, _) = joined(&mut client, &config).await;
    let (_second, _) = joined(&mut client, &config).await;
    first.grant().await;
    // Refused for its place, not its id: the id stays good for a retry.
    let issued = shake_hands(&mut client, &config).await;
    let status = open(&mut client, Some(&issued)).await.err().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("learner.max_sessions"),
        "{status:?}"
    );
    // A session that shakes hands itself is refused before it is issued
    // an id: a full learner keeps no handshake of it.
    let handshake = handshake_request(&config).encode_to_vec();
    let status = open_shaking_hands(&mut client, &handshake, |_| {})
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let after = shake_hands(&mut client, &config).await;
    assert_eq!(
        after.actor_id,
        issued.actor_id + 1,
        "the refusal issued an id"
    );

    // A real actor refused its session (in one call, its handshake in
    // it) counts each refusal as a failed attempt, backing off and giving
    // up where configured.
    let mut surplus = config.clone();
    surplus.actor.learner = url.clone();
    surplus.actor.envs = 1;
    surplus.actor.reconnect_attempts = 3;
    surplus.actor.reconnect_initial_s = 0.01;
    surplus.actor.reconnect_max_s = 0.02;
    let error = actor_error(surplus, "surplus").await;
    assert!(
        error.contains("gave up after 3 attempts") && error.contains("learner.max_sessions"),
        "{error}"
    );

    // A session that ends frees its place.
    let RawSession { upload, mut grants } = first;
    drop(upload);
    while let Ok(Some(_)) = grants.message().await {}
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let third = loop {
        match open(&mut client, Some(&issued)).await {
            Ok(session) => break session,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the place was never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    drop(third);
    stop.send(()).unwrap();
    learner.await.unwrap().unwrap();
}

/// A handshake larger than the learner's own task and model descriptions
/// plus 64 KiB (a task other than the learner's) is refused before it is
/// decoded, as the mismatch it is, even where the call's
/// decode limit (set by the largest chunk) would take it: 50,000 empty
/// task parameters are 100 KB on the wire and ~1.5 MB decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_larger_than_the_learner_takes_is_refused_before_decoding() {
    // The default task and limits: the largest chunk (~200 KB) sets the
    // call's limit.
    let mut config = Config::default();
    config.model.hidden = vec![8];
    config.learner.checkpoint_dir = String::new();
    let (url, learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url).await.unwrap();
    let mut padded = handshake_request(&config);
    padded.task.as_mut().unwrap().params = vec![String::new(); 50_000];
    let status = client.handshake(padded).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("the handshake takes 1")
            && status.message().contains("not the learner's"),
        "{status:?}"
    );
    // The connection still serves a handshake of the right size.
    client.handshake(handshake_request(&config)).await.unwrap();
    stop.send(()).unwrap();
    // Counted as the handler's own refusals are, though it never saw it.
    let outcome = learner.await.unwrap().unwrap();
    let rejections = &outcome.final_report.rejections;
    assert_eq!(
        rejections.get("handshake_too_large"),
        Some(&1),
        "{rejections:?}"
    );
}

/// A TB learner drops truncated trajectories, and says so at the
/// handshake (an actor that cuts some short then warns; one that cuts
/// some is served: `tb_drops_and_counts_truncated_prefixes` trains
/// through one); another objective does not. (None cuts every one short:
/// the configuration refuses it, in every process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_says_at_the_handshake_whether_it_drops_truncated() {
    let mut learner_config = config();
    learner_config.objective.name = flgfn_common::config::ObjectiveName::Tb;
    let (url, learner, stop) = start_learner(&learner_config).await;
    let mut client = LearnerClient::connect(url).await.unwrap();
    let reply = client
        .handshake(handshake_request(&learner_config))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.drops_truncated);
    stop.send(()).unwrap();
    learner.await.unwrap().unwrap();
    let (url, learner, stop) = start_learner(&config()).await;
    let mut client = LearnerClient::connect(url).await.unwrap();
    let reply = client
        .handshake(handshake_request(&config()))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.drops_truncated);
    stop.send(()).unwrap();
    let _ = learner.await.unwrap();
}

/// Trajectories that all stop short of a terminal state train the flows
/// towards no target. The configuration refuses `truncate_fraction = 1`,
/// but an actor of another implementation can send them: the learner
/// trains on them and warns at its report. (Here a raw client sends
/// one-step prefixes of two-step sets; the learner is a process, its log
/// a file.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_fed_prefixes_alone_warns_that_they_follow_no_target() {
    let dir = std::env::temp_dir().join(format!("flgfn-prefixes-alone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = config();
    let config_path = dir.join("run.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let metrics = dir.join("metrics.jsonl");
    let address = format!("127.0.0.1:{}", support::free_port().await);
    let mut learner = support::learner_process(&address, &config_path, &metrics, &[]);
    let url = format!("http://{address}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut client = loop {
        match LearnerClient::connect(url.clone()).await {
            Ok(client) => break client,
            Err(error) => assert!(std::time::Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (mut session, actor_id) = joined(&mut client, &config).await;
    let mut sequence = 0;
    loop {
        let grant = session.grant().await;
        if grant.training_done {
            break;
        }
        for _ in 0..grant.credits {
            let mut prefix = chunk(actor_id, vec![0]);
            prefix.sequence = sequence;
            sequence += 1;
            session.upload.send(prefix).await.unwrap();
        }
    }
    let status = tokio::task::spawn_blocking(move || learner.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let reports = support::reports(&metrics);
    assert_eq!(reports.last().map(|r| r.truncated_fraction), Some(1.0));
    let log = std::fs::read_to_string(support::learner_log(&metrics)).unwrap();
    assert!(
        log.contains("every trajectory trained since the last report was truncated"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An actor pointed at a gRPC server that is not a flgfn learner (here one
/// serving only the health service) stops with an error saying so, instead
/// of retrying for ever (the default `reconnect_attempts` is 0: no limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_pointed_at_another_grpc_server_stops_saying_so() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_health, health_service) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut config = config();
    config.actor.learner = url;
    assert_eq!(config.actor.reconnect_attempts, 0);
    let error = actor_error(config, "misdirected").await;
    assert!(
        error.contains("is actor.learner the address of a flgfn learner"),
        "{error}"
    );
    server.abort();
}

/// An actor pointed at a server that does not speak HTTP/2 (a web server
/// answering in HTTP/1) retries, as the trouble may pass, but says what
/// to check; with `reconnect_attempts` it gives up with that message.
/// (Which failure the client reports first is a race: the connection's
/// protocol error, or the request cancelled by the connection closing.
/// The hint comes with the first; tries are repeated until one has it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_pointed_at_a_web_server_says_what_to_check() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HINT: &str = "(is actor.learner the address of a flgfn learner, with http:// or https://";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let _ = socket
                    .write_all(b"HTTP/1.0 400 Bad request version\r\nContent-Length: 0\r\n\r\n")
                    .await;
                // Open until the client leaves, so that it reads the reply
                // rather than a closed socket.
                while socket.read(&mut request).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    let mut config = config();
    config.actor.learner = url;
    config.actor.reconnect_attempts = 1;
    let mut errors = Vec::new();
    while errors.len() < 20 {
        let error = actor_error(config.clone(), "misdirected").await;
        assert!(error.contains("gave up after 1"), "{error}");
        let hinted = error.contains(HINT);
        errors.push(error);
        if hinted {
            break;
        }
    }
    assert!(errors.last().unwrap().contains(HINT), "{errors:#?}");
    server.abort();
}

/// A network whose weights no message could carry is a configuration
/// error naming the field, at start (not a failure at every actor's first
/// grant, nor an allocation abort).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_too_large_for_a_message_is_refused_at_start() {
    let mut config = config();
    config.learner.max_message_bytes = 1 << 20;
    config.model.hidden = vec![1024, 1024];
    let (_url, learner, _stop) = start_learner(&config).await;
    let error = learner.await.unwrap().err().unwrap().to_string();
    assert!(
        error.contains("model.hidden") && error.contains("learner.max_message_bytes"),
        "{error}"
    );
    // Far too large to allocate: the same error, not an abort.
    config.model.hidden = vec![1 << 40];
    let (_url, learner, _stop) = start_learner(&config).await;
    let error = learner.await.unwrap().err().unwrap().to_string();
    assert!(error.contains("model.hidden"), "{error}");
}

/// An evaluation whose samples would not fit in memory is refused at
/// start, naming the field, not found out of memory at the first report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluations_too_large_to_hold_are_refused_at_start() {
    use flgfn_learner::evaluator::{EVAL_HELD_BYTES, held_bytes};
    let mut config = config();
    // Sets of 2,048 of 4,096 elements: ~20 KB a sample.
    config.task = TaskConfig::SetGeneration(SetGenerationConfig {
        universe: Some(4096),
        set_size: Some(2048),
        levels: Some(vec![0.0, 1.0]),
        ..SetGenerationConfig::default()
    });
    let env = tasks::build(&config.task).unwrap();
    let fitting = usize::try_from(EVAL_HELD_BYTES / held_bytes(env.as_ref(), 1)).unwrap();
    assert!(held_bytes(env.as_ref(), fitting) <= EVAL_HELD_BYTES);
    config.learner.eval_samples = fitting + 1;
    let (_url, learner, _stop) = start_learner(&config).await;
    let error = learner.await.unwrap().err().unwrap().to_string();
    assert!(error.contains("learner.eval_samples"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_larger_than_a_session_may_hold_are_refused_as_resource_exhausted() {
    let mut config = config();
    let env = tasks::build(&config.task).unwrap();
    let one = ReplayedTrajectory::max_held_bytes(env.as_ref(), env.max_trajectory_len()) as u64;

    // A limit below one trajectory is a configuration error, named.
    config.learner.max_session_bytes = one - 1;
    let (_url, learner, _stop) = start_learner(&config).await;
    let error = learner.await.unwrap().err().unwrap().to_string();
    assert!(error.contains("learner.max_session_bytes"), "{error}");

    // Room for three trajectories per session (and for 8 chunks of 2
    // transitions learner-wide, so that the credit room is not what
    // refuses them).
    config.learner.max_session_bytes = 3 * one;
    config.learner.max_in_flight_batches = 8;
    let (url, learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let mut four = handshake_request(&config);
    four.trajectories_per_chunk = 4;
    let status = client.handshake(four).await.err().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("learner.max_session_bytes")
            && status.message().contains("trajectories_per_chunk"),
        "{status:?}"
    );
    let mut three = handshake_request(&config);
    three.trajectories_per_chunk = 3;
    let issued = Issued::from(client.handshake(three).await.unwrap().into_inner());
    let status = open_declaring(&mut client, Some(&issued), 4)
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("learner.max_session_bytes")
            && status.message().contains(TRAJECTORIES_PER_CHUNK_HEADER),
        "{status:?}"
    );
    // A limit, but no retry can change it: marked final.
    assert!(status.metadata().contains_key(FINAL_REFUSAL_HEADER));
    // A chunk that fits is granted credits.
    let mut session = open_declaring(&mut client, Some(&issued), 3).await.unwrap();
    assert!(session.grant().await.credits >= 1);
    drop(session);
    // A real actor whose chunks cannot fit stops, naming the limit,
    // instead of retrying for ever.
    let mut too_wide = config.clone();
    too_wide.actor.learner = url.clone();
    too_wide.actor.envs = 4;
    let error = actor_error(too_wide, "too-wide").await;
    assert!(error.contains("learner.max_session_bytes"), "{error}");
    stop.send(()).unwrap();
    learner.await.unwrap().unwrap();
}

/// A chunk is decoded whole, so one that might exceed the decode limit is
/// refused at the handshake, naming the limit, not after its rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_may_exceed_the_decode_limit_are_refused_at_the_handshake() {
    let mut config = config();
    // 256 sites: a trajectory of up to 256 transitions, so that a chunk
    // of 512 of them may exceed the smallest limit, 1 MiB; the credit
    // room and the session's memory have room for it.
    config.task = TaskConfig::Lattice(LatticeConfig {
        side: 16,
        ..LatticeConfig::default()
    });
    config.learner.max_chunk_trajectories = 1024;
    config.learner.batch_transitions = 1024;
    config.learner.max_batch_transitions = 1 << 14;
    config.learner.max_in_flight_batches = 16;
    config.learner.max_session_bytes = 1 << 40;
    let env = tasks::build(&config.task).unwrap();
    let fits = config.learner.max_message_bytes / largest_chunk_bytes(1, env.max_trajectory_len());
    assert!((256..512).contains(&fits), "{fits}");
    let (url, learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let mut too_many = handshake_request(&config);
    too_many.trajectories_per_chunk = 512;
    let status = client.handshake(too_many).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("learner.max_message_bytes")
            && status.message().contains("trajectories_per_chunk"),
        "{status:?}"
    );
    let mut most = handshake_request(&config);
    most.trajectories_per_chunk = fits as u32;
    let issued = Issued::from(client.handshake(most).await.unwrap().into_inner());
    // The session's header is checked the same way.
    let status = open_declaring(&mut client, Some(&issued), 512)
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("learner.max_message_bytes"),
        "{status:?}"
    );
    stop.send(()).unwrap();
    learner.await.unwrap().unwrap();
}

/// At the limit with every connection in use (each has called the
/// learner), a new one is closed on accept and counted; once one closes,
/// its place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_and_counted() {
    let mut config = config();
    config.learner.max_connections = 2;
    let (url, learner, stop) = start_learner(&config).await;
    let (mut client, issued) = try_handshake(&url, &config).await.unwrap();
    let (other, _) = try_handshake(&url, &config).await.unwrap();
    assert_not_served(&url, &config, "a third connection").await;
    // One closes: its place is free again.
    drop(other);
    served_within(
        &url,
        &config,
        Duration::from_secs(10),
        "the place was never freed",
    )
    .await;
    let mut session = open(&mut client, Some(&issued)).await.unwrap();
    session.send_good_chunks(issued.actor_id, 2).await;
    // Two steps of one chunk each end the run.
    let outcome = finished_within(learner, 60, "the learner finishes").await;
    drop(stop);
    assert_eq!(outcome.steps, 2);
    let rejections = &outcome.final_report.rejections;
    assert!(
        rejections
            .get("too_many_connections")
            .is_some_and(|&n| n >= 1),
        "{rejections:?}"
    );
    assert_eq!(rejections.get("closed_for_room"), None, "{rejections:?}");
    assert_eq!(outcome.final_report.rejected_chunks, 0);
}

/// At the limit, the oldest connection on which no Learner call ever
/// started (one silent, one that sent a byte: clients without a token can
/// open such connections faster than the timeouts close them) is closed
/// for a new one, at once; connections that called the learner keep their
/// places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_called_make_room_for_new_ones() {
    let mut config = config();
    config.learner.max_connections = 2;
    let (url, learner, stop) = start_learner(&config).await;
    let address = url.trim_start_matches("http://").to_owned();
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut one_byte = tokio::net::TcpStream::connect(&address).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut one_byte, b"P")
        .await
        .unwrap();
    // Old enough to be closed for room (younger ones may be about to call).
    tokio::time::sleep(EVICTION_MIN_AGE + Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    let (mut client, issued) = served_within(
        &url,
        &config,
        EVICTION_WAIT + Duration::from_secs(5),
        "no room was made",
    )
    .await;
    closed_within(&mut silent, Duration::from_secs(5), "the oldest, silent").await;
    let (_second, _) = served_within(
        &url,
        &config,
        EVICTION_WAIT + Duration::from_secs(5),
        "no room was made again",
    )
    .await;
    closed_within(&mut one_byte, Duration::from_secs(5), "the one-byte").await;
    // Far sooner than the timeouts would have closed them.
    assert!(
        started.elapsed() < FIRST_BYTES_WITHIN,
        "{:?}",
        started.elapsed()
    );
    // Both places are now held by connections that called: none is closed.
    assert_not_served(&url, &config, "a third connection").await;
    let mut session = open(&mut client, Some(&issued)).await.unwrap();
    session.send_good_chunks(issued.actor_id, 2).await;
    let outcome = finished_within(learner, 60, "the learner finishes").await;
    drop(stop);
    assert_eq!(outcome.steps, 2);
    let rejections = &outcome.final_report.rejections;
    // (More if an attempt, unanswered on this loaded machine, was retried:
    // its connection never called either.)
    assert!(
        rejections.get("closed_for_room").is_some_and(|&n| n >= 2),
        "{rejections:?}"
    );
    assert!(
        rejections
            .get("too_many_connections")
            .is_some_and(|&n| n >= 1),
        "{rejections:?}"
    );
}

/// A connection that never sends a whole HTTP/2 preface (here one byte)
/// is closed after FIRST_BYTES_WITHIN, its place free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_preface_is_closed() {
    let config = config();
    let (url, learner, stop) = start_learner(&config).await;
    let mut one_byte = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut one_byte, b"P")
        .await
        .unwrap();
    let connected = tokio::time::Instant::now();
    closed_within(
        &mut one_byte,
        FIRST_BYTES_WITHIN + Duration::from_secs(10),
        "a connection without a preface",
    )
    .await;
    assert!(connected.elapsed() >= FIRST_BYTES_WITHIN - Duration::from_millis(100));
    stop.send(()).unwrap();
    learner.await.unwrap().unwrap();
}

/// Waits for the learner to close `socket` (an EOF or a reset: either
/// way the read ends), having sent little (its HTTP/2 settings, read
/// and ignored here); fails naming `which` if it stays open `within`.
async fn closed_within(socket: &mut tokio::net::TcpStream, within: Duration, which: &str) {
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        within,
        tokio::io::AsyncReadExt::read_to_end(socket, &mut sink),
    )
    .await
    .unwrap_or_else(|_| panic!("{which} connection was not closed within {within:?}"));
    assert!(
        sink.len() < 1024,
        "{} bytes to the {which} connection",
        sink.len()
    );
}

/// A connection that calls nothing for `learner.idle_connection_s` is
/// closed, freeing its place; one whose session is open stays, however long
/// it sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_open_sessions_are_not() {
    let mut config = config();
    config.learner.max_connections = 2;
    config.learner.idle_connection_s = 1.0;
    config.learner.max_steps = 2;
    let (url, learner, stop) = start_learner(&config).await;
    // One connection with a session, one idle after its handshake: both
    // places taken.
    let (mut working, issued) = try_handshake(&url, &config).await.unwrap();
    let actor_id = issued.actor_id;
    let mut session = open(&mut working, Some(&issued)).await.unwrap();
    let (_idle, _) = try_handshake(&url, &config).await.unwrap();
    let idle_since = tokio::time::Instant::now();
    assert_not_served(&url, &config, "a third connection").await;
    // The idle one is closed after a second: a third connection is served.
    let _third = served_within(
        &url,
        &config,
        Duration::from_secs(15),
        "the idle connection kept its place",
    )
    .await;
    assert!(idle_since.elapsed() >= Duration::from_secs(1));
    // The session's connection, quiet for twice as long, is still open:
    // its chunks train the run to its end.
    tokio::time::sleep(Duration::from_secs(1)).await;
    session.send_good_chunks(actor_id, 2).await;
    let outcome = finished_within(learner, 60, "the learner finishes").await;
    drop(stop);
    assert_eq!(outcome.steps, 2);
    assert_eq!(outcome.final_report.lost_chunks, 0);
    // The third connection was turned away for the limit, not otherwise.
    let closed = outcome.final_report.rejections.get("too_many_connections");
    assert!(
        closed.is_some_and(|&n| n >= 1),
        "{:?}",
        outcome.final_report.rejections
    );
}

/// A connection on which no Learner call ever started (a preface, then
/// health checks only: no token needed) is closed after
/// FIRST_CALL_WITHIN, not `learner.idle_connection_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_calls_the_learner_is_closed_early() {
    let mut config = config();
    config.learner.idle_connection_s = 300.0;
    let (url, learner, stop) = start_learner(&config).await;
    let (sender, connection) = raw_connection(&url).await;
    let request = raw_request(&url, "grpc.health.v1.Health/Check", &[]);
    let mut sender = sender.ready().await.unwrap();
    let (response, mut upload) = sender.send_request(request, false).unwrap();
    // An empty HealthCheckRequest (the server as a whole), gRPC-framed.
    upload.send_data(vec![0; 5].into(), true).unwrap();
    let response = answered(response, "a health check").await.unwrap();
    assert_eq!(response.status(), 200);
    let checked = tokio::time::Instant::now();
    let _ = tokio::time::timeout(FIRST_CALL_WITHIN + Duration::from_secs(10), connection)
        .await
        .expect("the learner closes a connection that never called it");
    assert!(checked.elapsed() >= FIRST_CALL_WITHIN - Duration::from_millis(100));
    stop.send(()).unwrap();
    learner.await.unwrap().unwrap();
}

/// A Handshake whose request never arrives whole (a declared length half
/// sent, or a whole message with the stream left open) is read by tonic
/// before the learner sees it, holding the declared length's buffer and
/// keeping its connection busy: it is ended with DEADLINE_EXCEEDED after
/// CALL_ANSWERED_WITHIN, counted, and the connection, idle then, is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_whose_request_never_arrives_whole_is_ended() {
    let mut config = config();
    config.learner.idle_connection_s = 3.0;
    let (url, learner, stop) = start_learner(&config).await;
    let (sender, connection) = raw_connection(&url).await;
    let whole = handshake_request(&config).encode_to_vec();
    let whole_unended = framed(0, u32::try_from(whole.len()).unwrap(), &whole);
    let half_sent = framed(0, 60_000, &[0; 10]);
    let sent = tokio::time::Instant::now();
    let mut answers = Vec::new();
    // (The streams are kept: a dropped one would be reset, ending the call.)
    let mut uploads = Vec::new();
    for body in [half_sent, whole_unended] {
        let request = raw_request(&url, "flgfn.v1.Learner/Handshake", &[]);
        let mut sender = sender.clone().ready().await.unwrap();
        let (response, mut upload) = sender.send_request(request, false).unwrap();
        upload.send_data(body.into(), false).unwrap();
        uploads.push(upload);
        answers.push(response);
    }
    for answer in answers {
        let response = tokio::time::timeout(CALL_ANSWERED_WITHIN + Duration::from_secs(10), answer)
            .await
            .expect("the learner ends the call")
            .unwrap();
        let status = Status::from_header_map(response.headers()).expect("a trailers-only answer");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("did not arrive whole"),
            "{status:?}"
        );
    }
    assert!(sent.elapsed() >= CALL_ANSWERED_WITHIN - Duration::from_millis(100));
    // Nothing in progress on it now: closed as idle.
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection is closed once idle")
        .unwrap()
        .unwrap();
    drop(uploads);
    stop.send(()).unwrap();
    let outcome = finished_within(learner, 60, "the learner stops").await;
    assert_eq!(
        outcome
            .final_report
            .rejections
            .get("call_not_answered_in_time"),
        Some(&2),
        "{:?}",
        outcome.final_report.rejections
    );
}

/// Chunks lost with a connection show as a gap in the actor's numbering at
/// its next session, counted up to the credits the old session never got
/// answered; a refused chunk is not also counted lost, and numbers
/// skipped within a session are not loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_chunks_are_counted_from_a_reconnect_and_cannot_be_inflated() {
    let mut config = config();
    // Room for 4 one-trajectory credits at once; each chunk is a step.
    config.learner.max_in_flight_batches = 4;
    config.learner.max_steps = 3;
    let (url, learner, stop) = start_learner(&config).await;
    // Chunk 0 is trained, chunk 1 refused; the third credit (at least)
    // goes unanswered, as if its chunk was lost with the connection.
    let status = refused_after_a_good_chunk(&url, &config, 3, vec![1, 1]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The same actor (same name) again: chunk 2 never came.
    let (mut client, issued) = try_handshake(&url, &config).await.unwrap();
    let actor_id = issued.actor_id;
    let mut session = open(&mut client, Some(&issued)).await.unwrap();
    // Both credits may come in one grant: they are all the two steps left
    // need, so no other follows.
    let mut credits = 0;
    for sequence in [3, 1_003] {
        while credits == 0 {
            credits = session.grant().await.credits;
        }
        credits -= 1;
        let mut good = chunk(actor_id, vec![0, 1]);
        good.sequence = sequence;
        session.upload.send(good).await.unwrap();
    }
    let outcome = finished_within(learner, 60, "the learner finishes").await;
    drop(stop);
    assert_eq!(outcome.steps, 3);
    assert_eq!(outcome.final_report.accepted_chunks, 3);
    assert_eq!(outcome.final_report.lost_chunks, 1);
}

/// A new actor's session that waits for at least `credits` credits, sends
/// a good chunk 0, then chunk 1 of `actions`, which the learner refuses:
/// that refusal.
async fn refused_after_a_good_chunk(
    url: &str,
    config: &Config,
    credits: u32,
    actions: Vec<u32>,
) -> Status {
    let (mut client, issued) = try_handshake(url, config).await.unwrap();
    let mut session = open(&mut client, Some(&issued)).await.unwrap();
    let mut granted = 0;
    while granted < credits {
        granted += session.grant().await.credits;
    }
    let good = chunk(issued.actor_id, vec![0, 1]);
    session.upload.send(good).await.unwrap();
    let mut second = chunk(issued.actor_id, actions);
    second.sequence = 1;
    session.refused(second).await
}

/// A chunk the learner cannot read (here, over its message size limit,
/// refused before decoding) is counted refused, and not also lost when
/// its actor reconnects and numbers on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_chunk_is_counted_refused_not_also_lost() {
    let mut config = config();
    config.learner.max_in_flight_batches = 4;
    let (url, learner, stop) = start_learner(&config).await;
    // (Over `learner.max_message_bytes`, 1 MiB here: refused from the
    // length its frame declares, however the bytes arrive.)
    let status = refused_after_a_good_chunk(&url, &config, 2, vec![0; 1_200_000]).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // The same actor again, numbering on from the refused chunk.
    let (mut client, issued) = try_handshake(&url, &config).await.unwrap();
    let mut session = open(&mut client, Some(&issued)).await.unwrap();
    while session.grant().await.credits == 0 {}
    let mut next = chunk(issued.actor_id, vec![0, 1]);
    next.sequence = 2;
    session.upload.send(next).await.unwrap();
    let outcome = finished_within(learner, 60, "the learner finishes").await;
    drop(stop);
    assert_eq!(outcome.steps, 2);
    let report = &outcome.final_report;
    assert_eq!(report.rejections.get("too_large"), Some(&1), "{report:?}");
    assert_eq!(report.lost_chunks, 0);
}

/// After training ends, a session reads the chunks its actor sent before
/// it heard, and counts them late: at most one per credit it held, however
/// many more come, so that an actor cannot inflate the count. (Ended by a
/// stop, while the actor holds the credits it took.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_chunks_are_counted_up_to_the_credits_held() {
    let mut config = config();
    // Room for 4 one-trajectory credits, and no end but the stop.
    config.learner.max_in_flight_batches = 4;
    config.learner.max_steps = 0;
    let (url, learner, stop) = start_learner(&config).await;
    let (mut client, issued) = try_handshake(&url, &config).await.unwrap();
    let actor_id = issued.actor_id;
    let mut session = open(&mut client, Some(&issued)).await.unwrap();
    let mut held = 0;
    while held < 2 {
        held += u64::from(session.grant().await.credits);
    }
    stop.send(()).unwrap();
    loop {
        let grant = session.grant().await;
        if grant.training_done {
            break;
        }
        held += u64::from(grant.credits);
    }
    // Twenty chunks after the end: a few could have been on their way.
    for sequence in 1..=20 {
        let mut late = chunk(actor_id, vec![0, 1]);
        late.sequence = sequence;
        if session.upload.send(late).await.is_err() {
            break;
        }
    }
    // Its side closed (not the whole call, which would drop what is not
    // yet sent), the session ends.
    drop(session.upload);
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(30), session.grants.message())
        .await
        .expect("the session ends")
    {}
    let outcome = finished_within(learner, 60, "the learner stops").await;
    let late: u64 = outcome.sessions.iter().map(|s| s.late_chunks).sum();
    assert!(held < 20, "{held} credits held: too many to tell");
    assert_eq!(late, held, "late chunks counted, against the credits held");
}

/// A session that takes credits and never answers (a frozen actor, a cut
/// link: the learner ends it only after 30 s) does not starve the other
/// actors meanwhile, even when it took the whole initial room: the room
/// grows for the actors it leaves without a credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_holding_the_room_does_not_stop_training() {
    let mut config = config();
    // The room starts at INITIAL_ROOM_BATCHES batches (one-trajectory
    // chunks) and may grow to twice that.
    config.learner.max_in_flight_batches = 2 * flgfn_learner::credits::INITIAL_ROOM_BATCHES;
    config.learner.max_policy_lag = config.learner.max_in_flight_batches + 2;
    // More steps than the initial room holds batches: near the end,
    // credits only cover the batches left.
    config.learner.max_steps = 40;
    // Never ended here: only the room's growth can let the other actor in.
    config.learner.stall_timeout_s = 3600.0;
    let (url, learner, _stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let issued = shake_hands(&mut client, &config).await;
    let mut silent = open(&mut client, Some(&issued)).await.unwrap();
    // Alone, it is granted the whole initial room (`grant` fails the test
    // if none comes within its timeout).
    let mut held = 0;
    while held < flgfn_learner::credits::INITIAL_ROOM_BATCHES {
        held += u64::from(silent.grant().await.credits);
    }

    let mut real = config.clone();
    real.actor.learner = url;
    real.actor.envs = 1;
    let actor = tokio::spawn(real_actor(real, "live"));
    let outcome = finished_within(
        learner,
        120,
        "training goes on while the silent session holds its credits",
    )
    .await;
    assert_eq!(outcome.steps, 40);
    let report = tokio::time::timeout(Duration::from_secs(30), actor)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        report.training_done && report.chunks_sent >= 40,
        "{report:?}"
    );
    drop(silent);
}

/// A session that holds a credit past `learner.stall_timeout_s` is ended
/// with DEADLINE_EXCEEDED naming the setting, and the credit it held goes
/// back to the room: an actor that comes afterwards trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holding_a_credit_past_the_stall_timeout_is_ended_and_its_credit_returns() {
    let mut config = config();
    // The room is one credit learner-wide (see `config`): while the silent
    // session holds it, nothing else can be trained.
    config.learner.stall_timeout_s = 1.0;
    let (url, learner, _stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url.clone()).await.unwrap();
    let issued = shake_hands(&mut client, &config).await;
    let mut silent = open(&mut client, Some(&issued)).await.unwrap();
    assert_eq!(silent.grant().await.credits, 1);
    let granted = std::time::Instant::now();
    let (grants, ended) = silent.ended().await;
    let held = granted.elapsed();
    assert!(grants.iter().all(|grant| grant.credits == 0), "{grants:?}");
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(
        ended.message().contains("learner.stall_timeout_s"),
        "{ended:?}"
    );
    assert!(
        held >= Duration::from_millis(900) && held < Duration::from_secs(10),
        "ended after {held:?}"
    );

    let mut real = config.clone();
    real.actor.learner = url;
    real.actor.envs = 1;
    let report = tokio::time::timeout(Duration::from_secs(30), real_actor(real, "after"))
        .await
        .expect("the returned credit lets a new actor train")
        .unwrap();
    assert!(report.training_done, "{report:?}");
    let outcome = finished_within(learner, 10, "the learner finishes").await;
    assert_eq!(outcome.steps, 2);
    assert_eq!(outcome.final_report.stalled_sessions, 1);
}

/// A slow actor holding several credits fills them one at a time: its
/// oldest credit waits longer than `learner.stall_timeout_s`, but it is
/// not stalled while its chunks keep coming. Once they stop, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_actor_is_not_stalled_while_its_chunks_keep_coming() {
    let mut config = config();
    // Four times the pace of its chunks: a late wake-up of this test on a
    // loaded machine must not look like a stall.
    config.learner.stall_timeout_s = 2.0;
    config.learner.max_in_flight_batches = 2 * flgfn_learner::credits::INITIAL_ROOM_BATCHES;
    config.learner.max_policy_lag = config.learner.max_in_flight_batches + 2;
    // Its 6 chunks are 6 steps; a 7th, from another session once it is
    // ended, ends the run with a report that counts the stall.
    config.learner.max_steps = 7;
    let (url, learner, _stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url).await.unwrap();
    let issued = shake_hands(&mut client, &config).await;
    let actor_id = issued.actor_id;
    let mut slow = open(&mut client, Some(&issued)).await.unwrap();
    let mut held = 0;
    while held < 3 {
        held += u64::from(slow.grant().await.credits);
    }
    // 6 chunks, 0.5 s apart: the first credit's successors wait up to 3 s,
    // beyond the stall timeout.
    let mut last_sent = std::time::Instant::now();
    for sequence in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut next = chunk(actor_id, vec![0, 1]);
        next.sequence = sequence;
        slow.upload.send(next).await.unwrap();
        last_sent = std::time::Instant::now();
    }
    let (_, ended) = slow.ended().await;
    let silent_for = last_sent.elapsed();
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(
        silent_for >= Duration::from_millis(1800),
        "ended {silent_for:?} after its last chunk, while its chunks kept coming"
    );
    let issued = shake_hands(&mut client, &config).await;
    let actor_id = issued.actor_id;
    let mut last = open(&mut client, Some(&issued)).await.unwrap();
    assert!(last.grant().await.credits >= 1);
    last.upload.send(chunk(actor_id, vec![0, 1])).await.unwrap();
    let outcome = finished_within(learner, 20, "the learner finishes").await;
    let report = &outcome.final_report;
    assert_eq!(report.stalled_sessions, 1, "{report:?}");
    assert_eq!(report.accepted_chunks, 7, "{report:?}");
}

/// A session whose actor sends chunks but stops reading grants (its HTTP/2
/// window here is zero, so no grant gets through) is ended once a grant
/// has waited `learner.stall_timeout_s`, and counted; the credits it held
/// go back to the room, so an actor that comes afterwards trains to the
/// end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_takes_no_grant_is_ended_and_its_credits_return() {
    let mut config = config();
    config.learner.stall_timeout_s = 1.0;
    config.learner.max_steps = 12;
    let (url, learner, _stop) = start_learner(&config).await;
    let (session, actor_id) = deaf_session(&url, &config).await;
    // The room is one credit learner-wide (see `config`): a chunk uses it,
    // is trained, and the next credit is granted into a full buffer. The
    // actor cannot know its credits; paced, each chunk finds one.
    for _ in 0..(GRANT_BUFFER_AND_SLACK) {
        if session
            .upload
            .send(chunk(actor_id, vec![0, 1]))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    let mut real = config.clone();
    real.actor.learner = url;
    real.actor.envs = 1;
    let report = tokio::time::timeout(Duration::from_secs(30), real_actor(real, "after"))
        .await
        .expect("the returned credits let a new actor train")
        .unwrap();
    assert!(report.training_done, "{report:?}");
    let outcome = finished_within(learner, 20, "the learner finishes").await;
    assert_eq!(outcome.steps, 12);
    let final_report = &outcome.final_report;
    assert_eq!(final_report.stalled_sessions, 1, "{final_report:?}");
    // What arrived while the grant waited is read before the session ends
    // (not dropped unread): here, paced blindly, the next chunk, whose
    // credit was in that grant, refused for it (the first refusal ends
    // the reading).
    assert_eq!(final_report.rejected_chunks, 1, "{final_report:?}");
    assert_eq!(
        final_report.rejections.get("no_credit"),
        Some(&1),
        "{final_report:?}"
    );
    assert!(report.chunks_sent >= 1, "{report:?}");
    // What the real actor did not send, the deaf session did: at least
    // one per grant its buffer holds (4). Hyper takes a fifth into its
    // hands only when its connection task runs before the stall timer
    // fires, which a loaded machine does not always do.
    let deaf_chunks = final_report
        .accepted_chunks
        .saturating_sub(report.chunks_sent);
    assert!(
        deaf_chunks >= 4,
        "the deaf session's chunks were trained until its grants backed up: {deaf_chunks} of {final_report:?}"
    );
    drop(session);
}

/// A session of a freshly shaken hand whose grants ride a connection that
/// never opens its receive window: no grant gets through. With its actor
/// id.
async fn deaf_session(url: &str, config: &Config) -> (RawSession, u64) {
    let mut client = LearnerClient::connect(url.to_owned()).await.unwrap();
    let issued = shake_hands(&mut client, config).await;
    let closed_window = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .initial_stream_window_size(Some(0))
        .connect()
        .await
        .unwrap();
    let mut deaf = LearnerClient::new(closed_window);
    let session = open(&mut deaf, Some(&issued)).await.unwrap();
    (session, issued.actor_id)
}

/// A learner told to stop refuses new connections at once, for as long as
/// its graceful shutdown lasts (here held by a session that cannot take
/// its last grant): a health probe or a reconnecting actor is refused,
/// not left in a backlog nobody serves until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_learner_refuses_new_connections() {
    let mut config = config();
    config.learner.max_steps = 0;
    let (url, learner, stop) = start_learner(&config).await;
    let (session, _) = deaf_session(&url, &config).await;
    stop.send(()).unwrap();
    // The stop reaches the listener within moments (retried: a loaded
    // machine may take a while to run the tasks that pass it on; a
    // connection that met the listener closing is reset, not refused).
    let address = url.trim_start_matches("http://");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::net::TcpStream::connect(address).await {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "not refused 3 s after the stop: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!learner.is_finished(), "still shutting down");
    drop(session);
    finished_within(learner, 30, "the learner stops").await;
}

/// Chunks the deaf session sends: more than the grants that fit its
/// buffers (4 queued, at most one in hyper's hands) before one must wait.
const GRANT_BUFFER_AND_SLACK: usize = 8;

/// One connection holds at most `MAX_STREAMS_PER_CONNECTION` calls at a
/// time (each may hold a message of up to the decode limit): one more
/// waits until one of them ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_a_bounded_number_of_calls() {
    let mut config = config();
    config.learner.max_steps = 1000;
    let (url, _learner, stop) = start_learner(&config).await;
    let mut client = LearnerClient::connect(url).await.unwrap();
    let limit = flgfn_learner::MAX_STREAMS_PER_CONNECTION as usize;
    // The last session's handshake, a call too, while there is room.
    let issued = shake_hands(&mut client, &config).await;
    let mut open_sessions = Vec::new();
    for _ in 0..limit {
        // Clones share the connection.
        let mut same_connection = client.clone();
        open_sessions.push(joined(&mut same_connection, &config).await.0);
    }
    let mut same_connection = client.clone();
    let waiting = tokio::spawn(async move { open(&mut same_connection, Some(&issued)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a call beyond the limit was answered"
    );
    drop(open_sessions.pop());
    let answered = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting call is answered once another ends")
        .unwrap();
    assert!(answered.is_ok());
    let _ = stop.send(());
}

/// A learner that answers every handshake as the actor's own and sends
/// `grants`, in order, on every session (reading and ignoring the chunks).
struct ScriptedLearner {
    reply: proto::HandshakeReply,
    grants: Vec<proto::Grant>,
    /// How it answers a Session that carries its handshake.
    one_call: OneCall,
    /// Handshake calls and Session calls received.
    calls: std::sync::Arc<[std::sync::atomic::AtomicU32; 2]>,
}

#[tonic::async_trait]
impl proto::learner_server::Learner for ScriptedLearner {
    async fn handshake(
        &self,
        _request: tonic::Request<proto::HandshakeRequest>,
    ) -> Result<tonic::Response<proto::HandshakeReply>, Status> {
        self.calls[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(self.reply.clone()))
    }

    type SessionStream = ReceiverStream<Result<proto::Grant, Status>>;

    async fn session(
        &self,
        request: tonic::Request<Streaming<proto::TrajectoryChunk>>,
    ) -> Result<tonic::Response<Self::SessionStream>, Status> {
        self.calls[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shakes_hands = request.metadata().get_bin(HANDSHAKE_HEADER).is_some();
        if shakes_hands && self.one_call == OneCall::Refused {
            return Err(Status::invalid_argument(format!(
                "`{ACTOR_ID_HEADER}` is missing"
            )));
        }
        let mut chunks = request.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = chunks.message().await {} });
        let (grants, stream) = mpsc::channel(self.grants.len().max(1));
        for grant in &self.grants {
            grants.send(Ok(grant.clone())).await.unwrap();
        }
        // Kept open: the actor, not the stream's end, must stop it.
        std::mem::forget(grants);
        let mut response = tonic::Response::new(ReceiverStream::new(stream));
        if shakes_hands && self.one_call == OneCall::Answered {
            response.metadata_mut().insert_bin(
                HANDSHAKE_REPLY_HEADER,
                tonic::metadata::MetadataValue::from_bytes(&self.reply.encode_to_vec()),
            );
        }
        Ok(response)
    }
}

/// Serves a [`ScriptedLearner`] sending `grants` (see
/// [`grant_of`]) to an actor of `config`'s task, and points `config` at
/// it, with no reconnects.
async fn serve_scripted(config: &mut Config, grants: Vec<proto::Grant>) {
    serve_scripted_as(config, grants, OneCall::Answered).await;
}

/// How a [`ScriptedLearner`] answers a Session that carries its handshake.
#[derive(Clone, Copy, Debug, PartialEq)]
enum OneCall {
    /// With the reply in its response headers.
    Answered,
    /// Refused for want of an actor id, as a learner from before a Session
    /// could carry its handshake.
    Refused,
    /// Opened, but without the reply (not a flgfn learner).
    WithoutReply,
}

/// [`serve_scripted`], answering one-call sessions as `one_call` says.
/// Returns its counts of Handshake and Session calls.
async fn serve_scripted_as(
    config: &mut Config,
    grants: Vec<proto::Grant>,
    one_call: OneCall,
) -> std::sync::Arc<[std::sync::atomic::AtomicU32; 2]> {
    let env = tasks::build(&config.task).unwrap();
    let model = ModelSpec::new(env.as_ref(), &config.model);
    let learner = ScriptedLearner {
        reply: proto::HandshakeReply {
            actor_id: 1,
            task: Some((&env.spec()).into()),
            model: Some((&model).into()),
            version: 0,
            max_message_bytes: 1 << 20,
            max_grant_bytes: 1 << 20,
            session_key: "0123456789abcdef".repeat(2),
            drops_truncated: false,
        },
        grants,
        one_call,
        calls: Default::default(),
    };
    let calls = learner.calls.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.actor.learner = format!("http://{}", listener.local_addr().unwrap());
    config.actor.reconnect_attempts = 0;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::learner_server::LearnerServer::new(learner))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    calls
}

/// A grant of `credits` with version 1 of a fresh network for `config`,
/// its tensors passed through `edit` first.
fn grant_of(
    config: &Config,
    credits: u32,
    edit: impl FnOnce(&mut [flgfn_common::weights::NamedArray]),
) -> proto::Grant {
    let env = tasks::build(&config.task).unwrap();
    let model = ModelSpec::new(env.as_ref(), &config.model);
    let policy = flgfn_common::policy::Policy::new(&model, tch::Device::Cpu);
    let mut arrays = policy.weights();
    edit(&mut arrays);
    let weights = flgfn_common::weights::encode(
        &arrays,
        flgfn_common::weights::WeightEncoding::F32,
        &Default::default(),
    )
    .unwrap();
    proto::Grant {
        credits,
        weights: Some(proto::Weights {
            version: 1,
            safetensors: weights.into(),
        }),
        ..Default::default()
    }
}

/// A learner that grants far more credits than any actor could queue
/// breaks the protocol: the actor stops at once with an error saying so,
/// instead of reconnecting for ever (reconnect_attempts = 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_flooded_with_credits_stops_with_a_protocol_error() {
    let mut config = config();
    let flood = grant_of(&config, 1_000_000, |_| {});
    serve_scripted(&mut config, vec![flood]).await;
    let error = actor_error(config, "flooded").await;
    assert!(error.contains("protocol error"), "{error}");
    assert!(error.contains("credits"), "{error}");
}

/// A grant with no credits needs no weights: one that comes before the
/// first weights (all a newer learner's grant may carry is a field added
/// since) is passed over: the actor goes on to take the next grant's
/// credit and weights, and stops at the end without an error. The actor
/// opens its session in one call, or in two (Handshake, then Session) with
/// a learner that takes handshakes only as calls of their own, or with a
/// handshake too long for a header (a task of 500 levels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_of_no_credits_before_any_weights_is_passed_over() {
    let mut long_task = config();
    long_task.task = TaskConfig::SetGeneration(SetGenerationConfig {
        universe: Some(500),
        set_size: Some(2),
        levels: Some((0..500).map(|i| 0.123_456_789 + f64::from(i)).collect()),
        ..SetGenerationConfig::default()
    });
    assert!(handshake_request(&long_task).encoded_len() > MAX_HANDSHAKE_HEADER_BYTES);
    for (config, one_call, expected_calls) in [
        (config(), OneCall::Answered, [0, 1]),
        (config(), OneCall::Refused, [1, 2]),
        (long_task, OneCall::Answered, [1, 1]),
    ] {
        let mut config = config;
        let grants = vec![
            proto::Grant::default(),
            grant_of(&config, 1, |_| {}),
            proto::Grant {
                training_done: true,
                ..Default::default()
            },
        ];
        let calls = serve_scripted_as(&mut config, grants, one_call).await;
        let report =
            tokio::time::timeout(Duration::from_secs(30), real_actor(config, "empty grant"))
                .await
                .expect("the actor stops by itself")
                .expect("without an error");
        assert!(report.training_done);
        assert_eq!((report.versions_received, report.credits), (1, 1));
        let calls = calls
            .iter()
            .map(|count| count.load(std::sync::atomic::Ordering::Relaxed))
            .collect::<Vec<_>>();
        assert_eq!(calls, expected_calls, "{one_call:?}");
    }
}

/// A server that opens a session carrying its handshake but sends no
/// reply is not a flgfn learner: the actor stops, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_stops_at_a_session_opened_without_its_handshake_reply() {
    let mut config = config();
    let grants = vec![grant_of(&config, 1, |_| {})];
    serve_scripted_as(&mut config, grants, OneCall::WithoutReply).await;
    let error = actor_error(config, "no reply").await;
    assert!(
        error.contains(HANDSHAKE_REPLY_HEADER) && error.contains("a flgfn learner?"),
        "{error}"
    );
}

/// Weights whose metadata names another task (a balancer that sent the
/// handshake to one learner and the session to another) are refused,
/// naming both, though their shapes fit this actor's network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_refuses_weights_of_another_task() {
    let mut config = config();
    let mut grant = grant_of(&config, 1, |_| {});
    let weights = grant.weights.as_mut().unwrap();
    let decoded = flgfn_common::weights::decode(&weights.safetensors).unwrap();
    let metadata = std::collections::BTreeMap::from([
        ("task".to_owned(), "another task".to_owned()),
        ("version".to_owned(), weights.version.to_string()),
    ]);
    weights.safetensors = flgfn_common::weights::encode(
        &decoded.arrays,
        flgfn_common::weights::WeightEncoding::F32,
        &metadata,
    )
    .unwrap()
    .into();
    serve_scripted(&mut config, vec![grant]).await;
    let error = actor_error(config, "foreign weights").await;
    assert!(
        error.contains("task another task") && error.contains("set_generation"),
        "{error}"
    );
}

/// Weights holding a NaN (a corrupted or foreign learner: flgfn's skips
/// non-finite steps) would make every sampled probability NaN and the
/// trajectories silently degenerate: the actor refuses them, naming the
/// tensor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_refuses_weights_holding_a_nan() {
    let mut config = config();
    let mut poisoned = String::new();
    let grant = grant_of(&config, 1, |arrays| {
        let last = arrays.last_mut().unwrap();
        last.values[0] = f32::NAN;
        poisoned = last.name.clone();
    });
    serve_scripted(&mut config, vec![grant]).await;
    let error = actor_error(config, "nan weights").await;
    assert!(
        error.contains("non-finite") && error.contains(&format!("`{poisoned}`")),
        "{error}"
    );
}
