//! The rollout worker: a plain thread that owns the actor's copy of the
//! policy (tch tensors are not `Sync`), rolls out batches of environments
//! and hands finished chunks to the connection task.
//!
//! Between two rollouts it looks at the weight slot and loads newer weights
//! if there are any, so every chunk is sampled by exactly one version and is
//! tagged with it. The worker reserves room in the outgoing channel before
//! it samples, so a full channel blocks it before rather than after a
//! rollout: that is how the learner's backpressure reaches the sampling loop
//! without leaving freshly sampled chunks to age.

use std::sync::Arc;

use bytes::Bytes;
use flgfn_common::env::Environment;
use flgfn_common::policy::{ModelSpec, Policy};
use flgfn_common::rollout::{Behaviour, rollout};
use flgfn_common::trajectory::TrajectoryChunk;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tch::Device;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

/// Latest weights received from the learner.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Which session with the learner delivered them. A restarted learner
    /// counts versions from 0 again, so versions compare only within a
    /// session; weights of a new session are always loaded.
    pub session: u32,
    /// The learner's version number.
    pub version: u64,
    /// `VarStore` bytes.
    pub bytes: Bytes,
}

/// The slot the connection task writes and the worker reads: only the
/// latest weights matter, so older ones are overwritten unread.
pub type WeightSlot = watch::Receiver<Option<Arc<Weights>>>;

/// A chunk and the session whose weights sampled it. A restarted learner
/// counts versions from 0 again, so a chunk is only sent in the session
/// that gave it its version.
#[derive(Debug)]
pub struct SampledChunk {
    /// Session of the weights that sampled the chunk.
    pub session: u32,
    /// The chunk; `actor_id` is stamped when it is sent.
    pub chunk: TrajectoryChunk,
}

/// What the worker did, for the actor's final report.
#[derive(Debug, Default, Clone)]
pub struct WorkerReport {
    /// Every version loaded, in order (restarting from 0 if the learner
    /// restarted).
    pub versions_applied: Vec<u64>,
    /// Chunks handed to the connection task.
    pub chunks: u64,
}

/// Everything the worker thread owns.
pub struct Worker {
    /// The task.
    pub env: Arc<dyn Environment>,
    /// Shape of the policy network.
    pub model: ModelSpec,
    /// Where new weights appear.
    pub weights: WeightSlot,
    /// Finished chunks.
    pub out: mpsc::Sender<SampledChunk>,
    /// Exploration and truncation.
    pub behaviour: Behaviour,
    /// Environments per rollout (= trajectories per chunk).
    pub envs: usize,
    /// Seed of this worker's action draws.
    pub seed: u64,
    /// To wait for the first weights from this plain thread.
    pub runtime: Handle,
}

impl Worker {
    /// Rolls out until the actor drops the chunk receiver, or the weight
    /// slot closes before the first weights arrive.
    pub fn run(mut self) -> Result<WorkerReport, tch::TchError> {
        let mut policy = Policy::new(&self.model, Device::Cpu);
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let mut report = WorkerReport::default();
        let mut loaded: Option<(u32, u64)> = None;
        loop {
            // Sample only once the chunk has somewhere to go: a chunk that
            // waits for space is sampled by weights that age meanwhile.
            let Ok(permit) = self.runtime.block_on(self.out.reserve()) else {
                return Ok(report);
            };
            let latest = self.weights.borrow_and_update().clone();
            match latest {
                Some(weights)
                    if loaded.is_none_or(|(session, version)| {
                        weights.session != session || weights.version > version
                    }) =>
                {
                    policy.load_bytes(&weights.bytes)?;
                    loaded = Some((weights.session, weights.version));
                    report.versions_applied.push(weights.version);
                }
                Some(_) => {}
                None => {
                    // No weights yet: wait for the first ones, or for the
                    // actor to stop.
                    let weights = &mut self.weights;
                    if self.runtime.block_on(weights.changed()).is_err() {
                        return Ok(report);
                    }
                    continue;
                }
            }
            let Some((session, policy_version)) = loaded else {
                continue;
            };
            let rollout = rollout(
                self.env.as_ref(),
                &policy,
                self.envs,
                self.behaviour,
                &mut rng,
            );
            let chunk = TrajectoryChunk {
                actor_id: 0,
                policy_version,
                sequence: report.chunks,
                trajectories: rollout.trajectories,
            };
            permit.send(SampledChunk { session, chunk });
            report.chunks += 1;
        }
    }
}
