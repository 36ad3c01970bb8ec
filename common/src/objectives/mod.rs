//! Training objectives behind the [`Objective`] trait, one file per
//! family.
//!
//! - [`detailed_balance`]: DB and FL-DB, one residual per transition;
//! - [`sub_trajectory`]: SubTB(lambda) and FL-SubTB(lambda), one residual
//!   per pair of states of a trajectory;
//! - [`trajectory_balance`]: TB with its own learned log Z.
//!
//! The forward-looking (FL) variants are the same balance conditions with
//! the flow reparameterised as log F(s) = log F~(s) - E(s): the network's
//! flow head is log F~, the local energy terms enter every residual, and
//! the terminal boundary is log F~(x) = 0. The others take the reward only
//! at terminal states, log F(x) = log R(x) = -E(x). This file holds what they
//! share: the tensor batch ([`TransitionBatch`]), the per-state flows
//! ([`state_log_flows`]) and the per-transition log-probability terms
//! ([`transition_terms`]). Both policies of every transition are scored on
//! one selection of the network's output rows ([`scored_log_probs`]): on a
//! small network a step costs its number of autograd nodes more than its
//! arithmetic. One selection, softmax and gather for P_F, P_B and both
//! flows together took 18-20 % off forward, loss and backward of an 8-wide
//! network on 20 transitions on a CPU (12 % on 80, about nothing on 320,
//! and it cost ~5 % more on 1,280), against one of each per policy and a
//! split of the output.
//!
//! Adding an objective: write its file, add an
//! [`ObjectiveName`] and a line to [`build`],
//! and give it a label in the learner's experiment suites
//! (`learner/src/experiment/suites.rs`, a `match` that will not compile
//! without it).

pub mod detailed_balance;
pub mod sub_trajectory;
pub mod trajectory_balance;

#[cfg(test)]
mod tests;

use tch::{Device, Kind, Tensor, nn};

use crate::config::{BackwardPolicy, ObjectiveConfig, ObjectiveName};
use crate::policy::PolicyOutput;
use crate::trajectory::ReplayedTrajectory;

/// A loss over a batch of transitions.
pub trait Objective: Send {
    /// Short name for logs (the configuration's spelling).
    fn name(&self) -> &'static str;

    /// The scalar loss of `output`, the network evaluated on
    /// `batch.states`.
    fn loss(&self, output: &PolicyOutput, batch: &TransitionBatch) -> Tensor;

    /// Parameters the objective learns besides the network (TB's log Z),
    /// with their Adam learning rate. They never reach the actors.
    fn own_parameters(&self) -> Option<(&nn::VarStore, f64)> {
        None
    }

    /// log Z from the objective's own parameters, where it has one (TB);
    /// the others read it off the flow head at s0. A scalar copy on the
    /// parameters' device: taking it does not wait for the device, reading
    /// it (`double_value`) does.
    fn learned_log_z(&self) -> Option<Tensor> {
        None
    }
}

/// Builds the configured objective; its own parameters, if any, live on
/// `device`.
pub fn build(config: &ObjectiveConfig, device: Device) -> Box<dyn Objective> {
    use detailed_balance::DetailedBalance;
    use sub_trajectory::SubTrajectoryBalance;
    let backward = config.backward_policy;
    match config.name {
        ObjectiveName::FlDb => Box::new(DetailedBalance::new(Flow::ForwardLooking, backward)),
        ObjectiveName::Db => Box::new(DetailedBalance::new(Flow::Plain, backward)),
        ObjectiveName::FlSubTb => Box::new(SubTrajectoryBalance::new(
            Flow::ForwardLooking,
            config.lambda,
            backward,
        )),
        ObjectiveName::SubTb => Box::new(SubTrajectoryBalance::new(
            Flow::Plain,
            config.lambda,
            backward,
        )),
        ObjectiveName::Tb => Box::new(trajectory_balance::TrajectoryBalance::new(
            backward,
            config.log_z_learning_rate,
            device,
        )),
    }
}

/// What the network's flow head means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// log F~(s) = log F(s) + E(s); pinned to 0 at terminal states, and the
    /// local energy terms enter every residual.
    ForwardLooking,
    /// log F(s) itself; log R(x) = -E(x) at terminal states.
    Plain,
}

