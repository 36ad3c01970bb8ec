//! The trainer's parameters laid out in one flat buffer, their gradients
//! in another.
//!
//! libtorch spends a few microseconds on every call whatever its size (on
//! a GPU, a kernel launch), and the per-step work on parameters is one
//! call per parameter per operation: zeroing the gradients, the eight
//! operations of an Adam update, the copy for the publisher. With every
//! parameter a view into one buffer (`set_data`, as `param.data = ...` in
//! PyTorch: they stay leaves that require grad, and `VarStore` and the
//! layers keep using them unchanged) and every gradient a view into
//! another (autograd accumulates into a defined gradient in place), each
//! of those is one call for the whole network.
//!
//! Gradients are bound lazily: autograd creates them at the first
//! backward pass, and [`FlatParameters::gradients`] copies any it finds
//! unbound into the flat buffer and re-points them there. A parameter that
//! received no gradient counts as a zero gradient.

use std::sync::Arc;

use tch::{Kind, Tensor, nn};

use flgfn_common::policy::{DeviceSnapshot, ParameterSlot, parameter_layout};

/// Every variable of a `VarStore`, laid out flat.
#[derive(Debug)]
pub struct FlatParameters {
    /// `[N]` f32: every parameter is a view into it.
    values: Tensor,
    /// `[N]` f32: every parameter's gradient, once bound, is a view into it.
    grads: Tensor,
    /// Sorted by name (stable state files); shared with every snapshot.
    slots: Arc<[ParameterSlot]>,
    /// The variables, in the order of `slots`.
    variables: Vec<Tensor>,
    /// Each variable's part of `grads`, made once (a view costs a
    /// dispatch; these are checked every step).
    grad_views: Vec<Tensor>,
    /// Where each variable's values start in `values`: a variable moved
    /// out (another `set_data`, a `VarStore::set_kind`) would no longer be
    /// trained, so debug builds check it every step.
    value_addresses: Vec<usize>,
    /// Whether this pass's gradients were bound already: a step asks for
    /// them twice (the finiteness check, then the update), and binding
    /// walks every variable. Cleared by `zero_grad`, which starts a pass.
    bound_this_pass: bool,
}

impl FlatParameters {
    /// Moves the variables of `vars` into one buffer on their
    /// device. They must all be f32 on one device, as the networks and
    /// objectives of flgfn are.
    pub fn new(vars: &nn::VarStore) -> Result<Self, String> {
        let _guard = tch::no_grad_guard();
        let (variables, slots) = parameter_layout(vars);
        let device = vars.device();
        for (tensor, slot) in variables.iter().zip(&slots) {
            if tensor.kind() != Kind::Float || tensor.device() != device {
                return Err(format!(
                    "parameter `{}` is {:?} on {:?}; flat parameters need f32 on {device:?}",
                    slot.name,
                    tensor.kind(),
                    tensor.device()
                ));
            }
        }
        let total = slots.last().map_or(0, |slot| slot.offset + slot.numel());
        let values = Tensor::zeros([total], (Kind::Float, device));
        let grads = Tensor::zeros([total], (Kind::Float, device));
        let mut handles = Vec::with_capacity(variables.len());
        for (slot, mut variable) in slots.iter().zip(variables) {
            let mut view = slice(&values, slot);
            view.copy_(&variable.detach());
            variable.set_data(&view);
            handles.push(variable);
        }
        let grad_views = slots.iter().map(|slot| slice(&grads, slot)).collect();
        let value_addresses = handles.iter().map(|v| v.data_ptr() as usize).collect();
        Ok(FlatParameters {
            values,
            grads,
            slots: slots.into(),
            variables: handles,
            grad_views,
            value_addresses,
            bound_this_pass: false,
        })
    }

    /// Where each parameter sits, sorted by name.
    pub fn slots(&self) -> &[ParameterSlot] {
        &self.slots
    }

    /// `[N]`: every parameter's values. Writing to it writes the network.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// `[N]`: the gradients of the backward pass since `zero_grad`,
    /// binding any new ones first (copied in, then re-pointed so that the
    /// next passes accumulate here directly). The first call of a pass
    /// binds; later ones in the same pass return the buffer as it is, so a
    /// second backward pass needs a `zero_grad` before it (the trainer
    /// runs one per step).
    pub fn gradients(&mut self) -> &Tensor {
        if self.bound_this_pass {
            return &self.grads;
        }
        let _guard = tch::no_grad_guard();
        debug_assert!(
            self.variables
                .iter()
                .zip(&self.value_addresses)
                .all(|(variable, &address)| variable.data_ptr() as usize == address),
            "a parameter was moved out of the flat buffer"
        );
        for (variable, view) in self.variables.iter().zip(&mut self.grad_views) {
            let mut grad = variable.grad();
            if !grad.defined() {
                // None this pass: zero, the same as an untouched parameter's.
                let _ = view.zero_();
            } else if grad.data_ptr() != view.data_ptr() {
                view.copy_(&grad);
                grad.set_data(view);
            }
        }
        self.bound_this_pass = true;
        &self.grads
    }

