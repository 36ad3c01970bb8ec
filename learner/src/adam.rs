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
//! It runs on [`FlatParameters`]: the whole update is about fifteen
//! libtorch calls however many parameters the network has (an update that
//! would overflow a weight is undone, see [`Adam::propose`]). A
//! parameter that received no gradient in a step counts as a zero
//! gradient (its moments decay); every parameter of flgfn's networks and
//! objectives gets one every step.

use tch::{Kind, Tensor};

use flgfn_common::weights::NamedArray;

use crate::parameters::FlatParameters;

/// PyTorch's defaults.
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// One step's new moments and parameters, from [`Adam::propose`], until
/// [`Adam::apply`] takes or drops them.
#[derive(Debug)]
#[must_use = "a proposed step moves nothing until Adam::apply takes it"]
pub struct ProposedStep {
    m: Tensor,
    v: Tensor,
    values: Tensor,
    /// Whether every proposed parameter is finite: a bool scalar on the
    /// device.
    finite: Tensor,
    /// The optimizer's step count once applied.
    step: u64,
}

impl ProposedStep {
    /// Whether every proposed parameter is finite (a bool scalar on the
    /// device, not read back).
    pub fn finite(&self) -> &Tensor {
        &self.finite
    }
}

/// Adam over every variable of a `VarStore`, laid out flat.
#[derive(Debug)]
pub struct Adam {
    parameters: FlatParameters,
    /// First moments, laid out as the parameters.
    m: Tensor,
    /// Second moments, laid out as the parameters.
    v: Tensor,
    learning_rate: f64,
    /// Steps taken (t in the bias corrections).
    steps: u64,
}

impl Adam {
    /// Adam over `parameters`.
    pub fn new(parameters: FlatParameters, learning_rate: f64) -> Self {
        let m = parameters.values().zeros_like();
        let v = parameters.values().zeros_like();
        Adam {
            parameters,
            m,
            v,
            learning_rate,
            steps: 0,
        }
    }

    /// The parameters it updates (for snapshots).
    pub fn parameters(&self) -> &FlatParameters {
        &self.parameters
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
        self.parameters.zero_grad();
    }

    /// Whether the gradients are safe to step with, as a bool scalar on
    /// the device, without reading it back: a finite loss can still give
    /// infinite or NaN gradients (f32 overflow in backward). One
    /// reduction, the squared norm of the flat gradient buffer: it is
    /// finite only when every element is and every square is (a gradient
    /// of 1e20 is finite, but its square would make the second moment
    /// infinite, and the next step, even a skipped one, inf - inf = NaN),
    /// and a norm beyond 1.8e19 overflowing it is a step to skip too.
    pub fn gradients_finite(&mut self) -> Tensor {
        let _guard = tch::no_grad_guard();
        let gradients = self.parameters.gradients();
        gradients.dot(gradients).isfinite()
    }

    /// One update from the gradients in place.
    pub fn step(&mut self) {
        // Filled on the device: a host scalar copied to a GPU would wait
        // for the work queued before it.
        let skip = Tensor::zeros([], (Kind::Bool, self.m.device()));
        let _ = self.step_unless(&skip);
    }

    /// One update from the gradients in place, unless `skip` (a bool scalar
    /// on the parameters' device) is true, or the update would leave a
    /// parameter non-finite: [`Adam::propose`] then [`Adam::apply`] with
    /// the proposal's own verdict. Returns that verdict (see `propose`).
    pub fn step_unless(&mut self, skip: &Tensor) -> Tensor {
        let proposed = self.propose(skip);
        let finite = proposed.finite.shallow_clone();
        self.apply(proposed, &finite);
        finite
    }