/// Where trajectory `b`'s states and transitions sit, in a
/// `[trajectories, longest + 1]` grid: row `b` lists its state rows, then
/// repeats its last one. Sub-trajectory objectives work on this grid.
#[derive(Debug)]
pub struct PaddedLayout {
    /// `[B, L + 1]` int64 rows of `states`; past a trajectory's end, its
    /// last state again.
    pub states: Tensor,
    /// `[B, L]` int64 transition indices; past the end, its last one again.
    pub transitions: Tensor,
    /// `[B]` int64 transitions of each trajectory.
    pub lengths: Tensor,
    /// L, the longest trajectory in the batch.
    pub longest: usize,
    /// `[B]` int64 trajectory indices grouped by [`LengthBucket`], the
    /// buckets in order.
    pub order: Tensor,
    /// Trajectories grouped by length (1, 2, 3-4, 5-8, ... transitions):
    /// a sub-trajectory objective builds a `[count, longest + 1, longest +
    /// 1]` grid per bucket, so its memory stays within a few times
    /// transitions x L however the lengths mix (one `[B, L + 1, L + 1]`
    /// grid would be L times that for many short prefixes beside one long
    /// trajectory).
    pub buckets: std::sync::Arc<[LengthBucket]>,
}

/// Trajectories of similar length: `order[first..first + count]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthBucket {
    /// Its first place in [`PaddedLayout::order`].
    pub first: usize,
    /// How many trajectories it holds.
    pub count: usize,
    /// Its longest trajectory, in transitions.
    pub longest: usize,
}

impl LengthBucket {
    /// The bucket of a trajectory of `n` transitions: ceil(log2 n), so
    /// lengths within one differ by at most a factor of 2.
    fn of(n: usize) -> u32 {
        usize::BITS - n.saturating_sub(1).leading_zeros()
    }

    /// Groups trajectories of these lengths: the order and the buckets.
    fn group(lengths: &[i64]) -> (Vec<i64>, Vec<LengthBucket>) {
        let key = |b: usize| Self::of(lengths[b] as usize);
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_by_key(|&b| key(b));
        let mut buckets: Vec<LengthBucket> = Vec::new();
        for (place, &b) in order.iter().enumerate() {
            let n = lengths[b] as usize;
            match buckets.last_mut() {
                Some(last) if key(order[last.first]) == key(b) => {
                    last.count += 1;
                    last.longest = last.longest.max(n);
                }
                _ => buckets.push(LengthBucket {
                    first: place,
                    count: 1,
                    longest: n,
                }),
            }
        }
        (order.into_iter().map(|b| b as i64).collect(), buckets)
    }
}

/// Trajectories as tensors on the training device. Every state of every
/// trajectory is one row of `states`; transition `t` goes from row
/// `source[t]` to row `target[t]`.
#[derive(Debug)]
pub struct TransitionBatch {
    /// `[S, state_dim]` float encodings.
    pub states: Tensor,
    /// `[T]` int64 row of s_t.
    pub source: Tensor,
    /// `[T]` int64 row of s_{t+1}.
    pub target: Tensor,
    /// `[2T * (window + 1)]` int64 positions in the network's output,
    /// flattened (row * its width + column), of the entries each
    /// transition is scored on: for the first T rows, P_F's logits at s_t,
    /// padded to the window, then the flow at s_t; for the last T, P_B's
    /// logits at s_{t+1}, padded, then the flow at s_{t+1}. One selection
    /// of these gives both policies and both flows of every transition
    /// (the padding repeats the flow's position; the bias shuts it).
    /// Carried rather than built per step from the rows: built, a CPU step
    /// of 1,280 transitions took ~25 % longer than with the loss's earlier
    /// form, carried ~5 %. They cost 16 bytes per transition and window
    /// column, twice the bias: with a large action space, the largest part
    /// of a batch.
    pub scored_entries: Tensor,
    /// The scoring window: the larger action count, so a scored row holds
    /// either policy's logits and the flow.
    pub scored_window: usize,
    /// `[2T, 1]` int64 place of the taken action in its scored row: the
    /// forward action on the first T rows, the backward action on the
    /// last T.
    pub scored_actions: Tensor,
    /// `[2T, window + 1]` float, added to the scored rows before their
    /// softmax: 0 where an action is allowed, [`INVALID_LOGIT`] where not
    /// and on the padding and the flow, so the softmax of a row is the
    /// masked P_F (first T rows) or P_B (last T). (An add is vectorised and
    /// has an identity gradient; a `masked_fill` was a sixth of a small
    /// network's step.)
    pub scored_bias: Tensor,
    /// `[2T, 1]` float, 1 on the rows that score P_F and 0 on those that
    /// score P_B: multiplied into the logits, it leaves the bias alone to
    /// score a uniform P_B.
    pub scores_forward: Tensor,
    /// `[2T, 1]` float, what the network's flow counts for on each scored
    /// row: 1, except 0 at a terminal s_{t+1}, where the reward fixes the
    /// flow.
    pub scored_flow_weight: Tensor,
    /// `[T]` float local energy term.
    pub energies: Tensor,
    /// `[S]` float E(s) of each state, the energy terms summed from s0.
    pub state_energies: Tensor,
    /// `[S]` float, 1 at terminal states (where the flow is the reward's,
    /// not the network's) and 0 elsewhere.
    pub state_terminal: Tensor,
    /// The trajectories as a grid, for sub-trajectory objectives.
    pub padded: PaddedLayout,
    /// Number of transitions T.
    pub transitions: usize,
    /// Number of trajectories B.
    pub trajectories: usize,
    /// The buffer every tensor above is a view into.
    packed: Packed,
}

