//! The rollout worker: a plain thread that owns the actor's copy of the
//! policy (tch tensors are not `Sync`) and rolls out one chunk per order.
//!
//! The connection turns every credit the learner grants into an [`Order`]
//! carrying the weights that go with it, so each chunk is sampled by
//! exactly one version and tagged with it, and every version received is
//! used by the rollout of its grant's first credit: weights are loaded
//! only when an order brings other weights than the last loaded (another
//! version, or another session's: a version sent again to a new session
//! is loaded again). Orders of an earlier session (the learner went away
//! since) are skipped, since their credits died with the session, and so
//! are those a stopping actor's drain leaves: their versions go unloaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use bytes::Bytes;
use flgfn_common::env::Environment;
use flgfn_common::policy::{ModelSpec, Policy};
use flgfn_common::rollout::{Behaviour, rollout_unless, splitmix};
use flgfn_common::trajectory::TrajectoryChunk;
use flgfn_common::weights::WeightsError;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tch::Device;
use tokio::sync::mpsc;

/// Weights received from the learner.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Which session with the learner delivered them. Versions compare
    /// only within a session: a learner restarted without its checkpoints
    /// (none kept, or `--fresh`) counts from 0 again.
    pub session: u32,
    /// The learner's version number.
    pub version: u64,
    /// safetensors bytes.
    pub bytes: Bytes,
    /// When the connection received them: from here to the rollout that
    /// loads them is the actor's share of their publish-to-use latency
    /// (orders queued ahead of theirs, then the load).
    pub received_at: Instant,
}

/// Which weights were loaded last, and what loading new ones waited: the
/// worker and the load generator count versions alike.
#[derive(Debug, Default)]
pub struct LoadedWeights {
    /// Session and version of the last loaded.
    last: Option<(u32, u64)>,
    /// Versions loaded.
    pub count: u64,
    /// Sum over them of the microseconds from their arrival to their load.
    pub received_to_use_us: u64,
}

impl LoadedWeights {
    /// Whether `weights` are other than the last loaded (another version,
    /// or another session's): then they count as loaded now.
    pub fn load_if_new(&mut self, weights: &Weights) -> bool {
        let key = Some((weights.session, weights.version));
        if self.last == key {
            return false;
        }
        self.last = key;
        self.count += 1;
        self.received_to_use_us += weights.received_at.elapsed().as_micros() as u64;
        true
    }
}

/// Set on the current session's number while it drains (the actor is
/// stopping): orders still queued are skipped, but the rollout in
/// progress finishes and is sent. (Sessions are numbered from 1, far
/// below this bit.)
pub const DRAINING: u32 = 1 << 31;

/// Session number of a flush order: no rollout, but an empty
/// [`SampledChunk`] of this session back, once every order before it is
/// done (both channels keep their order). A stopping actor then knows that
/// every chunk it rolled out waits in the chunk channel.
pub const FLUSH_SESSION: u32 = u32::MAX;

/// One credit: roll out one chunk with `weights` (or a flush: see
/// [`FLUSH_SESSION`]).
#[derive(Debug, Clone)]
pub struct Order {
    /// The session whose credit this is.
    pub session: u32,
    /// The actor id of that session (seeds the default random stream).
    pub actor_id: u64,
    /// The weights of the grant that gave the credit (or the newest
    /// before it).
    pub weights: Arc<Weights>,
}

/// A chunk and the session whose credit it uses. A chunk is only sent in
/// that session.
#[derive(Debug)]
pub struct SampledChunk {
    /// Session of the credit.
    pub session: u32,
    /// The chunk; `actor_id` is stamped when it is sent.
    pub chunk: TrajectoryChunk,
}

impl SampledChunk {
    /// The answer to a flush order.
    pub fn flushed() -> Self {
        SampledChunk {
            session: FLUSH_SESSION,
            chunk: TrajectoryChunk::default(),
        }
    }
}

/// How the worker seeds its action draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeding {
    /// Exactly this seed: reproducible (`--seed-offset`).
    Fixed(u64),
    /// Mixed from this base, the learner-assigned actor id and fresh OS
    /// entropy at the first order: actors of one configuration never
    /// share a random stream.
    Distinct(u64),
}

/// How many of the versions loaded the report lists (8 bytes each).
pub const VERSIONS_KEPT: usize = 1 << 16;