    /// The update of one step, computed out of place and not applied yet,
    /// so that two optimizers that must move together (the policy's and
    /// an objective's own) apply theirs only if both are sound. On a step
    /// `skip` asks to skip (a bool scalar on the parameters' device) the
    /// proposal leaves the parameters and both moments at their exact
    /// values (a NaN or infinite loss gives NaN gradients, and Adam would
    /// carry them, or momentum alone, into the weights). Its
    /// [`ProposedStep::finite`] is false, on the device and without waiting
    /// for it, when the proposed parameters are not all finite (with a huge
    /// learning rate, a finite gradient can still step past f32's range;
    /// weights that overflowed would reach actors and checkpoints); on a
    /// skipped step it is true unless the learning rate itself is beyond
    /// f32's range. The step count (t of the bias corrections) advances
    /// either way once the proposal is applied, taken or not, so
    /// checkpoints stay in step with the trainer; unlike PyTorch's
    /// GradScaler, which leaves t as well. One skipped step
    /// changes the corrections by a fraction of a percent, and only early
    /// on.
    pub fn propose(&mut self, skip: &Tensor) -> ProposedStep {
        let _guard = tch::no_grad_guard();
        // Counted when applied: a proposal that fails half-way (out of
        // memory) leaves the count as it was.
        let step = self.steps.saturating_add(1);
        // Both corrections are exactly 1.0 in f64 long before t leaves
        // i32 (after ~37,000 steps, where 0.999^t falls below 2^-54), so a
        // run past 2^31 steps keeps them there instead of wrapping to a
        // negative power.
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        let step_size = self.learning_rate / (1.0 - BETA1.powi(t));
        let root_correction = (1.0 - BETA2.powi(t)).sqrt();
        let grad = self.parameters.gradients().shallow_clone();
        // Zeroed first: the weights below multiply the gradient by 0 on a
        // skipped step, and 0 x NaN is NaN.
        let _ = grad.shallow_clone().masked_fill_(skip, 0.0);
        let keep = skip.logical_not().to_kind(Kind::Float);
        // Out of place: three passes over the parameters more than an
        // update in place, and, with `apply`, six calls (the check, three
        // selections and the copy back).
        let m = self.m.lerp_tensor(&grad, &(&keep * (1.0 - BETA1)));
        let v = self.v.lerp_tensor(&grad.square(), &(&keep * (1.0 - BETA2)));
        // p + m * keep * -step / (sqrt(v) / c2 + eps).
        let mut scale = v.sqrt();
        let _ = scale
            .g_div_scalar_(root_correction)
            .g_add_scalar_(EPS)
            .reciprocal_()
            .g_mul_(&(keep * -step_size));
        let values = self.parameters.values().addcmul(&m, &scale);
        // (The moments are finite: they mix finite moments with finite
        // gradients and squares, a skipped step's zeroed; the trainer's
        // gradient check bounds the squares.)
        let finite = values.isfinite().all();
        ProposedStep {
            m,
            v,
            values,
            finite,
            step,
        }
    }

    /// Takes `proposed` (from this optimizer's last [`Adam::propose`]) if
    /// `take`, a bool scalar on the device, is true; otherwise the
    /// parameters and moments keep their exact values. Decided on the
    /// device, without waiting for it.
    pub fn apply(&mut self, proposed: ProposedStep, take: &Tensor) {
        let _guard = tch::no_grad_guard();
        // Everything allocated before anything changes: running out of
        // memory here leaves the optimizer as it was.
        let m = proposed.m.where_self(take, &self.m);
        let v = proposed.v.where_self(take, &self.v);
        let values = proposed.values.where_self(take, self.parameters.values());
        self.m = m;
        self.v = v;
        self.parameters.values().shallow_clone().copy_(&values);
        self.steps = proposed.step;
    }

    /// The moments as named host arrays (`m/<param>`, `v/<param>`), for a
    /// checkpoint.
    pub fn state(&self) -> Vec<NamedArray> {
        let mut out = Vec::with_capacity(2 * self.parameters.slots().len());
        let (m, v) = (
            flgfn_common::policy::to_host_f32(&self.m),
            flgfn_common::policy::to_host_f32(&self.v),
        );
        for slot in self.parameters.slots() {
            for (prefix, values) in [("m", &m), ("v", &v)] {
                out.push(slot.array(format!("{prefix}/{}", slot.name), values));
            }
        }
        out
    }

