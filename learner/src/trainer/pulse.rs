//! The trainer's pulse: when its current piece of work began, read by
//! the run's watch (`run/watch.rs`), which turns health NOT_SERVING when
//! one piece lasts longer than `learner.stuck_after_s`. The process
//! answers health checks from its async threads whatever the trainer
//! thread does, so a trainer stuck in a device call or on a blocked file
//! system would otherwise pass every liveness probe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `busy_since_ms` while the trainer waits for data (or has not begun).
const IDLE: u64 = u64::MAX;

/// When the trainer's current piece of work began: a step and what
/// follows it (a report with its evaluation, a checkpoint it waits for),
/// or the run's end. Waiting for data is not work.
#[derive(Debug)]
pub struct TrainerPulse {
    origin: Instant,
    /// Milliseconds from `origin` to the start of the work under way;
    /// [`IDLE`] while waiting.
    busy_since_ms: AtomicU64,
}

impl Default for TrainerPulse {
    fn default() -> Self {
        TrainerPulse {
            origin: Instant::now(),
            busy_since_ms: AtomicU64::new(IDLE),
        }
    }
}

impl TrainerPulse {
    /// The trainer begins a piece of work.
    pub fn busy(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(IDLE - 1);
        self.busy_since_ms.store(now, Ordering::Release);
    }

    /// The trainer waits for data.
    pub fn idle(&self) {
        self.busy_since_ms.store(IDLE, Ordering::Release);
    }

    /// How long the work under way has lasted; None while waiting.
    pub fn busy_for(&self) -> Option<Duration> {
        match self.busy_since_ms.load(Ordering::Acquire) {
            IDLE => None,
            since => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_timed_from_its_start_and_waiting_is_not() {
        let pulse = TrainerPulse::default();
        assert_eq!(pulse.busy_for(), None);
        pulse.busy();
        std::thread::sleep(Duration::from_millis(100));
        let lasted = pulse.busy_for().unwrap();
        assert!(lasted >= Duration::from_millis(95), "{lasted:?}");
        pulse.idle();
        assert_eq!(pulse.busy_for(), None);
        // A new piece of work starts its own clock.
        pulse.busy();
        assert!(pulse.busy_for().unwrap() < lasted);
    }
}