impl TransitionBatch {
    /// Stacks replayed trajectories into tensors on `device`.
    pub fn new<'a>(
        trajectories: impl IntoIterator<Item = &'a ReplayedTrajectory> + Clone,
        dims: (usize, usize, usize),
        device: Device,
    ) -> Self {
        Self::collate(trajectories, dims, false).to_device(device)
    }

    /// Stacks replayed trajectories into host tensors, in page-locked
    /// memory when `pinned` (so a later copy to a GPU can be asynchronous).
    /// The learner does this on its batch-builder thread, while the trainer
    /// runs the previous step.
    pub fn collate<'a>(
        trajectories: impl IntoIterator<Item = &'a ReplayedTrajectory> + Clone,
        dims: (usize, usize, usize),
        pinned: bool,
    ) -> Self {
        let (dim, fwd, bwd) = dims;
        let (mut states_n, mut trans_n, mut count, mut longest) = (0usize, 0usize, 0usize, 0);
        for t in trajectories.clone() {
            states_n += t.len() + 1;
            trans_n += t.len();
            count += 1;
            longest = longest.max(t.len());
        }
        // Columns of the output (P_F, P_B, flow) and of a scored row (the
        // larger policy, then the flow).
        let width = fwd + bwd + 1;
        let window = fwd.max(bwd);
        let mut encoded = Vec::with_capacity(states_n * dim);
        let mut source = Vec::with_capacity(trans_n);
        let mut scored_actions = Vec::with_capacity(2 * trans_n);
        let mut backward_actions = Vec::with_capacity(trans_n);
        let mut energies = Vec::with_capacity(trans_n);
        let mut state_energies = Vec::with_capacity(states_n);
        let mut state_terminal = Vec::with_capacity(states_n);
        let mut scored_bias = Vec::with_capacity(2 * trans_n * (window + 1));
        let mut backward_rows_bias = Vec::with_capacity(trans_n * (window + 1));
        let mut padded_states = Vec::with_capacity(count * (longest + 1));
        let mut padded_transitions = Vec::with_capacity(count * longest);
        let mut lengths = Vec::with_capacity(count);
        let bias = |&allowed: &bool| if allowed { 0f32 } else { INVALID_LOGIT };
        for t in trajectories {
            let first_state = encoded.len() / dim;
            let first_transition = source.len();
            let n = t.len();
            encoded.extend_from_slice(&t.encoded);
            source.extend((0..n).map(|i| (first_state + i) as i64));
            scored_actions.extend_from_slice(&t.actions);
            backward_actions.extend_from_slice(&t.backward_actions);
            energies.extend_from_slice(&t.energies);
            // Summed in f64: a long trajectory's E(s) stays exact to f32.
            let mut energy = 0f64;
            state_energies.push(0f32);
            for &e in &t.energies {
                energy += f64::from(e);
                state_energies.push(energy as f32);
            }
            state_terminal.extend((0..=n).map(|i| if t.complete && i == n { 1f32 } else { 0f32 }));
            // A scored row: the policy's mask, padding and the flow shut.
            for i in 0..n {
                for (bias_row, mask) in [
                    (&mut scored_bias, &t.forward_masks[i * fwd..(i + 1) * fwd]),
                    (
                        &mut backward_rows_bias,
                        &t.backward_masks[i * bwd..(i + 1) * bwd],
                    ),
                ] {
                    bias_row.extend(mask.iter().map(bias));
                    bias_row.extend(std::iter::repeat_n(INVALID_LOGIT, window + 1 - mask.len()));
                }
            }
            padded_states.extend((0..=longest).map(|k| (first_state + k.min(n)) as i64));
            padded_transitions.extend(
                (0..longest).map(|k| (first_transition + k.min(n.saturating_sub(1))) as i64),
            );
            lengths.push(n as i64);
        }
        let target: Vec<i64> = source.iter().map(|&s| s + 1).collect();
        // Where each scored row's entries sit in the flattened output: the
        // policy's columns, then the flow's (also standing in for padding).
        let flow_column = (fwd + bwd) as i64;
        let columns = |first: usize, count: usize| -> Vec<i64> {
            let mut columns: Vec<i64> = (first..first + count).map(|c| c as i64).collect();
            columns.resize(window + 1, flow_column);
            columns
        };
        let (forward_columns, backward_columns) = (columns(0, fwd), columns(fwd, bwd));
        let mut scored_entries = Vec::with_capacity(2 * trans_n * (window + 1));
        for (rows, columns) in [(&source, &forward_columns), (&target, &backward_columns)] {
            for &row in rows {
                scored_entries.extend(columns.iter().map(|&c| row * width as i64 + c));
            }
        }
        scored_actions.extend_from_slice(&backward_actions);
        scored_bias.extend_from_slice(&backward_rows_bias);
        let scores_forward: Vec<f32> = (0..2 * trans_n)
            .map(|i| if i < trans_n { 1f32 } else { 0f32 })
            .collect();
        // Sources are never terminal; a target's flow counts unless it is.
        let flow_weight: Vec<f32> = std::iter::repeat_n(1f32, trans_n)
            .chain(target.iter().map(|&row| 1.0 - state_terminal[row as usize]))
            .collect();
        let (order, buckets) = LengthBucket::group(&lengths);
        let (s, t, b) = (states_n as i64, trans_n as i64, count as i64);
        let mut packer = Packer::default();
        packer.f32(&encoded, &[s, dim as i64]);
        packer.i64(&source, &[t]);
        packer.i64(&target, &[t]);
        packer.i64(&scored_entries, &[2 * t * (window as i64 + 1)]);
        packer.i64(&scored_actions, &[2 * t, 1]);
        packer.f32(&scored_bias, &[2 * t, window as i64 + 1]);
        packer.f32(&scores_forward, &[2 * t, 1]);
        packer.f32(&flow_weight, &[2 * t, 1]);
        packer.f32(&energies, &[t]);
        packer.f32(&state_energies, &[s]);
        packer.f32(&state_terminal, &[s]);
        packer.i64(&padded_states, &[b, longest as i64 + 1]);
        packer.i64(&padded_transitions, &[b, longest as i64]);
        packer.i64(&lengths, &[b]);
        packer.i64(&order, &[b]);
        let put = |x: Tensor| if pinned { pinned_for_cuda(x) } else { x };
        let packed = Packed {
            floats: put(Tensor::from_slice(&packer.floats)),
            ints: put(Tensor::from_slice(&packer.ints)),
            parts: packer.parts.into(),
        };
        Self::unpack(packed, longest, buckets.into(), trans_n, count, window)
    }

    /// The batch's tensors as views into `packed`, in the order `collate`
    /// packs them.
    fn unpack(
        packed: Packed,
        longest: usize,
        buckets: std::sync::Arc<[LengthBucket]>,
        transitions: usize,
        trajectories: usize,
        scored_window: usize,
    ) -> Self {
        let mut views = packed.parts.iter().map(|part| packed.view(part));
        let mut next = || {
            views
                .next()
                .unwrap_or_else(|| unreachable!("15 parts packed"))
        };
        TransitionBatch {
            states: next(),
            source: next(),
            target: next(),
            scored_entries: next(),
            scored_window,
            scored_actions: next(),
            scored_bias: next(),
            scores_forward: next(),
            scored_flow_weight: next(),
            energies: next(),
            state_energies: next(),
            state_terminal: next(),
            padded: PaddedLayout {
                states: next(),
                transitions: next(),
                lengths: next(),
                order: next(),
                longest,
                buckets,
            },
            transitions,
            trajectories,
            packed,
        }
    }
}