    /// Restores moments saved by [`Adam::state`] and the step count.
    /// `group` is where a checkpoint keeps them (`adam`), for the names
    /// in errors.
    pub fn restore(
        &mut self,
        group: &str,
        arrays: &[NamedArray],
        steps: u64,
    ) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        for slot in self.parameters.slots() {
            for (prefix, moment) in [("m", &self.m), ("v", &self.v)] {
                let name = format!("{prefix}/{}", slot.name);
                let array = arrays.iter().find(|a| a.name == name);
                // (Named as the file names it.)
                let name = format!("{group}/{name}");
                let array = array.ok_or_else(|| format!("optimizer state lacks `{name}`"))?;
                if array.shape.iter().map(|&d| d as i64).collect::<Vec<_>>() != slot.shape {
                    return Err(format!(
                        "optimizer state `{name}` has shape {:?}, the parameter's is {:?}",
                        array.shape, slot.shape
                    ));
                }
                // NaN, infinite or (for v) negative moments would make
                // every step non-finite: each skipped, the run reported
                // as diverged.
                if let Some((index, value)) = array
                    .values
                    .iter()
                    .enumerate()
                    .find(|&(_, &x)| !x.is_finite() || (prefix == "v" && x < 0.0))
                {
                    return Err(format!(
                        "optimizer state `{name}` holds {value} at element {index}, which Adam never writes"
                    ));
                }
                let values = Tensor::from_slice(&array.values)
                    .view(slot.shape.as_slice())
                    .to_kind(Kind::Float)
                    .to_device(moment.device());
                self.parameters.view(moment, slot).copy_(&values);
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;
    use tch::nn::{self, Module, OptimizerConfig};

    use super::*;

    fn net(vars: &nn::VarStore) -> nn::Sequential {
        nn::seq()
            .add(nn::linear(vars.root() / "a", 3, 8, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(vars.root() / "b", 8, 2, Default::default()))
    }

    /// A seeded network and the optimizer of its parameters at `rate`
    /// (the store is returned too: the parameters live in it).
    fn seeded(seed: i64, rate: f64) -> (nn::VarStore, nn::Sequential, Adam) {
        tch::manual_seed(seed);
        let vars = nn::VarStore::new(Device::Cpu);
        let model = net(&vars);
        let adam = Adam::new(FlatParameters::new(&vars).unwrap(), rate);
        (vars, model, adam)
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
        let mut adam = Adam::new(FlatParameters::new(&ours).unwrap(), 0.01);
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

    /// Parameters and both moments, flat, on the host.
    fn snapshot(adam: &Adam) -> [Vec<f32>; 3] {
        [adam.parameters().values(), &adam.m, &adam.v].map(|t| Vec::<f32>::try_from(t).unwrap())
    }

    /// A proposal never applied (the step failed after it) moves nothing,
    /// its step count included; applied, taken or not, it counts.
    #[test]
    fn a_proposal_counts_as_a_step_only_once_applied() {
        let (_vars, model, mut adam) = seeded(6, 0.01);
        adam.zero_grad();
        loss(&model, 0).backward();
        let before = snapshot(&adam);
        let skip_none = Tensor::from(false);
        drop(adam.propose(&skip_none));
        assert_eq!((adam.steps(), snapshot(&adam)), (0, before.clone()));
        let proposed = adam.propose(&skip_none);
        adam.apply(proposed, &Tensor::from(false));
        assert_eq!((adam.steps(), snapshot(&adam)), (1, before.clone()));
        let proposed = adam.propose(&skip_none);
        adam.apply(proposed, &Tensor::from(true));
        assert_eq!(adam.steps(), 2);
        assert_ne!(snapshot(&adam), before);
    }

    #[test]
    fn a_skipped_step_leaves_parameters_and_moments_exactly_alone() {
        let (vars, model, mut adam) = seeded(5, 0.01);
        // Some real steps first, so that the moments are not zero and
        // momentum alone would move the weights.
        for step in 0..5 {
            adam.zero_grad();
            loss(&model, step).backward();
            adam.step();
        }
        let before = snapshot(&adam);

        // A NaN loss: NaN gradients.
        let nan = loss(&model, 5) * f64::NAN;
        adam.zero_grad();
        nan.backward();
        let skip = nan.isfinite().logical_not();
        let _ = adam.step_unless(&skip);
        assert_eq!(snapshot(&adam), before);

        // A finite loss whose gradients are not (found by the gradient
        // check), and a finite gradient whose square is not (the second
        // moment would turn infinite, and the next step NaN): skipped.
        for element in [f64::INFINITY, 1e20] {
            let finite = loss(&model, 6);
            adam.zero_grad();
            finite.backward();
            // The gradients live in the flat buffer by now: set one
            // element there.
            let _ = vars.trainable_variables()[0]
                .grad()
                .view(-1)
                .narrow(0, 3, 1)
                .fill_(element);
            assert!(bool::try_from(finite.isfinite()).unwrap());
            assert!(
                !bool::try_from(adam.gradients_finite()).unwrap(),
                "{element}"
            );
            let skip = adam.gradients_finite().logical_not();
            let _ = adam.step_unless(&skip);
            assert_eq!(snapshot(&adam), before, "{element}");
        }

        // A finite step moves the weights.
        let finite = loss(&model, 7);
        adam.zero_grad();
        finite.backward();
        assert!(bool::try_from(adam.gradients_finite()).unwrap());
        let skip = adam.gradients_finite().logical_not();
        let _ = adam.step_unless(&skip);
        assert_ne!(snapshot(&adam)[0], before[0]);
    }

    #[test]
    fn a_step_that_would_overflow_the_weights_is_skipped() {
        // A finite step (1e38 at most, times 0.1 on the first) onto weights
        // near f32::MAX, gradients -1: 3.35e38 + 1e37 is past f32's range.
        let (_vars, model, mut adam) = seeded(3, 1e37);
        adam.zero_grad();
        loss(&model, 0).backward();
        let _ = adam.parameters.values().shallow_clone().fill_(3.35e38);
        let _ = adam.parameters.gradients().shallow_clone().fill_(-1.0);
        assert!(bool::try_from(adam.gradients_finite()).unwrap());
        let before = snapshot(&adam);
        let finite = adam.step_unless(&Tensor::from(false));
        assert!(!bool::try_from(&finite).unwrap(), "undone");
        assert_eq!(snapshot(&adam), before, "weights and moments untouched");
        // The same gradients at a sane rate: taken (the moments move; a
        // step of 0.01 is below the weights' precision there).
        adam.set_lr(0.01);
        let finite = adam.step_unless(&Tensor::from(false));
        assert!(bool::try_from(&finite).unwrap());
        assert_ne!(snapshot(&adam)[1], before[1]);
        assert!(snapshot(&adam).iter().flatten().all(|x| x.is_finite()));
    }

    #[test]
    fn restored_state_continues_exactly() {
        tch::manual_seed(2);
        let a = nn::VarStore::new(Device::Cpu);
        let model_a = net(&a);
        let mut adam_a = Adam::new(FlatParameters::new(&a).unwrap(), 0.02);
        for step in 0..10 {
            adam_a.zero_grad();
            loss(&model_a, step).backward();
            adam_a.step();
        }
        // A second model restored from the first's weights and state.
        let mut b = nn::VarStore::new(Device::Cpu);
        let model_b = net(&b);
        b.copy(&a).unwrap();
        let mut adam_b = Adam::new(FlatParameters::new(&b).unwrap(), 0.02);
        adam_b
            .restore("adam", &adam_a.state(), adam_a.steps())
            .unwrap();
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
        assert!(
            adam_b
                .restore("adam", &wrong, 3)
                .unwrap_err()
                .contains("shape")
        );
        let mut missing = adam_a.state();
        let gone = missing.remove(1).name;
        let error = adam_b.restore("objective_adam", &missing, 3).unwrap_err();
        assert!(
            error.contains(&format!("lacks `objective_adam/{gone}`")),
            "{error}"
        );
        // Moments Adam never writes, named.
        for (prefix, value) in [("m", f32::NAN), ("v", f32::INFINITY), ("v", -1e-3)] {
            let mut wrong = adam_a.state();
            let moment = wrong
                .iter_mut()
                .find(|a| a.name.starts_with(&format!("{prefix}/")))
                .unwrap();
            moment.values[2] = value;
            let name = moment.name.clone();
            let error = adam_b.restore("adam", &wrong, 3).unwrap_err();
            assert!(
                error.contains(&format!("`adam/{name}`")) && error.contains("element 2"),
                "{error}"
            );
        }
    }

    /// Past 2^31 steps, t of the bias corrections would wrap to a negative
    /// power (infinite corrections, every step NaN and skipped).
    #[test]
    fn steps_past_i32_keep_their_bias_corrections_at_one() {
        let (_vars, model, mut adam) = seeded(4, 0.01);
        let moments = adam.state();
        adam.restore("adam", &moments, 1 << 31).unwrap();
        adam.zero_grad();
        loss(&model, 0).backward();
        let before = snapshot(&adam);
        let finite = adam.step_unless(&Tensor::from(false));
        assert!(bool::try_from(&finite).unwrap());
        let after = snapshot(&adam);
        assert_ne!(after[0], before[0]);
        assert!(after.iter().flatten().all(|x| x.is_finite()));
        assert_eq!(adam.steps(), (1 << 31) + 1);
    }
}
