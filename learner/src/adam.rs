//! Adam whose state the learner owns, so that checkpoints can save it and a
//! resumed run continues exactly where it stopped (tch's optimizer keeps
//! its moments inside libtorch, out of reach).
//!
//! The update is PyTorch's `torch.optim.Adam` without weight decay or
//! AMSGrad: for each parameter p with gradient g, at step t,
//!
//! ```text
//! m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
//! p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! A parameter with no gradient this step (e.g. the P_B head under a
//! uniform backward policy is used but gets zeros; a variable never
//! touched gets none) is left alone.

use tch::{Kind, Tensor, nn};

use flgfn_common::weights::NamedArray;

/// PyTorch's defaults.
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// One parameter and its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    m: Tensor,
    v: Tensor,
}

/// Adam over every trainable variable of a `VarStore`.
#[derive(Debug)]
pub struct Adam {
    slots: Vec<Slot>,
    learning_rate: f64,
    /// Steps taken (t in the bias corrections).
    steps: u64,
}

impl Adam {
    /// Adam over `vars` (sorted by name, so state files are stable).
    pub fn new(vars: &nn::VarStore, learning_rate: f64) -> Self {
        let mut variables: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = variables
            .into_iter()
            .map(|(name, param)| Slot {
                m: param.zeros_like().detach(),
                v: param.zeros_like().detach(),
                name,
                param,
            })
            .collect();
        Adam {
            slots,
            learning_rate,
            steps: 0,
        }
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, learning_rate: f64) {
        self.learning_rate = learning_rate;
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            let mut grad = slot.param.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// One update from the gradients in place.
    pub fn step(&mut self) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        let step_size = self.learning_rate / (1.0 - BETA1.powi(t));
        let root_correction = (1.0 - BETA2.powi(t)).sqrt();
        for slot in &mut self.slots {
            let grad = slot.param.grad();
            if !grad.defined() {
                continue;
            }
            let _ = slot.m.lerp_(&grad, 1.0 - BETA1);
            let _ = slot.v.lerp_(&grad.square(), 1.0 - BETA2);
            // p += m / (-(sqrt(v) / c2 + eps) / step): the step size folded
            // into the denominator, two temporaries per parameter in all.
            let mut denom = slot.v.sqrt();
            let _ = denom
                .g_div_scalar_(root_correction)
                .g_add_scalar_(EPS)
                .g_div_scalar_(-step_size);
            let _ = slot.param.addcdiv_(&slot.m, &denom);
        }
    }

    /// The moments as named host arrays (`m/<param>`, `v/<param>`), for a
    /// checkpoint.
    pub fn state(&self) -> Vec<NamedArray> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for slot in &self.slots {
            for (prefix, tensor) in [("m", &slot.m), ("v", &slot.v)] {
                out.push(NamedArray {
                    name: format!("{prefix}/{}", slot.name),
                    shape: tensor.size().iter().map(|&d| d as usize).collect(),
                    values: flgfn_common::policy::to_host_f32(tensor),
                });
            }
        }
        out
    }

    /// Restores moments saved by [`Adam::state`] and the step count.
    pub fn restore(&mut self, arrays: &[NamedArray], steps: u64) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        for slot in &mut self.slots {
            for (prefix, target) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let name = format!("{prefix}/{}", slot.name);
                let array = arrays
                    .iter()
                    .find(|a| a.name == name)
                    .ok_or_else(|| format!("optimizer state lacks `{name}`"))?;
                let shape: Vec<i64> = target.size();
                if array.shape.iter().map(|&d| d as i64).collect::<Vec<_>>() != shape {
                    return Err(format!(
                        "optimizer state `{name}` has shape {:?}, the parameter's is {shape:?}",
                        array.shape
                    ));
                }
                let values = Tensor::from_slice(&array.values)
                    .view(shape.as_slice())
                    .to_kind(Kind::Float)
                    .to_device(target.device());
                target.copy_(&values);
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::nn::OptimizerConfig;
    use tch::{Device, nn::Module};

    use super::*;

    fn net(vars: &nn::VarStore) -> nn::Sequential {
        nn::seq()
            .add(nn::linear(vars.root() / "a", 3, 8, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(vars.root() / "b", 8, 2, Default::default()))
    }

    fn loss(model: &nn::Sequential, step: i64) -> Tensor {
        let x = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([4, 3]) / (step + 3) as f64;
        model.forward(&x).square().sum(Kind::Float)
    }

    #[test]
    fn matches_libtorch_adam_step_for_step() {
        tch::manual_seed(1);
        let ours = nn::VarStore::new(Device::Cpu);
        let model_ours = net(&ours);
        let mut theirs = nn::VarStore::new(Device::Cpu);
        let model_theirs = net(&theirs);
        theirs.copy(&ours).unwrap();
        let mut adam = Adam::new(&ours, 0.01);
        let mut reference = nn::Adam::default().build(&theirs, 0.01).unwrap();
        for step in 0..50 {
            if step == 25 {
                adam.set_lr(0.003);
                reference.set_lr(0.003);
            }
            adam.zero_grad();
            loss(&model_ours, step).backward();
            adam.step();
            reference.backward_step(&loss(&model_theirs, step));
        }
        for (name, a) in ours.variables() {
            let b = &theirs.variables()[&name];
            let diff = (&a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name}: {diff}");
        }
    }

    #[test]
    fn restored_state_continues_exactly() {
        tch::manual_seed(2);
        let a = nn::VarStore::new(Device::Cpu);
        let model_a = net(&a);
        let mut adam_a = Adam::new(&a, 0.02);
        for step in 0..10 {
            adam_a.zero_grad();
            loss(&model_a, step).backward();
            adam_a.step();
        }
        // A second model restored from the first's weights and state.
        let mut b = nn::VarStore::new(Device::Cpu);
        let model_b = net(&b);
        b.copy(&a).unwrap();
        let mut adam_b = Adam::new(&b, 0.02);
        adam_b.restore(&adam_a.state(), adam_a.steps()).unwrap();
        for step in 10..20 {
            for (adam, model) in [(&mut adam_a, &model_a), (&mut adam_b, &model_b)] {
                adam.zero_grad();
                loss(model, step).backward();
                adam.step();
            }
        }
        for (name, x) in a.variables() {
            let y = &b.variables()[&name];
            assert_eq!(
                Vec::<f32>::try_from(x.flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(),
                "{name}"
            );
        }
        let mut wrong = adam_a.state();
        wrong[0].shape = vec![1];
        assert!(adam_b.restore(&wrong, 3).unwrap_err().contains("shape"));
    }
}
