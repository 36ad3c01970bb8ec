//! The generated gRPC code for `proto/flgfn.proto` and its conversions to
//! domain types. Prost structs stop here: the rest of flgfn sees
//! [`TaskSpec`], [`ModelSpec`] and [`TrajectoryChunk`].
//!
//! Conversions from the wire check only what replay cannot (a chunk with no
//! trajectory); every per-trajectory field (lengths, energy range, legal
//! actions) is checked by the learner, the cheap ones before the replay
//! and again in it ([`crate::trajectory::replay`], which trusts no caller).

use tonic::Status;

use crate::env::TaskSpec;
use crate::policy::ModelSpec;
use crate::trajectory::{Trajectory, TrajectoryChunk};

/// Generated types and service stubs (package `flgfn.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("flgfn.v1");
}

/// The protobuf codec of every flgfn RPC: prost's, except that bytes that do
/// not decode as the expected message are the sender's fault and are
/// answered `INVALID_ARGUMENT` with prost's reason (tonic's prost codec
/// answers `INTERNAL`, which tells a client the server broke), and that a
/// chunk with more trajectories than the learner takes, or a handshake
/// larger than it takes, is refused before it is decoded
/// ([`codec::refuse_chunks_beyond`], [`codec::refuse_handshakes_beyond`]).
pub mod codec {
    use std::any::TypeId;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Buf;
    use prost::Message;
    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic::{Code, Status};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    use super::proto;

    /// Field number of `TrajectoryChunk.trajectories` in the proto.
    const TRAJECTORIES_FIELD: u64 = 4;

    /// Most `trajectories` entries a chunk may carry to be decoded at all
    /// (0: no limit). Process-wide, because tonic makes a codec per call
    /// with `Default` and hands it nothing: each learner raises it to its
    /// `learner.max_chunk_trajectories` (the largest, where tests run
    /// several learners in one process), and the learner checks each
    /// session's own declared count after decoding.
    static MAX_CHUNK_TRAJECTORIES: AtomicUsize = AtomicUsize::new(0);

    /// Most bytes a handshake may take to be decoded at all (0: no limit
    /// but the call's); process-wide for the same reason.
    static MAX_HANDSHAKE_BYTES: AtomicUsize = AtomicUsize::new(0);

    /// Refuse, before decoding, handshakes of more than `bytes` (or of
    /// more than the largest value any learner in this process gave). A
    /// handshake may otherwise be as large as the largest chunk, and one
    /// of empty task parameters (2 bytes each on the wire, ~24 decoded)
    /// takes many times its size in memory.
    pub fn refuse_handshakes_beyond(bytes: usize) {
        MAX_HANDSHAKE_BYTES.fetch_max(bytes.max(1), Ordering::Relaxed);
    }

    /// Refuses a handshake larger than any learner here takes.
    pub(crate) fn check_handshake_size(bytes: usize) -> Result<(), Status> {
        let limit = MAX_HANDSHAKE_BYTES.load(Ordering::Relaxed);
        if limit > 0 && bytes > limit {
            // FAILED_PRECONDITION, as for a task mismatch, which this is
            // (no larger setting would help, unlike a message over
            // max_message_bytes).
            return Err(Status::failed_precondition(format!(
                "the handshake takes {bytes} bytes, more than this learner takes ({limit}: its own task and model descriptions, plus 64 KiB for names): the actor's task or model is not the learner's (or its actor_name is longer than 64 KiB)"
            )));
        }
        Ok(())
    }

    /// Refuse, before decoding, chunks of more than `trajectories`
    /// trajectories (or of more than the largest value any learner in
    /// this process gave). A message is decoded whole, and a crafted one
    /// of empty trajectories (2 bytes each on the wire, 48 decoded, in a
    /// vector that doubles as it grows) would otherwise take ~50 times its
    /// size in memory before any field is checked.
    pub fn refuse_chunks_beyond(trajectories: usize) {
        MAX_CHUNK_TRAJECTORIES.fetch_max(trajectories.max(1), Ordering::Relaxed);
    }