/// What the worker did, for the actor's final report.
#[derive(Debug, Default, Clone)]
pub struct WorkerReport {
    /// The versions loaded, in order (restarting from 0 if the learner
    /// restarted from scratch): the first [`VERSIONS_KEPT`], so that a
    /// long run does not grow this for ever.
    pub versions_applied: Vec<u64>,
    /// Versions loaded, all of them (one sent again to a new session
    /// counts again).
    pub versions_loaded: u64,
    /// Sum over the versions loaded of the microseconds from their
    /// arrival to the rollout that loaded them.
    pub received_to_use_us: u64,
    /// Rollouts done (one chunk each).
    pub rollouts: u64,
    /// Orders skipped because their session had ended, before their
    /// rollout or half-way through it.
    pub orders_skipped: u64,
    /// Chunks rolled out after the connection stopped taking them (an
    /// actor that left without its rollout in progress).
    pub undelivered: u64,
    /// Rollouts abandoned half-way for the same reason (not counted in
    /// `rollouts`).
    pub abandoned: u64,
    /// The seed of the action draws.
    pub seed: Option<u64>,
    /// A hash of the first chunk's actions: two actors drawing the same
    /// random stream from the same weights produce the same value.
    pub first_chunk_digest: Option<u64>,
}

/// Everything the worker thread owns.
pub struct Worker {
    /// The task.
    pub env: Arc<dyn Environment>,
    /// Shape of the policy network.
    pub model: ModelSpec,
    /// One per credit.
    pub orders: mpsc::Receiver<Order>,
    /// Finished chunks.
    pub out: mpsc::Sender<SampledChunk>,
    /// The session now open; orders of others are skipped.
    pub current_session: Arc<AtomicU32>,
    /// Exploration and truncation.
    pub behaviour: Behaviour,
    /// Environments per rollout (= trajectories per chunk).
    pub envs: usize,
    /// How to seed the action draws.
    pub seeding: Seeding,
    /// Set when the connection has stopped taking chunks: the rollout in
    /// progress is abandoned at its next step instead of finished.
    pub abandon: Arc<AtomicBool>,
}

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The learner's weights do not load into this network.
    #[error("weights of version {version}: {source}")]
    Weights {
        /// The version that failed.
        version: u64,
        /// Why.
        source: WeightsError,
    },
}

/// Loads `weights` into `policy`, refusing them where their metadata
/// names another task or model than `ours` (or another version than the
/// grant's). The handshake already compared task and model; this holds
/// where the handshake and the session reached different learners (a
/// balancer routing each call on its own), and shapes alone would let a
/// same-sized network of another task through.
fn load_checked(
    policy: &mut Policy,
    weights: &Weights,
    ours: &[(&str, String)],
) -> Result<(), WeightsError> {
    let decoded = flgfn_common::weights::decode(&weights.bytes)?;
    let version = weights.version.to_string();
    let expected: Vec<(&str, &str)> = ours
        .iter()
        .map(|(key, value)| (*key, value.as_str()))
        .chain([("version", version.as_str())])
        .collect();
    if let Some((key, theirs, ours)) = decoded.metadata_mismatch(&expected) {
        return Err(WeightsError::Metadata(if key == "version" {
            format!("their metadata says version {theirs}, the grant that brought them {ours}")
        } else {
            format!("they are for {key} {theirs}, not this actor's {ours}")
        }));
    }
    policy.load_weights(&decoded.arrays)
}

