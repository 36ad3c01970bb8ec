//! The learner's errors, and the one place they become gRPC statuses.

use flgfn_common::config::ConfigError;
use flgfn_common::env::TaskSpec;
use flgfn_common::policy::ModelSpec;
use flgfn_common::trajectory::ReplayError;
use flgfn_common::wire::FINAL_REFUSAL_HEADER;
use tonic::Status;

/// Why a request from an actor is refused. Every variant names the field or
/// the mismatch, so the actor's operator can act on the message alone.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The actor speaks another version of `proto/flgfn.proto`.
    #[error("protocol_version {actor} is not supported: this learner speaks {learner}")]
    ProtocolVersion {
        /// Sent by the actor.
        actor: u32,
        /// The learner's.
        learner: u32,
    },
    /// The actor was configured with another task or task parameters.
    #[error(
        "task mismatch: actor has {actor}, learner trains {learner} (give the actor the learner's job file, or its [task] keys)"
    )]
    TaskMismatch {
        /// The actor's task, described (clipped: the actor chose its size).
        actor: String,
        /// The learner's task, described.
        learner: String,
    },
    /// The actor's network could not load the learner's weights.
    #[error(
        "model mismatch: actor has {actor}, learner trains {learner} (give the actor the learner's job file, or its model.hidden)"
    )]
    ModelMismatch {
        /// The actor's network, described (clipped).
        actor: String,
        /// The learner's network, described.
        learner: String,
    },
    /// A message is structurally wrong (the text names the field).
    #[error("{0}")]
    Malformed(String),
    /// A required message field was left unset.
    #[error("`{0}` is missing")]
    Missing(&'static str),
    /// `actor_id` is not a handshake of this learner process still waiting
    /// for its session (never issued, issued before a restart, its one
    /// session already opened, or the session key is not the one issued
    /// with it).
    #[error(
        "`actor_id` {0} with this session key is not a handshake of this learner awaiting its session (one session per handshake; the learner may have restarted): call Handshake first"
    )]
    UnknownActor(u64),
    /// `policy_version` claims weights this session was never sent.
    #[error(
        "`policy_version` {claimed} is newer than the newest weights sent to this actor ({latest})"
    )]
    FutureVersion {
        /// Sent by the actor.
        claimed: u64,
        /// The newest version sent to this actor's session.
        latest: u64,
    },
    /// A trajectory failed replay through the learner's environment.
    #[error("`trajectories[{index}]`: {source}")]
    Trajectory {
        /// Position of the trajectory in the chunk.
        index: usize,
        /// What was wrong with it.
        source: ReplayError,
    },
    /// One chunk of the declared size would take more memory, replayed,
    /// than one session may hold.
    #[error(
        "`{field}` is {per_chunk}: a chunk of that many full-length trajectories takes up to {chunk_bytes} bytes replayed, more than one session may hold (learner.max_session_bytes = {limit}); send fewer trajectories per chunk (actor.envs)"
    )]
    SessionMemory {
        /// The header or message field that declared the chunk size.
        field: String,
        /// Declared trajectories per chunk.
        per_chunk: u64,
        /// What one such chunk holds, replayed.
        chunk_bytes: u64,
        /// `learner.max_session_bytes`.
        limit: u64,
    },
    /// A chunk arrived with no unused credit.
    #[error("a chunk arrived without a credit: send one chunk per credit granted")]
    NoCredit,
    /// Training has ended; nothing more is accepted.
    #[error("the learner is shutting down")]
    ShuttingDown,
    /// A bug in the learner met while handling this request (a panic in
    /// validation): the request is refused, what was accepted before is
    /// kept, and the learner goes on.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// A short name for the rejection counters in reports.
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::ProtocolVersion { .. } => "protocol_version",
            RequestError::TaskMismatch { .. } => "task_mismatch",
            RequestError::ModelMismatch { .. } => "model_mismatch",
            RequestError::Malformed(_) => "malformed",
            RequestError::Missing(_) => "missing_field",
            RequestError::UnknownActor(_) => "unknown_actor",
            RequestError::FutureVersion { .. } => "future_version",
            RequestError::Trajectory { source, .. } => match source {
                ReplayError::Empty => "empty_trajectory",
                ReplayError::TooLong { .. } => "trajectory_too_long",
                ReplayError::LengthMismatch { .. } => "length_mismatch",
                ReplayError::EnergyOutOfRange { .. } => "energy_out_of_range",
                ReplayError::InvalidAction { .. } => "invalid_action",
            },
            RequestError::SessionMemory { .. } => "session_memory",
            RequestError::NoCredit => "no_credit",
            RequestError::ShuttingDown => "shutting_down",
            RequestError::Internal(_) => "internal",
        }
    }

    /// A task mismatch with both descriptions. Of one task with other
    /// parameters, only those that differ are shown: a preset
    /// (`task.size`) expands to many, and the one that differs is lost
    /// among the alike.
    pub fn task_mismatch(actor: &TaskSpec, learner: &TaskSpec) -> Self {
        let (actor, learner) = differing_params(actor, learner)
            .unwrap_or_else(|| (actor.to_string(), learner.to_string()));
        let (actor, learner) = both_described(actor, learner);
        RequestError::TaskMismatch { actor, learner }
    }

    /// A model mismatch with both descriptions.
    pub fn model_mismatch(actor: &ModelSpec, learner: &ModelSpec) -> Self {
        let (actor, learner) = both_described(actor.to_string(), learner.to_string());
        RequestError::ModelMismatch { actor, learner }
    }
}