    /// Zeroes every gradient, starting a pass: one call once they are
    /// bound.
    pub fn zero_grad(&mut self) {
        self.bound_this_pass = false;
        let _ = self.grads.zero_();
        for (variable, view) in self.variables.iter().zip(&self.grad_views) {
            let mut grad = variable.grad();
            if grad.defined() && grad.data_ptr() != view.data_ptr() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// A copy of the parameters on their device, for the publisher: one
    /// device copy, no transfer.
    pub fn snapshot(&self) -> DeviceSnapshot {
        let _guard = tch::no_grad_guard();
        DeviceSnapshot::new(self.values.copy(), Arc::clone(&self.slots))
    }

    /// Parameter `slot`'s elements of a flat `[N]` tensor (values, grads,
    /// or an optimizer moment laid out the same way), in its shape.
    pub fn view(&self, flat: &Tensor, slot: &ParameterSlot) -> Tensor {
        slice(flat, slot)
    }
}

/// `slot`'s elements of `flat`, shaped as the parameter (a view).
fn slice(flat: &Tensor, slot: &ParameterSlot) -> Tensor {
    flat.narrow(0, slot.offset, slot.numel())
        .view(slot.shape.as_slice())
}

#[cfg(test)]
mod tests {
    use tch::Device;
    use tch::nn::Module;

    use super::*;

    fn net(vars: &nn::VarStore) -> nn::Sequential {
        nn::seq()
            .add(nn::linear(vars.root() / "a", 3, 4, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(vars.root() / "b", 4, 2, Default::default()))
    }

    fn host(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn variables_live_in_the_buffer_and_keep_their_values() {
        tch::manual_seed(3);
        let vars = nn::VarStore::new(Device::Cpu);
        let model = net(&vars);
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let before = host(&model.forward(&x));
        let names_before: Vec<_> = {
            let mut v: Vec<_> = vars.variables().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.into_iter().map(|(n, t)| (n, host(&t))).collect()
        };
        let flat = FlatParameters::new(&vars).unwrap();
        assert_eq!(host(&model.forward(&x)), before);
        let mut concatenated = Vec::new();
        for (name, values) in &names_before {
            assert!(flat.slots().iter().any(|s| &s.name == name));
            concatenated.extend_from_slice(values);
        }
        assert_eq!(host(flat.values()), concatenated);
        // Writing the buffer writes the network, and the reverse.
        let _ = flat.values().shallow_clone().fill_(0.5);
        for (_, t) in vars.variables() {
            assert!(host(&t).iter().all(|&v| v == 0.5));
        }
        let _guard = tch::no_grad_guard();
        let _ = vars.variables()["b.bias"].shallow_clone().fill_(-1.0);
        let slot = flat.slots().iter().find(|s| s.name == "b.bias").unwrap();
        assert_eq!(host(&flat.view(flat.values(), slot)), [-1.0, -1.0]);
    }

    #[test]
    fn gradients_accumulate_in_the_buffer_after_binding() {
        tch::manual_seed(4);
        let vars = nn::VarStore::new(Device::Cpu);
        let model = net(&vars);
        let mut flat = FlatParameters::new(&vars).unwrap();
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let loss = || model.forward(&x).square().sum(Kind::Float);
        loss().backward();
        let expected: Vec<f32> = flat
            .slots()
            .iter()
            .flat_map(|s| host(&vars.variables()[&s.name].grad()))
            .collect();
        assert_eq!(host(flat.gradients()), expected);
        // Bound: the next passes write the buffer directly.
        flat.zero_grad();
        loss().backward();
        loss().backward();
        let doubled: Vec<f32> = expected.iter().map(|g| 2.0 * g).collect();
        let direct = host(&flat.grads);
        for (a, b) in direct.iter().zip(&doubled) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        flat.zero_grad();
        assert!(host(&flat.grads).iter().all(|&g| g == 0.0));
        for (_, t) in vars.variables() {
            assert!(host(&t.grad()).iter().all(|&g| g == 0.0));
        }
    }

    #[test]
    fn a_snapshot_is_a_copy_with_the_layout() {
        let vars = nn::VarStore::new(Device::Cpu);
        let _model = net(&vars);
        let flat = FlatParameters::new(&vars).unwrap();
        let snapshot = flat.snapshot();
        let before = snapshot.to_host();
        let _ = flat.values().shallow_clone().fill_(7.0);
        assert_eq!(snapshot.to_host(), before);
        assert_eq!(before.len(), 4);
        assert_eq!(before[0].name, "a.bias");
        assert_eq!(before[1].shape, [4, 3]);
    }
}
