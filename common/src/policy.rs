//! The policy network: an MLP on the state encoding with three heads,
//! P_F logits, P_B logits and the forward-looking flow log F~(s).
//!
//! The same code runs in the actors (CPU, no grad) and in the learner. A
//! [`Policy`] owns its `VarStore`; tch tensors are `Send` but not `Sync`, so
//! each policy lives on one thread and weights travel between processes as
//! safetensors bytes ([`Policy::to_bytes`], [`Policy::load_bytes`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::{DeviceConfig, ModelConfig};
use crate::env::{Environment, State, TaskSpec};
use crate::weights::{self, NamedArray, WeightEncoding, WeightsError};

/// Everything that decides whether weights fit a network. Sent at the
/// handshake: an actor with another shape could not load the weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Length of the state encoding.
    pub input_dim: usize,
    /// Hidden layer widths.
    pub hidden: Vec<usize>,
    /// Size of the P_F head.
    pub forward_actions: usize,
    /// Size of the P_B head.
    pub backward_actions: usize,
}

impl ModelSpec {
    /// The network for `env` with the configured hidden layers.
    pub fn new(env: &dyn Environment, config: &ModelConfig) -> Self {
        ModelSpec {
            input_dim: env.state_dim(),
            hidden: config.hidden.clone(),
            forward_actions: env.forward_actions(),
            backward_actions: env.backward_actions(),
        }
    }

    /// Width of the output layer: the P_F logits, the P_B logits and the
    /// log-flow.
    pub fn outputs(&self) -> usize {
        self.forward_actions + self.backward_actions + 1
    }

    /// Weights and biases of every layer, counted without building the
    /// network (a width too large to allocate is an error to report, not
    /// a libtorch abort).
    pub fn parameter_count(&self) -> u128 {
        let outputs = self.outputs();
        let mut inputs = self.input_dim as u128;
        let mut count = 0u128;
        for &width in self.hidden.iter().chain(std::iter::once(&outputs)) {
            count = count.saturating_add((inputs + 1).saturating_mul(width as u128));
            inputs = width as u128;
        }
        count
    }

    /// The metadata every published copy of the weights carries: the task
    /// and the network, so that a reader can tell which run's they are.
    pub fn weight_metadata(&self, task: &TaskSpec) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("task".to_owned(), task.to_string()),
            ("model".to_owned(), self.to_string()),
        ])
    }

    /// At least the size of the network's weights as one safetensors
    /// buffer in `encoding` with `metadata` in its header: the values, the
    /// metadata (twice its length: JSON may escape it), plus a generous
    /// allowance for the rest of the header (names, shapes and offsets of
    /// its few tensors, the encoding and version entries).
    pub fn weight_bytes(
        &self,
        encoding: WeightEncoding,
        metadata: &BTreeMap<String, String>,
    ) -> u128 {
        let per_value = match encoding {
            WeightEncoding::F32 => 4,
            WeightEncoding::Bf16 => 2,
        };
        let tensors = 2 * (self.hidden.len() as u128 + 1);
        let metadata: usize = metadata.iter().map(|(k, v)| 2 * (k.len() + v.len())).sum();
        self.parameter_count()
            .saturating_mul(per_value)
            .saturating_add(4096 + 256 * tensors + metadata as u128)
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mlp(input={}, hidden={:?}, pf={}, pb={})",
            self.input_dim, self.hidden, self.forward_actions, self.backward_actions
        )
    }
}

/// What the network says about a batch of states: its output layer as it
/// comes, `[N, forward_actions + backward_actions + 1]`, P_F logits, then
/// P_B logits, then log F~(s). Kept whole, with the parts as views, so that
/// a loss can take both policies and both flows of a transition with one
/// selection and one softmax: on a small network every autograd node is a
/// sizeable part of the step.
#[derive(Debug)]
pub struct PolicyOutput {
    /// `[N, forward_actions + backward_actions + 1]`, unmasked.
    pub heads: Tensor,
    /// Columns of P_F logits; P_B's follow, then the flow.
    forward_actions: i64,
    /// Columns of P_B logits.
    backward_actions: i64,
}