/// Two descriptions of the same task with the same parameter names, cut
/// down to the parameters whose values differ (None: another task, or
/// other parameter names, shown whole).
fn differing_params(actor: &TaskSpec, learner: &TaskSpec) -> Option<(String, String)> {
    let key = |param: &str| param.split_once('=').map(|(key, _)| key.to_owned());
    let keys = |spec: &TaskSpec| spec.params.iter().map(|p| key(p)).collect::<Vec<_>>();
    if actor.name != learner.name || keys(actor) != keys(learner) {
        return None;
    }
    let (ours, theirs): (Vec<_>, Vec<_>) = actor
        .params
        .iter()
        .zip(&learner.params)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .unzip();
    if ours.len() == actor.params.len() {
        return None;
    }
    let described =
        |params: Vec<&str>| format!("{}({}; the rest alike)", actor.name, params.join(", "));
    Some((described(ours), described(theirs)))
}

/// Longest actor-supplied text echoed into a status (which travels in an
/// HTTP/2 header) or a log line, in bytes as a status sends it (see
/// [`sent_bytes`]).
const MAX_ECHO_BYTES: usize = 1024;

/// The bytes `c` takes in a status's `grpc-message`, which tonic
/// percent-encodes: one for printable ASCII, three for each UTF-8 byte of
/// anything else and for the ASCII it escapes (space, `"`, `#`, `%`, `<`,
/// `>`, `?`, backtick, braces). Counted in characters, 1,024 non-ASCII
/// ones became a 12 KiB header, over what gRPC clients take (8 KiB for
/// grpcio): the refusal reached the actor as a transport error, retried.
fn sent_bytes(c: char) -> usize {
    if c.is_ascii_graphic() && !matches!(c, '"' | '#' | '%' | '<' | '>' | '?' | '`' | '{' | '}') {
        1
    } else {
        3 * c.len_utf8()
    }
}

/// Whether `text` is sent within [`MAX_ECHO_BYTES`].
fn sent_within_limit(text: &str) -> bool {
    text.chars().map(sent_bytes).sum::<usize>() <= MAX_ECHO_BYTES
}

/// Characters shown before the first difference of two long descriptions.
const CONTEXT_CHARS: usize = 64;

