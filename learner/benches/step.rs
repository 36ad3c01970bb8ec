//! What a training step costs on the trainer thread, with no actors, no
//! network and no evaluation: the fixed cost per step, taken apart, and
//! the previous design's per-step work measured side by side.
//!
//! ```text
//! cargo bench -p flgfn-learner --bench step [-- --hidden 8 --device cpu]
//! ```
//!
//! Rows (milliseconds per step, median of several rounds):
//! - `step`: batch to the device, forward, loss, backward, Adam: the
//!   computation itself.
//! - `step + guard + loss sum + snapshot`: what the trainer thread does per
//!   step now (non-finite guard, loss summed on the device, a device-side
//!   copy of the weights for the publisher).
//! - `... + collate`: also stacking the batch on this thread, which the
//!   batcher thread now does while the previous step runs.
//! - `previous design`: collate here, read the loss back every step, and
//!   serialise the weights every step.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Instant;

use clap::Parser;
use flgfn_common::config::Config;
use flgfn_common::objectives::{self, TransitionBatch};
use flgfn_common::policy::{ModelSpec, Policy, select_device, set_threads};
use flgfn_common::tasks;
use flgfn_common::trajectory::replay;
use flgfn_common::weights::WeightEncoding;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

#[derive(Debug, Parser)]
struct Args {
    /// Hidden layer widths (8: compute ~0, what is left is fixed cost).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    hidden: Vec<usize>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Steps per round.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// cargo bench passes this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Uniform actions, every trajectory complete.
const COMPLETE: flgfn_common::rollout::Behaviour = flgfn_common::rollout::Behaviour {
    epsilon: 1.0,
    truncate_fraction: 0.0,
    truncate_at: flgfn_common::config::TruncateAt::Uniform,
    truncate_cap: 1,
};

/// Milliseconds per call of `step`: the median of 5 rounds of `steps`
/// calls, the device synchronised at the end of each round.
fn median_ms(steps: usize, device: tch::Device, mut step: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..steps {
                step();
            }
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
            1e3 * started.elapsed().as_secs_f64() / steps as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn main() {
    let args = Args::parse();
    let mut config = Config::default();
    config.model.hidden = args.hidden.clone();
    config.learner.device = match args.device.as_str() {
        "cuda" => flgfn_common::config::DeviceConfig::Cuda,
        "auto" => flgfn_common::config::DeviceConfig::Auto,
        _ => flgfn_common::config::DeviceConfig::Cpu,
    };
    set_threads(config.learner.threads);
    let device = select_device(config.learner.device).unwrap();
    let env = tasks::build(&config.task).unwrap();
    let model = ModelSpec::new(env.as_ref(), &config.model);
    let policy = Policy::new(&model, device);
    let objective = objectives::build(&config.objective, device);
    let mut optimizer = nn::Adam::default().build(&policy.vars, 1e-4).unwrap();
    // The trainer's own Adam (its state goes into checkpoints).
    let mut own_adam = flgfn_learner::adam::Adam::new(
        flgfn_learner::parameters::FlatParameters::new(&policy.vars).unwrap(),
        1e-4,
    );
    // One default batch (16 trajectories, 320 transitions) of valid data.
    let mut rng = SmallRng::seed_from_u64(1);
    let trajectories: Vec<_> =
        flgfn_actor::loadgen::uniform_chunk(env.as_ref(), 16, &COMPLETE, &mut rng)
            .iter()
            .map(|t| replay(env.as_ref(), t).unwrap())
            .collect();
    let dims = (
        env.state_dim(),
        env.forward_actions(),
        env.backward_actions(),
    );
    let pinned = device.is_cuda();
    // The trainer's running sums between reports.
    let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
    let mut finite_steps = Tensor::zeros([], (Kind::Int64, device));

    let mut step = |collate_here: bool,
                    extras: bool,
                    previous: bool,
                    ours: bool,
                    prepared: &TransitionBatch| {
        let owned;
        let batch = if collate_here {
            owned = TransitionBatch::collate(&trajectories, dims, pinned).to_device(device);
            &owned
        } else {
            prepared
        };
        let output = policy.net.forward(&batch.states);
        let loss = objective.loss(&output, batch);
        if ours {
            own_adam.zero_grad();
            loss.backward();
            own_adam.step();
        } else if previous {
            // Read back every step, then serialise the weights every step.
            optimizer.backward_step(&loss);
            std::hint::black_box(loss.double_value(&[]));
            let mut bytes = Vec::new();
            policy.vars.save_to_stream(&mut bytes).unwrap();
            std::hint::black_box(bytes);
        } else if extras {
            // As the trainer: a step whose loss or gradients are not
            // finite is skipped, decided on the device.
            let finite = loss.isfinite();
            own_adam.zero_grad();
            loss.backward();
            let finite = finite.logical_and(&own_adam.gradients_finite());
            let skip = finite.logical_not();
            let _ = own_adam.step_unless(&skip);
            let _no_grad = tch::no_grad_guard();
            let _ = loss_sum.g_add_(&loss.detach().masked_fill(&skip, 0.0));
            let _ = finite_steps.g_add_(&finite);
            std::hint::black_box(own_adam.parameters().snapshot());
        } else {
            optimizer.backward_step(&loss);
        }
    };
    let prepared = TransitionBatch::collate(&trajectories, dims, pinned).to_device(device);
    let variants: [(&str, bool, bool, bool, bool); 5] = [
        ("step (libtorch's Adam)", false, false, false, false),
        (
            "step (flgfn's Adam, checkpointable)",
            false,
            false,
            false,
            true,
        ),
        (
            "step + guard + loss sum + snapshot",
            false,
            true,
            false,
            false,
        ),
        (
            "... + collate on the trainer thread",
            true,
            true,
            false,
            false,
        ),
        (
            "previous design: collate, read loss, serialise weights",
            true,
            false,
            true,
            false,
        ),
    ];
    println!(
        "network {:?} on {device:?}, batch of 320 transitions, ms per step (median of 5 rounds of {} steps)",
        args.hidden, args.steps
    );
    println!("| per step | ms |");
    println!("|---|---|");
    for (name, collate_here, extras, previous, ours) in variants {
        let ms = median_ms(args.steps, device, || {
            step(collate_here, extras, previous, ours, &prepared);
        });
        println!("| {name} | {ms:.3} |");
    }
    // The fixed cost proper: the step on batches of 1 to 64 trajectories.
    // The straight line through the three smallest (where the compute still
    // grows linearly; caches and the allocator bend it beyond) has as
    // intercept what a step costs whatever its size, and as slope the
    // compute.
    println!(
        "\nby batch size (flgfn's Adam):\n| trajectories | transitions | step ms | trainer thread ms |\n|---|---|---|---|"
    );
    let mut points = Vec::new();
    for count in [1usize, 2, 4, 16, 64] {
        let chunk: Vec<_> =
            flgfn_actor::loadgen::uniform_chunk(env.as_ref(), count, &COMPLETE, &mut rng)
                .iter()
                .map(|t| replay(env.as_ref(), t).unwrap())
                .collect();
        let host = TransitionBatch::collate(&chunk, dims, pinned);
        let batch = host.shallow_clone().to_device(device);
        let mut median = |extras: bool| {
            median_ms(args.steps, device, || {
                if extras && device.is_cuda() {
                    // As the trainer thread: the collated batch arrives in
                    // pinned host memory, and each step queues its copy.
                    let moved = host.shallow_clone().to_device(device);
                    step(false, true, false, false, &moved)
                } else {
                    step(false, extras, false, !extras, &batch)
                }
            })
        };
        let (bare, full) = (median(false), median(true));
        println!(
            "| {count} | {} | {bare:.3} | {full:.3} |",
            batch.transitions
        );
        points.push((batch.transitions as f64, bare, full));
    }
    let line = |y: fn(&(f64, f64, f64)) -> f64| {
        let smallest = &points[..3];
        let n = smallest.len() as f64;
        let mean_x = smallest.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = smallest.iter().map(y).sum::<f64>() / n;
        let slope = smallest
            .iter()
            .map(|p| (p.0 - mean_x) * (y(p) - mean_y))
            .sum::<f64>()
            / smallest.iter().map(|p| (p.0 - mean_x).powi(2)).sum::<f64>();
        (mean_y - slope * mean_x, slope)
    };
    for (name, (intercept, slope)) in [("step", line(|p| p.1)), ("trainer thread", line(|p| p.2))] {
        println!(
            "{name}: fixed cost {intercept:.3} ms per step (intercept, 1-4 trajectories), compute {:.1} us per 100 transitions",
            1e5 * slope
        );
    }

    // The computation taken apart: each row adds one stage to the one
    // above, so the differences are what each stage costs.
    println!("\ntaken apart (flgfn's Adam):\n| stages | ms |\n|---|---|");
    let stages = [
        "forward",
        "forward + loss",
        "forward + loss + backward",
        "forward + loss + backward + Adam",
    ];
    for (depth, name) in stages.iter().enumerate() {
        let ms = median_ms(args.steps, device, || {
            let output = policy.net.forward(&prepared.states);
            if depth >= 1 {
                let loss = objective.loss(&output, &prepared);
                if depth >= 2 {
                    own_adam.zero_grad();
                    loss.backward();
                }
                if depth >= 3 {
                    own_adam.step();
                }
            }
        });
        println!("| {name} | {ms:.3} |");
    }
    // The batch builder's own work per batch (off the trainer thread).
    let started = Instant::now();
    for _ in 0..1000 {
        std::hint::black_box(TransitionBatch::collate(&trajectories, dims, pinned));
    }
    println!(
        "\ncollating a batch of 320 transitions (batch builder thread): {:.3} ms",
        started.elapsed().as_secs_f64()
    );
    let bytes = policy.to_bytes(WeightEncoding::F32).unwrap().len();
    println!("\nweights: {bytes} bytes as f32 safetensors");
}
