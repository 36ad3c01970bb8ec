//! What a gRPC status means to this actor: retried, refused for good, or
//! a fault no retry fixes ([`classify`]), and the words for each.

use flgfn_common::telemetry::with_causes;
use flgfn_common::wire::{ACTOR_ID_HEADER, FINAL_REFUSAL_HEADER};
use tonic::{Code, Status};

use super::SessionError;
use super::open::HANDSHAKE_TIMEOUT;
use super::tls::{CertificateTrouble, certificate_trouble};

pub(super) fn retry(message: impl Into<String>, served: bool) -> SessionError {
    SessionError::Retry {
        message: message.into(),
        served,
        not_http2: false,
    }
}

/// [`retry`] for a peer that answered with something that is not HTTP/2,
/// before any session.
pub(super) fn retry_not_http2(message: String) -> SessionError {
    SessionError::Retry {
        message,
        served: false,
        not_http2: true,
    }
}

/// A call the learner did not answer within [`HANDSHAKE_TIMEOUT`]: worth
/// another try (a learner loading its checkpoint holds calls until it
/// serves).
pub(super) fn no_answer(call: &str) -> SessionError {
    retry(
        format!(
            "no answer to the {call} call in {HANDSHAKE_TIMEOUT:?} (a learner loading its checkpoint answers once it serves; if this lasts, is actor.learner the address of a flgfn learner?)"
        ),
        false,
    )
}

/// How tonic's message begins where a reply had no gRPC status and its
/// HTTP status was mapped to a code (404 to UNIMPLEMENTED): an HTTP
/// server, such as a proxy, answered, not a gRPC service.
const HTTP_STATUS_MAPPED: &str = "grpc-status header missing, mapped from HTTP status code";

/// Refusals are final, and so are certificates refused either way;
/// anything else (unavailable, reset, a full learner, ...) is retried,
/// unless the learner marked it final.
pub(super) fn classify(status: Status, served: bool) -> SessionError {
    if status.metadata().contains_key(FINAL_REFUSAL_HEADER) {
        return SessionError::Refused(status);
    }
    let trouble = certificate_trouble(&status);
    if let Some(CertificateTrouble::Final(problem)) = trouble {
        // (A Status prints its source's Debug form: the causes read better.)
        let causes = status_causes(&status);
        return SessionError::Fatal(format!("tls: {problem} ({causes})"));
    }
    match status.code() {
        Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated => SessionError::Refused(status),
        // A message over a size limit (weights larger than this actor
        // takes, or a chunk larger than the learner takes) would be over
        // it again on every retry. A refusal that names its key (the
        // learner's learner.max_chunk_trajectories) is left as it is.
        Code::OutOfRange if status.message().contains("learner.") => SessionError::Refused(status),
        Code::OutOfRange => SessionError::Refused(Status::out_of_range(format!(
            "{} (learner.max_message_bytes of the side that refused it)",
            status.message()
        ))),
        // An HTTP proxy or ingress answering 404 with no body and no gRPC
        // status (tonic maps it to UNIMPLEMENTED): its route to the learner
        // may not exist yet. Retried, saying so. (One that answers with a
        // gRPC UNIMPLEMENTED of its own, as Envoy does, is the case below.)
        Code::Unimplemented if status.message().starts_with(HTTP_STATUS_MAPPED) => retry(
            format!(
                "{} (an HTTP proxy or ingress without its route to the learner yet? is actor.learner the address of a flgfn learner?)",
                status.message()
            ),
            served,
        ),
        // A gRPC server without flgfn's Learner service (another program
        // on that port): retrying, by default for ever, would hide it.
        Code::Unimplemented => SessionError::Refused(Status::unimplemented(format!(
            "{} (is actor.learner the address of a flgfn learner?)",
            status.message()
        ))),
        // The learner cut a session that sent nothing for its stall
        // timeout: rollouts slower than that would be cut every time.
        Code::DeadlineExceeded if !served => retry(
            format!(
                "{} (no chunk of this actor reached the learner in time: if one rollout of actor.envs environments takes longer than learner.stall_timeout_s, lower actor.envs)",
                status.message()
            ),
            served,
        ),
        // What answers before any session is not an HTTP/2 server (a web
        // server on that port, whose HTTP/1 reply reads as a frame too
        // large). Maybe passing, so retried, but saying what to check.
        _ if !served && not_http2(&status) => retry_not_http2(format!(
            "{}: {} (is actor.learner the address of a flgfn learner, with http:// or https:// as it serves?)",
            status.code(),
            status_causes(&status)
        )),
        _ => retry(
            format!(
                "{}{}: {}",
                CertificateTrouble::retry_prefix(trouble),
                status.code(),
                status_causes(&status)
            ),
            served,
        ),
    }
}

/// Why a call failed: a status the transport made says only "transport
/// error", and keeps why in its source.
pub(crate) fn status_causes(status: &Status) -> String {
    std::error::Error::source(status).map_or_else(|| status.message().to_owned(), with_causes)
}

/// Whether HTTP/2 itself found the peer breaking the protocol (it closed
/// the connection over an error it detected), rather than the peer going
/// away (an I/O error) or refusing something.
pub(crate) fn not_http2(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(current) = cause {
        if let Some(http2) = current.downcast_ref::<h2::Error>() {
            return http2.is_go_away() && http2.is_library();
        }
        cause = current.source();
    }
    false
}

/// Whether a refused Session that carried its handshake came from a
/// learner that predates that: it asks for the id of an earlier Handshake
/// call, which the two calls then give it.
pub(super) fn predates_handshake_header(status: &Status) -> bool {
    status.code() == Code::InvalidArgument
        && status
            .message()
            .starts_with(&format!("`{ACTOR_ID_HEADER}` is missing"))
}

/// What a refused handshake means to this actor (see [`classify`]).
pub(super) fn handshake_refused(status: Status) -> SessionError {
    match status.code() {
        // Larger than the learner decodes at all: a handshake is small
        // unless its task has many more parameters than the learner's own.
        Code::OutOfRange => SessionError::Refused(Status::failed_precondition(format!(
            "{} (the handshake is larger than this learner takes: this actor's task or model differs from the learner's; or the reply is larger than this actor's learner.max_message_bytes)",
            status.message()
        ))),
        _ => classify(status, false),
    }
}