impl TransitionBatch {
    /// The same batch, sharing this one's memory (as tch's
    /// `shallow_clone`): benchmarks time the trainer's copy to the GPU
    /// ([`TransitionBatch::to_device`]) step after step from one collated
    /// batch.
    pub fn shallow_clone(&self) -> Self {
        let packed = Packed {
            floats: self.packed.floats.shallow_clone(),
            ints: self.packed.ints.shallow_clone(),
            parts: self.packed.parts.clone(),
        };
        Self::unpack(
            packed,
            self.padded.longest,
            self.padded.buckets.clone(),
            self.transitions,
            self.trajectories,
            self.scored_window,
        )
    }

    /// The same batch on `device`. From pinned host memory to a GPU it is
    /// two copies (floats, integers), queued without waiting; on the CPU
    /// nothing is copied.
    pub fn to_device(self, device: Device) -> Self {
        if device == Device::Cpu {
            return self;
        }
        let put = |x: &Tensor| x.to_device_(device, x.kind(), true, false);
        let packed = Packed {
            floats: put(&self.packed.floats),
            ints: put(&self.packed.ints),
            parts: self.packed.parts,
        };
        Self::unpack(
            packed,
            self.padded.longest,
            self.padded.buckets,
            self.transitions,
            self.trajectories,
            self.scored_window,
        )
    }
}