/// Two descriptions that differ, each short enough for a status: it
/// travels in an HTTP/2 trailer, and clients take 8 to 16 KiB of headers
/// (a longer one reaches the actor as a transport error, which it retries,
/// instead of the refusal). The learner's own can be that long too (a
/// task with thousands of levels), so where either is long both are shown
/// from a little before the first character where they differ.
fn both_described(actor: String, learner: String) -> (String, String) {
    if sent_within_limit(&actor) && sent_within_limit(&learner) {
        return (clip(actor), clip(learner));
    }
    let same = actor
        .chars()
        .zip(learner.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let from = same.saturating_sub(CONTEXT_CHARS);
    let shown = |text: String| {
        let rest = clip(text.chars().skip(from).collect());
        if from == 0 {
            rest
        } else {
            format!("(from character {from}) ...{rest}")
        }
    };
    (shown(actor), shown(learner))
}

/// Actor-sent text as the learner shows it, in its logs and in statuses:
/// at most [`MAX_ECHO_BYTES`] as a status sends it, and control characters (a
/// newline, an escape sequence) as `?`, so that an actor's name or task
/// description cannot forge log lines or restyle a terminal; so are the
/// invisible characters that reorder or break what a reader sees (see
/// [`reorders_or_breaks_lines`]).
pub(crate) fn clip(text: String) -> String {
    let hidden = |c: char| c.is_control() || reorders_or_breaks_lines(c);
    let mut text = if text.chars().any(hidden) {
        text.chars()
            .map(|c| if hidden(c) { '?' } else { c })
            .collect()
    } else {
        text
    };
    let mut sent = 0;
    let cut = text.char_indices().find_map(|(at, c)| {
        sent += sent_bytes(c);
        (sent > MAX_ECHO_BYTES).then_some(at)
    });
    if let Some(cut) = cut {
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// tonic reports a fault in how a message is framed (the compressed
/// flag set where no `grpc-encoding` was agreed, a flag other than 0 or 1,
/// a stream that ends inside a message, a unary call with no message) as
/// INTERNAL, which the protocol keeps for the learner's own faults,
/// retried by actors: an actor with a framing bug would retry for ever,
/// and the log would blame the learner. They are the sender's:
/// INVALID_ARGUMENT, naming `what` was framed (the chunk, the request).
/// (Matched by tonic's words, which tests pin.)
pub(crate) fn framing_fault_as_sender_error(status: Status, what: &str) -> Status {
    let message = status.message();
    if status.code() == tonic::Code::Internal
        && (message.starts_with("protocol error:")
            || message.starts_with("Unexpected EOF decoding stream")
            || message.starts_with("Missing request message"))
    {
        return Status::invalid_argument(format!(
            "the {what}'s gRPC framing is invalid: {message}"
        ));
    }
    status
}

/// The reason a message that tonic's codec refused, before the learner
/// read it, is counted under, by the status's code: `undecodable` (bytes
/// that are no protobuf, framing faults once made so) or `too_large`
/// (over the decode limit, or a count or size the learner refuses before
/// decoding). None for other codes: a broken connection's, not the
/// sender's data (an INTERNAL here is one).
pub(crate) fn unreadable_reason(code: tonic::Code) -> Option<&'static str> {
    match code {
        tonic::Code::InvalidArgument => Some("undecodable"),
        tonic::Code::OutOfRange
        | tonic::Code::ResourceExhausted
        | tonic::Code::FailedPrecondition => Some("too_large"),
        _ => None,
    }
}

/// Unicode's invisible format characters that change how text around
/// them reads: bidirectional embeddings, overrides and isolates (a name
/// that shows its end first), zero-width characters and the line and
/// paragraph separators (a line break that `char::is_control` misses).
fn reorders_or_breaks_lines(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e0000}'..='\u{e007f}'
    )
}

