//! Rollout throughput of one actor thread for 16 to 1,024 environments in
//! lockstep (the default task and network), and what an actor process
//! costs in memory. Figures, never pass/fail.
//!
//! ```text
//! cargo bench -p flgfn-actor --bench rollout
//! ```
//!
//! Memory: RSS counts libtorch's shared-library pages (file-backed), which
//! every actor process on a node shares through the page cache; the
//! anonymous pages (heap, stacks, from /proc/self/smaps_rollup) are what
//! each additional actor really adds.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use flgfn_common::config::Config;
use flgfn_common::policy::{ModelSpec, Policy, set_threads};
use flgfn_common::rollout::{Behaviour, rollout};
use flgfn_common::tasks;
use rand::SeedableRng;
use rand::rngs::SmallRng;

/// (RSS, anonymous) memory of this process in MiB (smaps gives kB, KiB).
fn memory_mb() -> (f64, f64) {
    let Ok(rollup) = std::fs::read_to_string("/proc/self/smaps_rollup") else {
        return (0.0, 0.0);
    };
    let field = |name: &str| -> f64 {
        rollup
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("Rss:"), field("Anonymous:"))
}

fn main() {
    let config = Config::default();
    set_threads(config.actor.threads);
    let env = tasks::build(&config.task).unwrap();
    let policy = Policy::new(
        &ModelSpec::new(env.as_ref(), &config.model),
        tch::Device::Cpu,
    );
    let behaviour = Behaviour {
        epsilon: config.actor.epsilon,
        ..Behaviour::default()
    };
    let mut rng = SmallRng::seed_from_u64(1);
    println!("| envs in lockstep | transitions/s (1 thread) | ms per chunk | chunk transitions |");
    println!("|---|---|---|---|");
    for envs in [16, 32, 64, 128, 256, 512, 1024] {
        // Warm up, then roll out for about a second.
        rollout(env.as_ref(), &policy, envs, behaviour, &mut rng);
        let started = Instant::now();
        let (mut transitions, mut chunks) = (0usize, 0usize);
        while started.elapsed() < Duration::from_secs(1) {
            let out = rollout(env.as_ref(), &policy, envs, behaviour, &mut rng);
            transitions += out.trajectories.iter().map(|t| t.len()).sum::<usize>();
            chunks += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "| {envs} | {:.0} | {:.2} | {} |",
            transitions as f64 / seconds,
            1e3 * seconds / chunks as f64,
            transitions / chunks
        );
    }
    let (rss, anonymous) = memory_mb();
    println!(
        "\nactor process after rollouts: RSS {rss:.0} MiB, of which anonymous {anonymous:.0} MiB; \
         64 actors on one node: about {:.0} MiB (shared libtorch pages once, anonymous 64 times)",
        rss - anonymous + 64.0 * anonymous
    );
}