impl Worker {
    /// Rolls out until the orders channel closes or the chunk receiver is
    /// dropped.
    pub fn run(mut self) -> Result<WorkerReport, WorkerError> {
        let mut policy = Policy::new(&self.model, Device::Cpu);
        let mut rng: Option<SmallRng> = None;
        let mut report = WorkerReport::default();
        let mut loaded = LoadedWeights::default();
        // The last version whose logits overflowed, and how many versions
        // did: said at the 1st, 2nd, 4th, ... (a new version comes each
        // step, and a diverged model overflows in every one).
        let mut overflowed: Option<u64> = None;
        let mut overflowed_versions: u64 = 0;
        let ours = [
            ("task", self.env.spec().to_string()),
            ("model", self.model.to_string()),
        ];
        while let Some(order) = self.orders.blocking_recv() {
            if order.session == FLUSH_SESSION {
                if self.out.blocking_send(SampledChunk::flushed()).is_err() {
                    break;
                }
                continue;
            }
            if order.session != self.current_session.load(Ordering::Acquire) {
                report.orders_skipped += 1;
                continue;
            }
            let weights = &order.weights;
            if loaded.load_if_new(weights) {
                load_checked(&mut policy, weights, &ours).map_err(|source| {
                    WorkerError::Weights {
                        version: weights.version,
                        source,
                    }
                })?;
                if report.versions_applied.len() < VERSIONS_KEPT {
                    report.versions_applied.push(weights.version);
                }
            }
            let rng = rng.get_or_insert_with(|| {
                let seed = seed_for(self.seeding, order.actor_id);
                report.seed = Some(seed);
                tracing::info!(seed, envs = self.envs, "action draws seeded");
                SmallRng::seed_from_u64(seed)
            });
            // Abandoned half-way when the actor leaves without it, or
            // when the order's session ends (a learner restart): its chunk
            // could only be dropped, and the next session's first credit
            // would wait behind it. A session draining (the actor
            // stopping) still takes it.
            let (abandon, current_session) = (&self.abandon, &self.current_session);
            let session_over = || {
                let current = current_session.load(Ordering::Acquire);
                abandon.load(Ordering::Relaxed)
                    || (current != order.session && current != order.session | DRAINING)
            };
            let rolled = rollout_unless(
                self.env.as_ref(),
                &policy,
                self.envs,
                self.behaviour,
                rng,
                &session_over,
            );
            let Some(rollout) = rolled else {
                if self.abandon.load(Ordering::Relaxed) {
                    report.abandoned += 1;
                    break;
                }
                report.orders_skipped += 1;
                continue;
            };
            if rollout.non_finite_draws > 0 && overflowed != Some(weights.version) {
                overflowed = Some(weights.version);
                overflowed_versions += 1;
                if overflowed_versions.is_power_of_two() {
                    tracing::warn!(
                        version = weights.version,
                        draws = rollout.non_finite_draws,
                        versions_so_far = overflowed_versions,
                        "the policy's logits are not finite at some states (weights too large for f32: the model diverged?): drawn uniformly there"
                    );
                }
            }
            let chunk = TrajectoryChunk {
                actor_id: 0,
                policy_version: weights.version,
                sequence: report.rollouts,
                trajectories: rollout.trajectories,
                credits_left: u32::try_from(self.orders.len()).unwrap_or(u32::MAX),
            };
            report
                .first_chunk_digest
                .get_or_insert_with(|| digest(&chunk));
            report.rollouts += 1;
            let sampled = SampledChunk {
                session: order.session,
                chunk,
            };
            if self.out.blocking_send(sampled).is_err() {
                report.undelivered += 1;
                break;
            }
        }
        report.versions_loaded = loaded.count;
        report.received_to_use_us = loaded.received_to_use_us;
        Ok(report)
    }
}

/// The seed of the action draws.
pub fn seed_for(seeding: Seeding, actor_id: u64) -> u64 {
    match seeding {
        Seeding::Fixed(seed) => seed,
        Seeding::Distinct(base) => {
            let entropy = rand::rng().next_u64();
            splitmix(splitmix(base ^ splitmix(actor_id)) ^ entropy)
        }
    }
}