impl PolicyOutput {
    /// The output layer `heads` of a network with these action counts.
    pub fn new(heads: Tensor, forward_actions: usize, backward_actions: usize) -> Self {
        PolicyOutput {
            heads,
            forward_actions: forward_actions as i64,
            backward_actions: backward_actions as i64,
        }
    }

    /// The heads laid side by side, `[N, A]`, `[N, B]` and `[N]` (for tests
    /// and hand-made outputs).
    pub fn from_parts(
        forward_logits: &Tensor,
        backward_logits: &Tensor,
        log_flow: &Tensor,
    ) -> Self {
        let heads = Tensor::cat(
            &[forward_logits, backward_logits, &log_flow.unsqueeze(-1)],
            -1,
        );
        let (a, b) = (forward_logits.size()[1], backward_logits.size()[1]);
        PolicyOutput::new(heads, a as usize, b as usize)
    }

    /// `[N, forward_actions]` P_F logits, unmasked (a view).
    pub fn forward_logits(&self) -> Tensor {
        self.heads.narrow(-1, 0, self.forward_actions)
    }

    /// `[N, backward_actions]` P_B logits, unmasked (a view).
    pub fn backward_logits(&self) -> Tensor {
        self.heads
            .narrow(-1, self.forward_actions, self.backward_actions)
    }

    /// `[N]`: log F~(s), the flow with the accrued energy taken out (a
    /// view of the last column).
    pub fn log_flow(&self) -> Tensor {
        self.heads
            .select(-1, self.forward_actions + self.backward_actions)
    }
}

/// The MLP. All heads share one output layer so a forward pass is a handful
/// of libtorch calls, which matters for the small batches actors run.
#[derive(Debug)]
pub struct PolicyNet {
    hidden: Vec<nn::Linear>,
    heads: nn::Linear,
    spec: ModelSpec,
}

impl PolicyNet {
    /// Creates the layers under `path` with libtorch's default init.
    pub fn new(path: &nn::Path, spec: &ModelSpec) -> Self {
        let mut hidden = Vec::with_capacity(spec.hidden.len());
        let mut width = spec.input_dim as i64;
        for (i, &h) in spec.hidden.iter().enumerate() {
            hidden.push(nn::linear(
                path / format!("hidden{i}"),
                width,
                h as i64,
                Default::default(),
            ));
            width = h as i64;
        }
        let outputs = spec.outputs() as i64;
        let heads = nn::linear(path / "heads", width, outputs, Default::default());
        PolicyNet {
            hidden,
            heads,
            spec: spec.clone(),
        }
    }

    /// Runs the network on `states` (`[N, input_dim]`, float).
    pub fn forward(&self, states: &Tensor) -> PolicyOutput {
        let mut x = states.shallow_clone();
        for layer in &self.hidden {
            x = layer.forward(&x).leaky_relu();
        }
        PolicyOutput::new(
            self.heads.forward(&x),
            self.spec.forward_actions,
            self.spec.backward_actions,
        )
    }
}

/// A network together with the `VarStore` that owns its weights.
pub struct Policy {
    /// Owns the parameters; the optimizer and the byte conversions use it.
    pub vars: nn::VarStore,
    /// The layers, referring to `vars`.
    pub net: PolicyNet,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("spec", &self.net.spec)
            .field("device", &self.vars.device())
            .finish()
    }
}

impl Policy {
    /// Fresh weights on `device`.
    pub fn new(spec: &ModelSpec, device: Device) -> Self {
        let vars = nn::VarStore::new(device);
        let net = PolicyNet::new(&vars.root(), spec);
        Policy { vars, net }
    }