    /// The number of entries of field `field` in the protobuf message
    /// `bytes`, reading only tags and lengths; None where the bytes are
    /// not a well-formed message, or hold a group (which proto3 never
    /// writes).
    pub fn count_entries(mut bytes: &[u8], field: u64) -> Option<usize> {
        let mut count = 0;
        while bytes.has_remaining() {
            let key = prost::encoding::decode_varint(&mut bytes).ok()?;
            let skip = match key & 7 {
                0 => {
                    prost::encoding::decode_varint(&mut bytes).ok()?;
                    0
                }
                1 => 8,
                2 => {
                    if key >> 3 == field {
                        count += 1;
                    }
                    usize::try_from(prost::encoding::decode_varint(&mut bytes).ok()?).ok()?
                }
                5 => 4,
                _ => return None,
            };
            if skip > bytes.len() {
                return None;
            }
            bytes.advance(skip);
        }
        Some(count)
    }

    /// Refuses a chunk with more trajectories than any learner here takes.
    fn check_chunk_size(buf: &DecodeBuf<'_>) -> Result<(), Status> {
        let limit = MAX_CHUNK_TRAJECTORIES.load(Ordering::Relaxed);
        let bytes = buf.chunk();
        // The message arrives whole in one buffer; anything else is left
        // to the decoder and the checks after it.
        if limit == 0 || bytes.len() != buf.remaining() {
            return Ok(());
        }
        check_chunk_bytes(bytes, limit)
    }

    /// [`check_chunk_size`] on the message's bytes.
    pub(crate) fn check_chunk_bytes(bytes: &[u8], limit: usize) -> Result<(), Status> {
        match count_entries(bytes, TRAJECTORIES_FIELD) {
            // OUT_OF_RANGE, as for a message over the size limit: the
            // learner counts both as too large.
            Some(count) if count > limit => Err(Status::out_of_range(format!(
                "`trajectories` has {count} entries, more than this learner takes in one chunk (learner.max_chunk_trajectories = {limit})"
            ))),
            Some(_) => Ok(()),
            // Refused rather than left to prost: it skips groups (which
            // proto3 never writes), so entries after or around one would
            // be decoded uncounted.
            None => Err(Status::invalid_argument(
                "the message is not a well-formed flgfn.v1 TrajectoryChunk (a field cut short, or a protobuf group)",
            )),
        }
    }

    /// See the module documentation.
    #[derive(Debug, Clone)]
    pub struct StrictCodec<T, U>(ProstCodec<T, U>);

    impl<T, U> Default for StrictCodec<T, U> {
        fn default() -> Self {
            StrictCodec(ProstCodec::default())
        }
    }

