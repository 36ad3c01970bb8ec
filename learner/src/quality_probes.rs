//! Time to quality at a finer grain than the reports.
//!
//! A report evaluates the policy (thousands of samples, and the exact
//! distribution on small tasks), so reports come at most every
//! `learner.first_report_s` of training (0.25 s by default), and a time to
//! quality read off them alone is rounded up to that grain: a run reaching
//! quality after about a second reads 0.75 s or 1.0 s, nothing between.
//! Reporting more often would pause training more often and change what
//! is measured (actors roll out meanwhile, and their data ages).
//!
//! So, until quality is first reached, the trainer keeps a copy of the
//! weights (on the device, no transfer) at evenly spaced moments between
//! two reports: [`PROBES_PER_GAP`] - 1 copies, the next report being the
//! last point. A report below quality forgets them. The first report at
//! quality evaluates them, newest first, and time to quality is the moment
//! of the earliest copy from which every later one is at quality (or of
//! that report, if the newest copy is not). They are
//! evaluated once, off the clock, after the moment they measure. Taking a
//! copy costs a device copy of the weights and, on a GPU, a wait for the
//! steps queued before it (its moment is read after them): small, and on
//! the clock.

use flgfn_common::policy::DeviceSnapshot;
use tch::Tensor;

/// Points per gap between two reports, the later report included: the
/// grain of time to quality is the gap over this (50 ms in the first
/// second of training by default; the gaps grow after). Each costs one
/// device copy of the weights while kept, and at most one evaluation,
/// once, when quality is reached.
pub const PROBES_PER_GAP: u32 = 5;

/// The weights at one moment of training.
#[derive(Debug)]
pub struct Probe {
    /// `wall_s` when the copy was taken.
    pub wall_s: f64,
    /// Training steps done then.
    pub step: u64,
    /// The policy's weights then.
    pub weights: DeviceSnapshot,
    /// The objective's own log Z then, where it has one (TB), on the
    /// device: read only if the copy is evaluated.
    pub learned_log_z: Option<Tensor>,
}

/// The copies kept since the last report, and when the next ones are due.
#[derive(Debug, Default)]
pub struct QualityProbes {
    /// `wall_s` of the copies still to take before the next report,
    /// latest first.
    due: Vec<f64>,
    /// Copies taken since the last report, oldest first.
    taken: Vec<Probe>,
}

impl QualityProbes {
    /// Forgets the copies taken so far and plans the next ones between a
    /// report at `from` and the next one, due at `to` (in `wall_s`).
    pub fn plan(&mut self, from: f64, to: f64) {
        self.taken.clear();
        let step = (to - from) / f64::from(PROBES_PER_GAP);
        self.due = (1..PROBES_PER_GAP)
            .rev()
            .map(|k| from + step * f64::from(k))
            .collect();
    }

    /// Whether a copy is due at `wall`. One copy serves every moment
    /// passed since the last (a step longer than the spacing). Not asked
    /// at a step that reports: the report judges those weights itself.
    pub fn due(&mut self, wall: f64) -> bool {
        let passed = self.due.iter().rev().take_while(|&&at| at <= wall).count();
        self.due.truncate(self.due.len() - passed);
        passed > 0
    }

    /// Keeps a copy taken because [`QualityProbes::due`] said so.
    pub fn keep(&mut self, probe: Probe) {
        self.taken.push(probe);
    }

    /// The earliest copy from which every later one is at quality (its
    /// `wall_s` and step), as the report after them is: asked newest
    /// first, stopping at the first below quality. Taking the first copy
    /// at quality instead would give each copy's evaluation, a fresh
    /// noisy draw near the thresholds, a chance to pass by luck, and bias
    /// time to quality low.
    pub fn earliest_at_quality(
        self,
        mut at_quality: impl FnMut(&Probe) -> bool,
    ) -> Option<(f64, u64)> {
        self.taken
            .into_iter()
            .rev()
            .take_while(|probe| at_quality(probe))
            .last()
            .map(|probe| (probe.wall_s, probe.step))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn probe(wall_s: f64, step: u64) -> Probe {
        Probe {
            wall_s,
            step,
            weights: DeviceSnapshot::new(Tensor::zeros([1], tch::kind::FLOAT_CPU), Arc::new([])),
            learned_log_z: None,
        }
    }

    #[test]
    fn copies_are_due_evenly_between_two_reports_and_late_steps_take_one() {
        let mut probes = QualityProbes::default();
        probes.plan(1.0, 1.5);
        // Due at 1.1, 1.2, 1.3 and 1.4; the report itself is at 1.5.
        assert!(!probes.due(1.05));
        assert!(probes.due(1.1));
        assert!(!probes.due(1.15), "1.1 was taken");
        assert!(probes.due(1.35), "1.2 and 1.3 passed: one copy for both");
        assert!(!probes.due(1.38));
        assert!(probes.due(1.45));
        assert!(!probes.due(1.6), "nothing after the last one before 1.5");
        probes.plan(1.5, 2.0);
        assert!(probes.due(1.61), "planned again after the report");
    }

    /// Copies due just after 0.1, 0.2, 0.3 and 0.4 between reports at 0
    /// and 0.5.
    fn four_copies() -> QualityProbes {
        let mut probes = QualityProbes::default();
        probes.plan(0.0, 0.5);
        for (wall, step) in [(0.15, 10), (0.25, 20), (0.35, 30), (0.45, 40)] {
            assert!(probes.due(wall));
            probes.keep(probe(wall, step));
        }
        probes
    }

    #[test]
    fn quality_is_dated_from_the_copy_after_which_every_one_is_at_quality() {
        let mut asked = Vec::new();
        let earliest = four_copies().earliest_at_quality(|p| {
            asked.push(p.step);
            p.step >= 20
        });
        assert_eq!(earliest, Some((0.25, 20)));
        assert_eq!(asked, [40, 30, 20, 10], "newest first, up to one below");
        // A copy at quality by luck, followed by one below, is not taken.
        let earliest = four_copies().earliest_at_quality(|p| p.step != 20);
        assert_eq!(earliest, Some((0.35, 30)));
        // The newest below quality: the report itself is the first.
        assert_eq!(four_copies().earliest_at_quality(|p| p.step < 40), None);
    }

    #[test]
    fn a_report_below_quality_forgets_the_copies_before_it() {
        let mut probes = QualityProbes::default();
        probes.plan(0.0, 0.5);
        assert!(probes.due(0.1));
        probes.keep(probe(0.1, 10));
        probes.plan(0.5, 1.0);
        assert_eq!(probes.earliest_at_quality(|_| true), None);
    }
}