    /// The network's shape.
    pub fn spec(&self) -> &ModelSpec {
        &self.net.spec
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.vars.device()
    }

    /// The weights as host arrays, sorted by name.
    pub fn weights(&self) -> Vec<NamedArray> {
        vars_to_host(&self.vars)
    }

    /// A copy of every parameter on the policy's own device: cheap (no
    /// transfer to the host), and unaffected by later optimizer steps. The
    /// learner takes one per published version and leaves serialisation to
    /// whoever needs the bytes.
    pub fn snapshot(&self) -> DeviceSnapshot {
        let _guard = tch::no_grad_guard();
        let (variables, slots) = parameter_layout(&self.vars);
        let flat: Vec<Tensor> = variables
            .iter()
            .map(|t| t.detach().to_kind(Kind::Float).reshape([-1]))
            .collect();
        DeviceSnapshot::new(Tensor::cat(&flat, 0), slots.into())
    }

    /// Serialises the weights as safetensors.
    pub fn to_bytes(&self, encoding: WeightEncoding) -> Result<Vec<u8>, WeightsError> {
        weights::encode(&self.weights(), encoding, &BTreeMap::new())
    }

    /// Replaces the weights with a safetensors buffer holding exactly this
    /// network's parameters (f32 or bf16, from any device).
    pub fn load_bytes(&mut self, bytes: &[u8]) -> Result<(), WeightsError> {
        self.load_weights(&weights::decode(bytes)?.arrays)
    }

    /// Replaces the weights with `arrays`, which must name every parameter
    /// once with its exact shape.
    pub fn load_weights(&mut self, arrays: &[NamedArray]) -> Result<(), WeightsError> {
        load_vars(&self.vars, arrays)
    }

    /// Encodes `states` with `env` and runs the network on them without
    /// building a graph: the one way sampling and evaluation call the net.
    pub fn infer_states<'a>(
        &self,
        env: &dyn Environment,
        states: impl ExactSizeIterator<Item = &'a State>,
    ) -> PolicyOutput {
        let (rows, dim) = (states.len(), env.state_dim());
        let mut encoded = vec![0f32; rows * dim];
        for (row, state) in encoded.chunks_exact_mut(dim).zip(states) {
            env.encode(state, row);
        }
        self.infer(&encoded, rows)
    }

    /// Forward pass on host-side encodings without building a graph.
    /// `encoded` holds `rows * input_dim` values.
    pub fn infer(&self, encoded: &[f32], rows: usize) -> PolicyOutput {
        let _guard = tch::no_grad_guard();
        let states = Tensor::from_slice(encoded)
            .view([rows as i64, self.net.spec.input_dim as i64])
            .to_device(self.device());
        self.net.forward(&states)
    }
}

/// Where one parameter sits in a flat buffer of all of a network's
/// parameters: elements `offset..offset + numel(shape)`, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParameterSlot {
    /// The `VarStore` name (`hidden0.weight`, ...), as in safetensors.
    pub name: String,
    /// First element in the flat buffer.
    pub offset: i64,
    /// The parameter's shape.
    pub shape: Vec<i64>,
}

impl ParameterSlot {
    /// Number of elements.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// This parameter's elements of `flat` (a host copy of a buffer laid
    /// out like the parameters), as an array named `name`.
    pub fn array(&self, name: String, flat: &[f32]) -> NamedArray {
        let start = self.offset as usize;
        NamedArray {
            name,
            shape: self.shape.iter().map(|&d| d as usize).collect(),
            values: flat[start..start + self.numel() as usize].to_vec(),
        }
    }
}

/// The variables of `vars` sorted by name (so state files are stable), and
/// where each sits when they are laid out one after another.
pub fn parameter_layout(vars: &nn::VarStore) -> (Vec<Tensor>, Vec<ParameterSlot>) {
    let mut variables: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut offset = 0;
    variables
        .into_iter()
        .map(|(name, tensor)| {
            let slot = ParameterSlot {
                name,
                offset,
                shape: tensor.size(),
            };
            offset += tensor.numel() as i64;
            (tensor, slot)
        })
        .unzip()
}