/// A batch's tensors in two flat buffers, one per element type: one
/// (pinned) allocation each when collated, one copy each to a GPU, instead
/// of one of each per tensor.
#[derive(Debug)]
struct Packed {
    /// `[N]` f32: the float tensors, one after another.
    floats: Tensor,
    /// `[M]` int64: the index tensors, one after another.
    ints: Tensor,
    /// Where each tensor sits, in packing order.
    parts: std::sync::Arc<[Part]>,
}

/// One tensor of a [`Packed`] batch.
#[derive(Debug)]
struct Part {
    /// In `ints` rather than `floats`.
    int: bool,
    /// First element.
    offset: i64,
    shape: Vec<i64>,
}

impl Packed {
    /// `part` as a contiguous view of its buffer: one call, no copy.
    fn view(&self, part: &Part) -> Tensor {
        let buffer = if part.int { &self.ints } else { &self.floats };
        // as_strided counts from the start of the storage: both buffers
        // are whole tensors (made from a Vec, or copied to a device), never
        // views, so that is their first element. (No assertion:
        // `storage_offset` is not in tch 0.24, which the GPU build uses.)
        let mut strides = vec![1i64; part.shape.len()];
        for i in (0..part.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * part.shape[i + 1];
        }
        buffer.as_strided(part.shape.as_slice(), strides.as_slice(), part.offset)
    }
}

/// Builds a [`Packed`] batch.
#[derive(Default)]
struct Packer {
    floats: Vec<f32>,
    ints: Vec<i64>,
    parts: Vec<Part>,
}

impl Packer {
    fn f32(&mut self, values: &[f32], shape: &[i64]) {
        push(&mut self.floats, &mut self.parts, false, values, shape);
    }

    fn i64(&mut self, values: &[i64], shape: &[i64]) {
        push(&mut self.ints, &mut self.parts, true, values, shape);
    }
}

/// Appends `values` to `buffer` (the float or the integer one) as a part
/// of `shape`.
fn push<T: Copy>(
    buffer: &mut Vec<T>,
    parts: &mut Vec<Part>,
    int: bool,
    values: &[T],
    shape: &[i64],
) {
    debug_assert_eq!(values.len() as i64, shape.iter().product::<i64>());
    parts.push(Part {
        int,
        offset: buffer.len() as i64,
        shape: shape.to_vec(),
    });
    buffer.extend_from_slice(values);
}