    impl<T, U> Codec for StrictCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = StrictDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            self.0.encoder()
        }

        fn decoder(&mut self) -> Self::Decoder {
            StrictDecoder(self.0.decoder())
        }
    }

    /// prost's decoder with decode failures as `INVALID_ARGUMENT`.
    #[derive(Debug, Clone, Default)]
    pub struct StrictDecoder<U>(ProstDecoder<U>);

    impl<U: Message + Default + 'static> Decoder for StrictDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            if TypeId::of::<U>() == TypeId::of::<proto::TrajectoryChunk>() {
                check_chunk_size(buf)?;
            }
            if TypeId::of::<U>() == TypeId::of::<proto::HandshakeRequest>() {
                check_handshake_size(buf.remaining())?;
            }
            self.0.decode(buf).map_err(|status| {
                if status.code() == Code::Internal {
                    Status::invalid_argument(format!(
                        "the message does not decode as protobuf: {}",
                        status.message()
                    ))
                } else {
                    status
                }
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}

/// Version of the wire contract; bumped when a field changes meaning.
/// 3: a session needs its handshake's session key.
pub const PROTOCOL_VERSION: u32 = 3;

/// gRPC metadata key of the Session call: the actor id from the handshake.
pub const ACTOR_ID_HEADER: &str = "flgfn-actor-id";

/// gRPC metadata key of the Session call: the session key from the
/// handshake, which only the actor that shook hands knows (actor ids are
/// issued in order, and guessable).
pub const SESSION_KEY_HEADER: &str = "flgfn-session-key";

/// gRPC metadata key of the Session call: most trajectories per chunk (as
/// declared at the handshake).
pub const TRAJECTORIES_PER_CHUNK_HEADER: &str = "flgfn-trajectories-per-chunk";

/// gRPC binary metadata key of a Session call that shakes hands itself:
/// the `HandshakeRequest`, protobuf-encoded, in place of the three headers
/// above. It saves the Handshake call's round trip (an actor behind 25 ms
/// each way started its first rollout 50 ms later with two calls).
pub const HANDSHAKE_HEADER: &str = "flgfn-handshake-bin";

/// gRPC binary metadata key of the answer to such a Session, in its
/// response headers: the `HandshakeReply`, protobuf-encoded.
pub const HANDSHAKE_REPLY_HEADER: &str = "flgfn-handshake-reply-bin";

/// Largest encoded handshake an actor sends in [`HANDSHAKE_HEADER`]; a
/// larger one (a task with thousands of parameters) goes as a Handshake
/// call, since HTTP/2 peers take only 8 to 16 KiB of headers, and the
/// reply, which repeats the task, comes back the same size.
pub const MAX_HANDSHAKE_HEADER_BYTES: usize = 4 << 10;

/// gRPC metadata key on a refusal whose code usually means "try again
/// later" (RESOURCE_EXHAUSTED) but which no retry can change: the actor's
/// own configuration does not fit the learner's limits, so it stops.
pub const FINAL_REFUSAL_HEADER: &str = "flgfn-final";

/// Most bytes a handshake needs (names, task parameters, layer sizes): the
/// floor of the learner's message limit.
pub const HANDSHAKE_BYTES: usize = 64 << 10;

/// Most bytes a valid chunk of `trajectories` trajectories of at most
/// `max_len` transitions can take on the wire: every action as a 5-byte
/// varint, every energy 4 bytes, every length and header field at its
/// widest. The learner decodes no larger message, because a message is
/// decoded whole before any field is checked and decoding can multiply
/// its size (an empty `Trajectory` is 2 bytes on the wire and 48 in
/// memory, a 1-byte action 4 bytes).
pub fn largest_chunk_bytes(trajectories: usize, max_len: usize) -> usize {
    // actor_id, policy_version, sequence: tag + 10-byte varint each;
    // credits_left: tag + 5.
    const CHUNK_FIELDS: usize = 3 * 11 + 6;
    // The trajectory's own tag and length, and the tag and length of its
    // two packed lists.
    const PER_TRAJECTORY: usize = 3 * 6;
    const PER_TRANSITION: usize = 5 + 4;
    CHUNK_FIELDS.saturating_add(
        trajectories
            .saturating_mul(PER_TRAJECTORY.saturating_add(max_len.saturating_mul(PER_TRANSITION))),
    )
}

impl From<&TaskSpec> for proto::TaskSpec {
    fn from(spec: &TaskSpec) -> Self {
        proto::TaskSpec {
            name: spec.name.clone(),
            params: spec.params.clone(),
        }
    }
}

impl From<proto::TaskSpec> for TaskSpec {
    fn from(spec: proto::TaskSpec) -> Self {
        TaskSpec {
            name: spec.name,
            params: spec.params,
        }
    }
}

impl From<&ModelSpec> for proto::ModelSpec {
    fn from(spec: &ModelSpec) -> Self {
        // Shapes are validated on creation and are far below u32::MAX.
        let narrow = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        proto::ModelSpec {
            input_dim: narrow(spec.input_dim),
            hidden: spec.hidden.iter().map(|&h| narrow(h)).collect(),
            forward_actions: narrow(spec.forward_actions),
            backward_actions: narrow(spec.backward_actions),
        }
    }
}

impl From<proto::ModelSpec> for ModelSpec {
    fn from(spec: proto::ModelSpec) -> Self {
        ModelSpec {
            input_dim: spec.input_dim as usize,
            hidden: spec.hidden.iter().map(|&h| h as usize).collect(),
            forward_actions: spec.forward_actions as usize,
            backward_actions: spec.backward_actions as usize,
        }
    }
}

impl From<Trajectory> for proto::Trajectory {
    fn from(t: Trajectory) -> Self {
        proto::Trajectory {
            actions: t.actions,
            energies: t.energies,
        }
    }
}

/// By value: the actions and energies move into the message (an actor
/// sends each chunk once; a copy doubled its memory and copy time on the
/// actor's one async thread).
impl From<TrajectoryChunk> for proto::TrajectoryChunk {
    fn from(chunk: TrajectoryChunk) -> Self {
        proto::TrajectoryChunk {
            actor_id: chunk.actor_id,
            policy_version: chunk.policy_version,
            sequence: chunk.sequence,
            trajectories: chunk.trajectories.into_iter().map(Into::into).collect(),
            credits_left: chunk.credits_left,
        }
    }
}

impl TryFrom<proto::TrajectoryChunk> for TrajectoryChunk {
    type Error = Status;

    fn try_from(chunk: proto::TrajectoryChunk) -> Result<Self, Status> {
        if chunk.trajectories.is_empty() {
            return Err(Status::invalid_argument(
                "`trajectories` is empty: a chunk carries at least one trajectory",
            ));
        }
        let trajectories = chunk
            .trajectories
            .into_iter()
            .map(|t| Trajectory {
                actions: t.actions,
                energies: t.energies,
            })
            .collect();
        Ok(TrajectoryChunk {
            actor_id: chunk.actor_id,
            policy_version: chunk.policy_version,
            sequence: chunk.sequence,
            trajectories,
            credits_left: chunk.credits_left,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> proto::TrajectoryChunk {
        proto::TrajectoryChunk {
            actor_id: 3,
            policy_version: 7,
            sequence: 11,
            trajectories: vec![proto::Trajectory {
                actions: vec![1, 2],
                energies: vec![0.5, -0.25],
            }],
            credits_left: 2,
        }
    }

    #[test]
    fn a_chunk_round_trips() {
        let domain = TrajectoryChunk::try_from(chunk()).unwrap();
        assert_eq!(domain.actor_id, 3);
        assert_eq!(domain.transitions(), 2);
        assert_eq!(proto::TrajectoryChunk::from(domain), chunk());
    }

    #[test]
    fn the_largest_valid_chunk_fits_its_bound_exactly_enough() {
        use prost::Message;
        for (trajectories, max_len) in [(1, 1), (16, 20), (1024, 80)] {
            let widest = proto::TrajectoryChunk {
                actor_id: u64::MAX,
                policy_version: u64::MAX,
                sequence: u64::MAX,
                trajectories: vec![
                    proto::Trajectory {
                        actions: vec![u32::MAX; max_len],
                        energies: vec![f32::MAX; max_len],
                    };
                    trajectories
                ],
                credits_left: u32::MAX,
            };
            let bound = largest_chunk_bytes(trajectories, max_len);
            let size = widest.encoded_len();
            assert!(size <= bound, "{size} > {bound}");
            // Not loose either: length varints are counted at their widest.
            assert!(bound - size <= 16 + 12 * trajectories, "{size} vs {bound}");
        }
    }

    #[test]
    fn trajectories_are_counted_from_tags_and_lengths_alone() {
        use prost::Message;
        let mut many = chunk();
        many.trajectories = vec![proto::Trajectory::default(); 1000];
        many.trajectories[7].actions = vec![u32::MAX; 300];
        let bytes = many.encode_to_vec();
        assert_eq!(codec::count_entries(&bytes, 4), Some(1000));
        assert_eq!(codec::count_entries(&bytes, 1), Some(0), "a varint field");
        // Cut short inside a length: not a message.
        assert_eq!(codec::count_entries(&bytes[..bytes.len() - 1], 4), None);
        assert_eq!(codec::count_entries(&[0x0b], 4), None, "a group tag");
        assert_eq!(codec::count_entries(&[], 4), Some(0));
    }

    #[test]
    fn a_chunk_that_hides_entries_behind_a_group_is_refused_before_decoding() {
        use prost::Message;
        // 2,000 empty trajectories, then an empty group of unknown field
        // 15: prost skips the group and decodes every trajectory.
        let mut bytes = [0x22, 0x00].repeat(2000);
        bytes.extend([0x7b, 0x7c]);
        let decoded = proto::TrajectoryChunk::decode(&bytes[..]).unwrap();
        assert_eq!(decoded.trajectories.len(), 2000);
        let status = codec::check_chunk_bytes(&bytes, 8).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("group"), "{status:?}");
        // Without the group: counted, and refused for the count.
        let status = codec::check_chunk_bytes(&bytes[..4000], 8).unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert!(codec::check_chunk_bytes(&bytes[..16], 8).is_ok());
    }

    #[test]
    fn an_empty_chunk_is_refused() {
        let mut bad = chunk();
        bad.trajectories.clear();
        let status = TrajectoryChunk::try_from(bad).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("`trajectories` is empty"),
            "{status:?}"
        );
    }
}
