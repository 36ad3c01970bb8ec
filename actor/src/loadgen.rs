//! The load generator: many synthetic actors in one process.
//!
//! Each generated actor speaks the real protocol through the same
//! connection code as `flgfn-actor` (handshake, credits and weights in,
//! chunks out, reconnects), but rolls out without a network: every action
//! is drawn uniformly among the valid ones and every energy term comes from
//! the task itself, so the chunks are valid and cost microseconds. Weights
//! are received and counted, not loaded. That is how one small machine
//! puts 64 to 256 actors' worth of connections on a learner.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use flgfn_common::config::Config;
use flgfn_common::env::Environment;
use flgfn_common::rollout::Behaviour;
use flgfn_common::tasks;
use flgfn_common::trajectory::{Trajectory, TrajectoryChunk};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::worker::{Order, SampledChunk};
use crate::{ActorError, ActorReport, Plumbing, stay_connected};

/// Draws one chunk of `count` trajectories with uniformly random valid
/// actions, cut as a real actor's `behaviour` cuts them
/// (`truncate_fraction`, `truncate_at`, `truncate_cap`).
pub fn uniform_chunk(
    env: &dyn Environment,
    count: usize,
    behaviour: &Behaviour,
    rng: &mut SmallRng,
) -> Vec<Trajectory> {
    let (actions_n, max_len) = (env.forward_actions(), env.max_trajectory_len());
    let mut mask = vec![false; actions_n];
    let mut valid = Vec::with_capacity(actions_n);
    (0..count)
        .map(|_| {
            let cut = behaviour.draw_length(max_len, rng);
            let mut state = env.initial_state();
            let mut trajectory = Trajectory::default();
            while !env.is_terminal(&state) && trajectory.len() < cut {
                env.forward_mask(&state, &mut mask);
                valid.clear();
                valid.extend((0..actions_n).filter(|&a| mask[a]));
                if valid.is_empty() {
                    break;
                }
                let action = valid[rng.random_range(0..valid.len())];
                // Of the state before the step; recorded with the action
                // only once the step succeeded, so both lists stay equal.
                let energy = env.transition_energy(&state, action) as f32;
                if env.step(&mut state, action).is_err() {
                    break;
                }
                trajectory.energies.push(energy);
                trajectory.actions.push(action as u32);
            }
            trajectory
        })
        .collect()
}

/// What one generated actor did, and how it ended.
#[derive(Debug)]
pub struct GeneratedActor {
    /// Its counts, a failed actor's too: what it sent before it failed
    /// reached the learner all the same (empty only where its task
    /// panicked).
    pub report: ActorReport,
    /// Why it failed, if it did.
    pub ended: Result<(), ActorError>,
}

impl GeneratedActor {
    /// Its report where it ended well, else its error.
    pub fn into_result(self) -> Result<ActorReport, ActorError> {
        self.ended.map(|()| self.report)
    }
}

/// Runs `actors` generated actors against `config.actor.learner` until
/// training ends or `shutdown` resolves; one outcome per actor, in order.
pub async fn run(
    config: Config,
    actors: usize,
    shutdown: impl Future<Output = ()>,
) -> Vec<GeneratedActor> {
    let (stop_sender, stop) = watch::channel(false);
    let handles: Vec<(usize, _)> = (0..actors)
        .map(|i| {
            let config = config.clone();
            let mut stop = stop.clone();
            let handle = tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                };
                generated_actor(config, i as u64, stopped).await
            });
            (i, handle)
        })
        .collect();
    let all = futures_join(handles);
    tokio::pin!(all);
    tokio::select! {
        reports = &mut all => return reports,
        () = shutdown => {}
    }
    stop_sender.send_replace(true);
    all.await
}

async fn futures_join(
    handles: Vec<(usize, tokio::task::JoinHandle<GeneratedActor>)>,
) -> Vec<GeneratedActor> {
    let mut reports = Vec::with_capacity(handles.len());
    for (index, handle) in handles {
        reports.push(handle.await.unwrap_or_else(|join| {
            let why = if join.is_panic() {
                format!(
                    "panicked: {}",
                    flgfn_common::telemetry::panic_message(join.into_panic().as_ref())
                )
            } else {
                join.to_string()
            };
            GeneratedActor {
                report: ActorReport::default(),
                ended: Err(ActorError::Worker(format!("generated actor {index} {why}"))),
            }
        }));
    }
    reports
}

/// One generated actor: the real connection loop, and a task that answers
/// each order with a uniform chunk.
async fn generated_actor(
    config: Config,
    index: u64,
    shutdown: impl Future<Output = ()>,
) -> GeneratedActor {
    let mut report = ActorReport::default();
    let ended = generate(config, index, &mut report, shutdown).await;
    GeneratedActor { report, ended }
}