/// `x` in page-locked host memory, from which a copy to a CUDA device
/// does not block the trainer.
///
/// `_pin_memory`, not `pin_memory`: given a device, as tch always gives
/// one, libtorch 2.13's `pin_memory` prints two deprecation warnings to
/// stderr on every call, four lines a batch (plain text amid JSON logs,
/// and thousands a second at GPU step rates).
pub(crate) fn pinned_for_cuda(x: Tensor) -> Tensor {
    x.internal_pin_memory(Device::Cuda(0))
}

/// Added to the logit of an action that is not allowed: far below any
/// real logit, yet finite, so no NaN can reach the gradient.
pub const INVALID_LOGIT: f32 = -1e9;

/// Each transition's scored rows ([`TransitionBatch::scored_entries`]),
/// `[2T, window + 1]`, their last column the flow, and the
/// log-probabilities of the actions taken there, `[2T, 1]`: log
/// P_F(s_{t+1}|s_t) on the first T rows, log P_B(s_t|s_{t+1}) on the last
/// T, each under its policy restricted to the valid actions. A uniform P_B
/// is scored from the bias alone.
pub fn scored_log_probs(
    output: &PolicyOutput,
    batch: &TransitionBatch,
    backward: BackwardPolicy,
) -> (Tensor, Tensor) {
    let rows = output
        .heads
        .reshape([-1])
        .index_select(0, &batch.scored_entries)
        .view([-1, batch.scored_window as i64 + 1]);
    let logits = match backward {
        BackwardPolicy::Learned => &rows + &batch.scored_bias,
        BackwardPolicy::Uniform => &rows * &batch.scores_forward + &batch.scored_bias,
    };
    let log_probs = logits
        .log_softmax(-1, Kind::Float)
        .gather(1, &batch.scored_actions, false);
    (rows, log_probs)
}

/// log F(s) of every state row, `[S]`, as the balance conditions use it:
/// the network's flow head except at terminal states, where the reward
/// fixes it (log F~(x) = 0, or log F(x) = -E(x)).
pub fn state_log_flows(output: &PolicyOutput, batch: &TransitionBatch, flow: Flow) -> Tensor {
    let learned = output.log_flow() * (1.0 - &batch.state_terminal);
    match flow {
        Flow::ForwardLooking => learned,
        Flow::Plain => learned - &batch.state_energies * &batch.state_terminal,
    }
}

/// Per transition, `[T]`: log P_F(s'|s) - log P_B(s|s'), plus the local
/// energy term E(s -> s') for forward-looking flows. A balance residual
/// is log F(s_i) + (the sum of these from i to j) - log F(s_j).
pub fn transition_terms(
    output: &PolicyOutput,
    batch: &TransitionBatch,
    flow: Flow,
    backward: BackwardPolicy,
) -> Tensor {
    let (_, log_probs) = scored_log_probs(output, batch, backward);
    let sides = log_probs.view([2, batch.transitions as i64]);
    let terms = sides.get(0) - sides.get(1);
    match flow {
        Flow::ForwardLooking => terms + &batch.energies,
        Flow::Plain => terms,
    }
}

impl PaddedLayout {
    /// Per-transition values `[T]` laid out on the grid, `[B, L]`, with 0
    /// past each trajectory's end.
    pub fn by_trajectory(&self, per_transition: &Tensor) -> Tensor {
        let (b, l) = (self.lengths.size()[0], self.longest as i64);
        let steps = Tensor::arange(l, (Kind::Int64, per_transition.device()));
        let live = steps
            .unsqueeze(0)
            .lt_tensor(&self.lengths.unsqueeze(1))
            .to_kind(Kind::Float);
        per_transition
            .index_select(0, &self.transitions.view(-1))
            .view([b, l])
            * live
    }
}

/// Per trajectory, `[B]`: sum over its transitions of
/// log P_F(s_{t+1}|s_t) - log P_B(s_t|s_{t+1}), i.e. log P_F(tau) -
/// log P_B(tau | s_n). TB's residual and the importance-sampling estimate
/// of log Z are built from it.
pub fn trajectory_log_ratios(
    output: &PolicyOutput,
    batch: &TransitionBatch,
    backward: BackwardPolicy,
) -> Tensor {
    batch
        .padded
        .by_trajectory(&transition_terms(output, batch, Flow::Plain, backward))
        .sum_dim_intlist(1, false, Kind::Float)
}