impl From<RequestError> for Status {
    fn from(error: RequestError) -> Self {
        let message = error.to_string();
        match error {
            RequestError::ProtocolVersion { .. }
            | RequestError::TaskMismatch { .. }
            | RequestError::ModelMismatch { .. }
            | RequestError::NoCredit => Status::failed_precondition(message),
            // A learner restarted between an actor's handshake and its
            // session does not know the id it issued: the actor shakes
            // hands again on its next attempt (ABORTED: retry the
            // sequence), instead of stopping for good.
            RequestError::UnknownActor(_) => Status::aborted(message),
            RequestError::Missing(_)
            | RequestError::Malformed(_)
            | RequestError::FutureVersion { .. }
            | RequestError::Trajectory { .. } => Status::invalid_argument(message),
            // A limit, hence RESOURCE_EXHAUSTED, but a fixed one: the actor
            // must not wait for it to free up.
            RequestError::SessionMemory { .. } => {
                let mut status = Status::resource_exhausted(message);
                status.metadata_mut().insert(
                    FINAL_REFUSAL_HEADER,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                status
            }
            RequestError::ShuttingDown => Status::unavailable(message),
            RequestError::Internal(_) => Status::internal(message),
        }
    }
}

/// Why the learner cannot start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// libtorch failed (device, serialisation).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Weights could not be encoded.
    #[error("weights: {0}")]
    Weights(#[from] flgfn_common::weights::WeightsError),
    /// The metrics file could not be written.
    #[error("cannot write metrics file {path}")]
    Metrics {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Training failed: the model diverged, libtorch failed, or a thread
    /// of the trainer's (the trainer, the batch builder) panicked or
    /// could not start.
    #[error("training: {0}")]
    Trainer(String),
    /// A checkpoint could not be written, or none could be read back.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The local actor processes could not be started.
    #[error("cannot start local actors: {0}")]
    LocalActors(std::io::Error),
    /// The local actors started, then every one of them exited while
    /// training went on (a start-up error would send users looking in
    /// the wrong place).
    #[error("training stopped: {0}")]
    LocalActorsExited(String),
    /// Training ended, but local actors had failed on the way (exited
    /// with an error while others went on): a run to look at, though its
    /// figures are whole.
    #[error("{0} local actor(s) failed")]
    LocalActorsFailed(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_supplied_text_is_clipped_in_statuses() {
        let huge = TaskSpec {
            name: "x".repeat(100_000),
            params: vec![],
        };
        let ours = TaskSpec {
            name: "set_generation".to_owned(),
            params: vec!["universe=30".to_owned()],
        };
        let status = Status::from(RequestError::task_mismatch(&huge, &ours));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().len() < 2 * MAX_ECHO_BYTES,
            "{}",
            status.message().len()
        );
        assert!(
            status.message().ends_with(
                "learner trains set_generation(universe=30) (give the actor the learner's job file, or its [task] keys)"
            ),
            "{}",
            status.message()
        );
        assert_eq!(clip("short".to_owned()), "short");
    }

    #[test]
    fn actor_text_cannot_forge_log_lines() {
        assert_eq!(
            clip("host/1\n2026-12-04T00:00:00Z ERROR forged\u{1b}[31m".to_owned()),
            "host/1?2026-12-04T00:00:00Z ERROR forged?[31m"
        );
        assert_eq!(clip("ünïcode/7".to_owned()), "ünïcode/7");
        // After a right-to-left override, "exe.jpg" reads "gpj.exe"; a
        // line separator breaks the line where is_control sees nothing;
        // tag characters hide text.
        assert_eq!(
            clip("host/1\u{202e}exe.jpg\u{2028}ERROR forged\u{200b}".to_owned()),
            "host/1?exe.jpg?ERROR forged?"
        );
        assert_eq!(clip("a\u{e0041}\u{206f}b".to_owned()), "a??b");
        assert!(clip("x".repeat(10_000)).len() < 2 * MAX_ECHO_BYTES);
        // A short task description too (the refusal is logged).
        let forged = TaskSpec {
            name: "set_generation\nERROR forged".to_owned(),
            params: vec![],
        };
        let ours = TaskSpec {
            name: "set_generation".to_owned(),
            params: vec![],
        };
        let status = Status::from(RequestError::task_mismatch(&forged, &ours));
        assert!(!status.message().contains('\n'), "{}", status.message());
        assert!(
            status.message().contains("set_generation?ERROR forged"),
            "{}",
            status.message()
        );
    }

    /// Of one task with other parameters, the refusal names those that
    /// differ and leaves out the alike; other tasks are shown whole.
    #[test]
    fn a_task_mismatch_shows_only_the_parameters_that_differ() {
        let spec = |universe: &str, set_size: &str| TaskSpec {
            name: "set_generation".to_owned(),
            params: ["universe", "set_size", "levels"]
                .iter()
                .zip([universe, set_size, "0.5,0.25"])
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
        };
        let message = RequestError::task_mismatch(&spec("80", "60"), &spec("30", "60")).to_string();
        assert!(
            message.contains(
                "actor has set_generation(universe=80; the rest alike), learner trains set_generation(universe=30; the rest alike)"
            ),
            "{message}"
        );
        // Where every parameter differs, there is nothing to leave out.
        let message = RequestError::task_mismatch(
            &spec("80", "60"),
            &TaskSpec {
                params: vec![
                    "universe=30".into(),
                    "set_size=20".into(),
                    "levels=1".into(),
                ],
                ..spec("30", "60")
            },
        )
        .to_string();
        assert!(
            message.contains("learner trains set_generation(universe=30, set_size=20, levels=1)"),
            "{message}"
        );
        let other = TaskSpec {
            name: "lattice".to_owned(),
            params: vec!["size=3".to_owned()],
        };
        let message = RequestError::task_mismatch(&other, &spec("30", "60")).to_string();
        assert!(
            message.contains(
                "learner trains set_generation(universe=30, set_size=60, levels=0.5,0.25)"
            ),
            "{message}"
        );
    }

    /// The size that counts is the status's as sent: tonic percent-encodes
    /// its message, and a client takes 8 KiB of headers at least. An
    /// actor's task named in 4-byte characters (each 12 bytes as sent),
    /// or in spaces, is refused within that.
    #[test]
    fn a_refusal_echoing_non_ascii_text_fits_a_clients_headers() {
        let ours = TaskSpec {
            name: "set_generation".to_owned(),
            params: vec!["universe=30".to_owned()],
        };
        for name in [
            "\u{1f600}".repeat(2_000),
            " ".repeat(20_000),
            "é%".repeat(5_000),
        ] {
            let theirs = TaskSpec {
                name,
                params: vec![],
            };
            let status = Status::from(RequestError::task_mismatch(&theirs, &ours));
            let mut headers = tonic::codegen::http::HeaderMap::new();
            status.add_header(&mut headers).unwrap();
            let sent = headers.get("grpc-message").unwrap().len();
            assert!(sent <= 4 << 10, "grpc-message of {sent} bytes");
            assert!(sent >= 1 << 10, "clipped to {sent} bytes: more would fit");
        }
    }

    /// Two long tasks (thousands of levels) that differ far in: the
    /// refusal stays small and shows where they differ, on both sides.
    #[test]
    fn long_descriptions_are_shown_where_they_differ() {
        let levels = |last: &str| TaskSpec {
            name: "set_generation".to_owned(),
            params: vec![format!("levels={}{last}", "0.125,".repeat(4000))],
        };
        let status = Status::from(RequestError::task_mismatch(&levels("0.5"), &levels("0.25")));
        let message = status.message();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(message.len() < 4 * MAX_ECHO_BYTES, "{}", message.len());
        assert!(message.contains("0.125,0.5)"), "{message}");
        assert!(message.contains("0.125,0.25)"), "{message}");
        assert_eq!(message.matches("(from character ").count(), 2, "{message}");
    }
}