/// [`generated_actor`]'s work, counted in `report` as it goes.
async fn generate(
    mut config: Config,
    index: u64,
    report: &mut ActorReport,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ActorError> {
    config.validate()?;
    // Dozens of generated actors in one process: their progress lines
    // would be most of its log.
    config.actor.progress_log_s = 0.0;
    let env: Arc<dyn Environment> = tasks::build(&config.task)?;
    let (order_sender, mut orders) = mpsc::channel::<Order>(crate::MAX_QUEUED_ORDERS);
    let (chunk_sender, mut chunks) = mpsc::channel(crate::MAX_QUEUED_ORDERS);
    let current_session = Arc::new(AtomicU32::new(0));
    let envs = config.envs_for(env.as_ref());
    // Uniform actions, cut as a real actor's are.
    let behaviour = Behaviour {
        epsilon: 1.0,
        ..Behaviour::from(&config.actor)
    };
    let session_seen = current_session.clone();
    // Each generated actor draws its own stream.
    let seed = crate::worker::seed_for(crate::worker::Seeding::Distinct(config.seed), index);
    let generator = tokio::spawn(async move {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (mut rollouts, mut undelivered, mut skipped) = (0u64, 0u64, 0u64);
        // Versions "loaded" as a real actor's worker counts them.
        let mut loaded = crate::worker::LoadedWeights::default();
        while let Some(order) = orders.recv().await {
            if order.session == crate::worker::FLUSH_SESSION {
                if chunk_sender.send(SampledChunk::flushed()).await.is_err() {
                    break;
                }
                continue;
            }
            if order.session != session_seen.load(Ordering::Acquire) {
                // Its credit died with an earlier session (counted as a
                // real actor's worker counts it).
                skipped += 1;
                continue;
            }
            let _ = loaded.load_if_new(&order.weights);
            let chunk = TrajectoryChunk {
                actor_id: 0,
                policy_version: order.weights.version,
                sequence: rollouts,
                trajectories: uniform_chunk(env.as_ref(), envs, &behaviour, &mut rng),
                credits_left: u32::try_from(orders.len()).unwrap_or(u32::MAX),
            };
            rollouts += 1;
            let sampled = SampledChunk {
                session: order.session,
                chunk,
            };
            if chunk_sender.send(sampled).await.is_err() {
                undelivered += 1;
                break;
            }
        }
        (rollouts, undelivered, skipped, loaded)
    });
    // Distinct across load generators too: the learner counts lost chunks
    // by name.
    let name = format!(
        "{}/{}/loadgen-{index}",
        crate::host_name(),
        std::process::id()
    );
    let plumbing = Plumbing {
        chunks: &mut chunks,
        orders: &order_sender,
        current_session: &current_session,
    };
    // Its lines say which of the process's actors they are.
    let span = crate::actor_span(&name, &config.actor.learner);
    let (result, counts) = stay_connected(&config, &name, plumbing, report, shutdown)
        .instrument(span)
        .await;
    drop(order_sender);
    let unsent = crate::close_and_count(&mut chunks);
    drop(chunks);
    report.add_counts(counts);
    report.stale_chunks_dropped += unsent;
    // A generator that panicked ended the session as if the actor had
    // stopped: it is a failure, not a quiet success with no rollouts.
    let (rollouts, undelivered, skipped, loaded) = match generator.await {
        Ok(generated) => generated,
        Err(error) => {
            return Err(ActorError::Worker(format!(
                "generated actor {index}: the trajectory generator failed: {error}"
            )));
        }
    };
    report.rollouts = rollouts;
    report.orders_skipped = skipped;
    report.versions_loaded = loaded.count;
    report.received_to_use_us = loaded.received_to_use_us;
    report.stale_chunks_dropped += undelivered;
    result
}

#[cfg(test)]
mod tests {
    use flgfn_common::tasks::set_generation::SetGeneration;
    use flgfn_common::trajectory::replay;

    use super::*;

    #[test]
    fn uniform_chunks_replay_cleanly_and_carry_the_task_energies() {
        let env = SetGeneration::from_parts(10, 5, vec![-0.5, 0.5]).unwrap();
        let mut rng = SmallRng::seed_from_u64(3);
        let behaviour = Behaviour {
            epsilon: 1.0,
            truncate_fraction: 0.5,
            truncate_at: flgfn_common::config::TruncateAt::Uniform,
            truncate_cap: 1,
        };
        let chunk = uniform_chunk(&env, 200, &behaviour, &mut rng);
        let mut cut = 0;
        for trajectory in &chunk {
            let replayed = replay(&env, trajectory).unwrap();
            if replayed.complete {
                assert!((replayed.energy() - env.energy(&replayed.final_state)).abs() < 1e-5);
            } else {
                cut += 1;
            }
        }
        assert!((60..140).contains(&cut), "{cut} of 200 cut");
        // Cut as a real actor's behaviour says: here, all at 2 steps.
        let capped = Behaviour {
            truncate_fraction: 1.0,
            truncate_at: flgfn_common::config::TruncateAt::Cap,
            truncate_cap: 2,
            ..behaviour
        };
        let chunk = uniform_chunk(&env, 50, &capped, &mut rng);
        assert!(chunk.iter().all(|t| t.len() == 2));
    }
}