/// A copy of a policy's parameters on its device, taken between two
/// optimizer steps ([`Policy::snapshot`]): one flat f32 buffer and where
/// each parameter sits in it, so taking one is a single device copy and
/// bringing it to the host a single transfer. `Send`, so another thread
/// can bring it to the host.
#[derive(Debug)]
pub struct DeviceSnapshot {
    /// `[N]` f32, every parameter one after another.
    values: Tensor,
    /// Sorted by name; shared by every snapshot of one network.
    slots: Arc<[ParameterSlot]>,
}

impl DeviceSnapshot {
    /// A snapshot of `values`, a flat `[N]` f32 tensor that nothing writes
    /// to any more, laid out as `slots` say.
    pub fn new(values: Tensor, slots: Arc<[ParameterSlot]>) -> Self {
        DeviceSnapshot { values, slots }
    }

    /// Another handle to the same device tensor (no copy). The trainer
    /// never writes a snapshot after taking it, so handles may be read on
    /// any thread.
    pub fn shallow_clone(&self) -> Self {
        DeviceSnapshot {
            values: self.values.shallow_clone(),
            slots: Arc::clone(&self.slots),
        }
    }

    /// Copies the parameters to the host as f32 arrays, sorted by name.
    pub fn to_host(&self) -> Vec<NamedArray> {
        let values = to_host_f32(&self.values);
        self.slots
            .iter()
            .map(|slot| slot.array(slot.name.clone(), &values))
            .collect()
    }