/// FNV-1a over a chunk's actions, trajectory by trajectory.
fn digest(chunk: &TrajectoryChunk) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for trajectory in &chunk.trajectories {
        for &action in trajectory.actions.iter().chain(&[u32::MAX]) {
            for byte in action.to_le_bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use flgfn_common::config::ModelConfig;
    use flgfn_common::env::{InvalidAction, State, TaskSpec};
    use flgfn_common::tasks::set_generation::SetGeneration;
    use flgfn_common::weights::WeightEncoding;

    /// The set task, but its steps also set the current session to
    /// `becomes` (as a learner restart, or a stop, would half-way through
    /// a rollout of session 1).
    #[derive(Debug)]
    struct EndsSessionAtFirstStep {
        inner: SetGeneration,
        current_session: Arc<AtomicU32>,
        becomes: u32,
    }

    impl Environment for EndsSessionAtFirstStep {
        fn spec(&self) -> TaskSpec {
            self.inner.spec()
        }
        fn state_dim(&self) -> usize {
            self.inner.state_dim()
        }
        fn forward_actions(&self) -> usize {
            self.inner.forward_actions()
        }
        fn backward_actions(&self) -> usize {
            self.inner.backward_actions()
        }
        fn max_trajectory_len(&self) -> usize {
            self.inner.max_trajectory_len()
        }
        fn initial_state(&self) -> State {
            self.inner.initial_state()
        }
        fn encode(&self, state: &State, out: &mut [f32]) {
            self.inner.encode(state, out);
        }
        fn forward_mask(&self, state: &State, out: &mut [bool]) {
            self.inner.forward_mask(state, out);
        }
        fn backward_mask(&self, state: &State, out: &mut [bool]) {
            self.inner.backward_mask(state, out);
        }
        fn is_terminal(&self, state: &State) -> bool {
            self.inner.is_terminal(state)
        }
        fn step(&self, state: &mut State, action: usize) -> Result<usize, InvalidAction> {
            self.current_session.store(self.becomes, Ordering::Release);
            self.inner.step(state, action)
        }
        fn transition_energy(&self, state: &State, action: usize) -> f64 {
            self.inner.transition_energy(state, action)
        }
        fn energy(&self, state: &State) -> f64 {
            self.inner.energy(state)
        }
    }

    /// Runs a worker on one order of session 1 whose rollout's first step
    /// sets the current session to `becomes`: its report, and the chunks
    /// it sent.
    fn one_rollout_while_the_session_becomes(becomes: u32) -> (WorkerReport, usize) {
        let current_session = Arc::new(AtomicU32::new(1));
        let env = EndsSessionAtFirstStep {
            inner: SetGeneration::from_parts(10, 5, vec![-0.5, 0.5]).unwrap(),
            current_session: current_session.clone(),
            becomes,
        };
        let model = ModelSpec::new(&env, &ModelConfig { hidden: vec![8] });
        let bytes = Policy::new(&model, Device::Cpu)
            .to_bytes(WeightEncoding::F32)
            .unwrap();
        let (orders_in, orders) = mpsc::channel(4);
        let (out, mut chunks) = mpsc::channel(4);
        let weights = Arc::new(Weights {
            session: 1,
            version: 3,
            bytes: bytes.into(),
            // Arrived a while before the worker takes the order.
            received_at: Instant::now() - std::time::Duration::from_millis(40),
        });
        orders_in
            .try_send(Order {
                session: 1,
                actor_id: 1,
                weights,
            })
            .unwrap();
        drop(orders_in);
        let worker = Worker {
            env: Arc::new(env),
            model,
            orders,
            out,
            current_session,
            behaviour: Behaviour::default(),
            envs: 16,
            seeding: Seeding::Fixed(1),
            abandon: Arc::new(AtomicBool::new(false)),
        };
        let report = worker.run().unwrap();
        let sent = std::iter::from_fn(|| chunks.try_recv().ok()).count();
        (report, sent)
    }

    #[test]
    fn a_rollout_whose_session_ends_half_way_is_abandoned_not_sent() {
        let (report, sent) = one_rollout_while_the_session_becomes(2);
        assert_eq!(
            (report.rollouts, report.orders_skipped, report.abandoned),
            (0, 1, 0)
        );
        assert_eq!(sent, 0, "no chunk for the ended session");
    }

    #[test]
    fn a_rollout_in_progress_when_its_session_drains_is_finished_and_sent() {
        let (report, sent) = one_rollout_while_the_session_becomes(1 | DRAINING);
        assert_eq!((report.rollouts, report.orders_skipped), (1, 0));
        assert_eq!(sent, 1);
        // Its weights waited from their arrival to this rollout.
        assert_eq!(report.versions_loaded, 1);
        assert!(
            (40_000..10_000_000).contains(&report.received_to_use_us),
            "{} us",
            report.received_to_use_us
        );
    }

    #[test]
    fn weights_whose_metadata_disagrees_are_refused_saying_which_key() {
        let env = SetGeneration::from_parts(10, 5, vec![-0.5, 0.5]).unwrap();
        let model = ModelSpec::new(&env, &ModelConfig { hidden: vec![8] });
        let policy = Policy::new(&model, Device::Cpu);
        let ours = [
            ("task", env.spec().to_string()),
            ("model", model.to_string()),
        ];
        let refusal = |task: &str, version: &str| {
            let metadata = [("task", task), ("model", &ours[1].1), ("version", version)]
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect();
            let bytes =
                flgfn_common::weights::encode(&policy.weights(), WeightEncoding::F32, &metadata)
                    .unwrap();
            let weights = Weights {
                session: 1,
                version: 6,
                bytes: bytes.into(),
                received_at: Instant::now(),
            };
            load_checked(&mut Policy::new(&model, Device::Cpu), &weights, &ours)
                .err()
                .map(|error| error.to_string())
        };
        assert_eq!(refusal(&ours[0].1, "6"), None);
        let version = refusal(&ours[0].1, "7").unwrap();
        assert!(
            version.contains("metadata says version 7, the grant that brought them 6"),
            "{version}"
        );
        let task = refusal("set(other)", "6").unwrap();
        assert!(
            task.contains("they are for task set(other), not this actor's"),
            "{task}"
        );
    }

    #[test]
    fn distinct_seeding_differs_even_for_one_actor_id() {
        let a = seed_for(Seeding::Distinct(0), 1);
        let b = seed_for(Seeding::Distinct(0), 1);
        assert_ne!(a, b);
        assert_eq!(seed_for(Seeding::Fixed(7), 1), 7);
    }
}