    /// Encodes the parameters as safetensors.
    pub fn encode(
        &self,
        encoding: WeightEncoding,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, WeightsError> {
        weights::encode(&self.to_host(), encoding, metadata)
    }
}

/// Replaces the variables of `vars` with `arrays`, which must name every
/// variable once with its exact shape (a policy's weights, or an
/// objective's own parameters from a checkpoint). Every name and shape is
/// checked before the first copy, so a mismatch leaves the variables as
/// they were. The copies are in place: a variable laid out in a flat
/// buffer by the learner stays there.
pub fn load_vars(vars: &nn::VarStore, arrays: &[NamedArray]) -> Result<(), WeightsError> {
    let mut variables = vars.variables();
    if arrays.len() != variables.len() {
        return Err(WeightsError::Mismatch(format!(
            "{} tensors, the network has {}",
            arrays.len(),
            variables.len()
        )));
    }
    let mut targets = Vec::with_capacity(arrays.len());
    for array in arrays {
        let Some(variable) = variables.remove(&array.name) else {
            return Err(WeightsError::Mismatch(format!(
                "no parameter named `{}` (or named twice)",
                array.name
            )));
        };
        let shape: Vec<usize> = variable.size().iter().map(|&d| d as usize).collect();
        if shape != array.shape || array.values.len() != shape.iter().product::<usize>() {
            return Err(WeightsError::Mismatch(format!(
                "`{}` has shape {:?}, the network's is {shape:?}",
                array.name, array.shape
            )));
        }
        if let Some(index) = array.values.iter().position(|v| !v.is_finite()) {
            return Err(WeightsError::NonFinite {
                name: array.name.clone(),
                index,
                value: array.values[index],
            });
        }
        targets.push((variable, shape));
    }
    let _guard = tch::no_grad_guard();
    for (array, (mut variable, shape)) in arrays.iter().zip(targets) {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let values = Tensor::from_slice(&array.values)
            .view(dims.as_slice())
            .to_device(variable.device());
        variable.copy_(&values);
    }
    Ok(())
}

/// Every variable of `vars` as a host f32 array, sorted by name.
pub fn vars_to_host(vars: &nn::VarStore) -> Vec<NamedArray> {
    let mut arrays: Vec<NamedArray> = vars
        .variables()
        .into_iter()
        .map(|(name, tensor)| NamedArray {
            name,
            shape: tensor.size().iter().map(|&d| d as usize).collect(),
            values: to_host_f32(&tensor),
        })
        .collect();
    arrays.sort_by(|a, b| a.name.cmp(&b.name));
    arrays
}

/// Picks the device a configuration asks for. `Auto` takes CUDA when libtorch
/// sees a GPU, so the same binary runs on GPU machines and on CPU.
pub fn select_device(config: DeviceConfig) -> Result<Device, String> {
    match config {
        DeviceConfig::Cpu => Ok(Device::Cpu),
        DeviceConfig::Auto => Ok(Device::cuda_if_available()),
        DeviceConfig::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceConfig::Cuda => Err("device = \"cuda\" but libtorch sees no CUDA device".to_owned()),
    }
}

/// A device for logs, in the configuration's words (`cpu`; `cuda:0`,
/// `cuda` with the index used): tch's `Debug` gives `Cpu` and `Cuda(0)`.
pub fn device_label(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(index) => format!("cuda:{index}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Sets libtorch's intra-op thread count for this process. Oversubscribed
/// cores make small-matrix work much slower, hence explicit counts.
pub fn set_threads(threads: usize) {
    tch::set_num_threads(threads.max(1) as i32);
}

/// Copies a float tensor of any shape to a host vector in row-major order.
pub fn to_host_f32(tensor: &Tensor) -> Vec<f32> {
    let flat = tensor
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view(-1);
    let len = flat.numel();
    let mut out = vec![0f32; len];
    flat.copy_data(&mut out, len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            input_dim: 5,
            hidden: vec![8, 8],
            forward_actions: 5,
            backward_actions: 4,
        }
    }

    /// Logs name a device as the configuration does.
    #[test]
    fn a_device_is_labelled_as_configured() {
        assert_eq!(device_label(Device::Cpu), "cpu");
        assert_eq!(device_label(Device::Cuda(1)), "cuda:1");
    }

    #[test]
    fn heads_have_the_declared_sizes() {
        let policy = Policy::new(&spec(), Device::Cpu);
        let out = policy.infer(&[0.0; 15], 3);
        assert_eq!(out.forward_logits().size(), [3, 5]);
        assert_eq!(out.backward_logits().size(), [3, 4]);
        assert_eq!(out.log_flow().size(), [3]);
    }

    /// `weights` with 1 added to every value: different weights by
    /// construction (two random policies can come out identical while
    /// another test reseeds torch's generator).
    fn shifted(weights: &[NamedArray]) -> Vec<NamedArray> {
        let mut changed = weights.to_vec();
        for array in &mut changed {
            for value in &mut array.values {
                *value += 1.0;
            }
        }
        changed
    }

    #[test]
    fn weights_round_trip_through_bytes() {
        let mut b = Policy::new(&spec(), Device::Cpu);
        let mut a = Policy::new(&spec(), Device::Cpu);
        a.load_weights(&shifted(&b.weights())).unwrap();
        let x = [0.5f32, -1.0, 2.0, 0.0, 1.0];
        let before = to_host_f32(&b.infer(&x, 1).log_flow());
        b.load_bytes(&a.to_bytes(WeightEncoding::F32).unwrap())
            .unwrap();
        let expected = to_host_f32(&a.infer(&x, 1).forward_logits());
        let got = to_host_f32(&b.infer(&x, 1).forward_logits());
        assert_eq!(expected, got);
        assert_ne!(before, to_host_f32(&b.infer(&x, 1).log_flow()));
    }

    #[test]
    fn bf16_weights_load_within_bf16_precision() {
        let mut b = Policy::new(&spec(), Device::Cpu);
        let mut a = Policy::new(&spec(), Device::Cpu);
        a.load_weights(&shifted(&b.weights())).unwrap();
        let before = b.weights();
        b.load_bytes(&a.to_bytes(WeightEncoding::Bf16).unwrap())
            .unwrap();
        assert_ne!(b.weights(), before, "loaded");
        for (x, y) in a.weights().iter().zip(b.weights()) {
            assert_eq!(x.name, y.name);
            for (u, v) in x.values.iter().zip(&y.values) {
                assert!((u - v).abs() <= u.abs() / 256.0, "{u} vs {v}");
            }
        }
    }

    #[test]
    fn a_snapshot_does_not_follow_later_changes() {
        let mut policy = Policy::new(&spec(), Device::Cpu);
        let snapshot = policy.snapshot();
        let before = policy.weights();
        policy.load_weights(&shifted(&before)).unwrap();
        assert_eq!(snapshot.to_host(), before);
        assert_ne!(policy.weights(), before);
    }

    #[test]
    fn the_counted_size_is_what_the_network_holds_and_encodes() {
        for hidden in [vec![8], vec![16, 4], vec![3, 5, 7]] {
            let mut model = spec();
            model.hidden = hidden;
            let policy = Policy::new(&model, Device::Cpu);
            let held: usize = policy.weights().iter().map(|a| a.values.len()).sum();
            assert_eq!(model.parameter_count(), held as u128);
            for encoding in [WeightEncoding::F32, WeightEncoding::Bf16] {
                // No metadata, and a task description far beyond the
                // header allowance (a custom set task's levels).
                let long = (0..5000).map(|i| format!("{i}.25,")).collect::<String>();
                for metadata in [
                    BTreeMap::new(),
                    BTreeMap::from([
                        ("task".to_owned(), long),
                        ("version".to_owned(), "7".into()),
                    ]),
                ] {
                    let encoded = weights::encode(&policy.weights(), encoding, &metadata)
                        .unwrap()
                        .len() as u128;
                    let bound = model.weight_bytes(encoding, &metadata);
                    let text: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
                    assert!(
                        encoded <= bound && bound <= encoded + 8192 + text as u128,
                        "{encoded} vs {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn weights_of_another_shape_are_refused() {
        let a = Policy::new(&spec(), Device::Cpu);
        let mut other = spec();
        other.hidden = vec![8, 9];
        let mut b = Policy::new(&other, Device::Cpu);
        let error = b
            .load_bytes(&a.to_bytes(WeightEncoding::F32).unwrap())
            .unwrap_err();
        assert!(error.to_string().contains("has shape"), "{error}");
    }

    #[test]
    fn a_refused_load_leaves_every_weight_as_it_was() {
        let mut policy = Policy::new(&spec(), Device::Cpu);
        let before = policy.weights();
        // Every tensor changed, the last one (by name) to a wrong shape.
        let mut wrong = shifted(&before);
        let last = wrong.last_mut().unwrap();
        last.values.push(0.0);
        last.shape = vec![last.values.len()];
        assert!(policy.load_weights(&wrong).is_err());
        assert_eq!(policy.weights(), before);
    }

    #[test]
    fn weights_with_a_nan_or_an_infinity_are_refused_naming_the_tensor() {
        let mut policy = Policy::new(&spec(), Device::Cpu);
        let before = policy.weights();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // Every tensor changed, one element of the last one non-finite:
            // the refusal comes before anything is written.
            let mut wrong = shifted(&before);
            let last = wrong.last_mut().unwrap();
            last.values[3] = bad;
            let name = last.name.clone();
            let bytes = weights::encode(&wrong, WeightEncoding::F32, &BTreeMap::new()).unwrap();
            let error = policy.load_bytes(&bytes).unwrap_err().to_string();
            assert!(
                error.contains(&format!("`{name}`")) && error.contains("element 3"),
                "{error}"
            );
            assert_eq!(policy.weights(), before);
        }
    }
}
