//! The watch on the trainer: health NOT_SERVING while one piece of its
//! work (a step, a report, a checkpoint it waits for) has lasted longer
//! than `learner.stuck_after_s`, so that an orchestrator's liveness probe
//! restarts a learner stuck in a device call or on a blocked file system
//! (it resumes from its last checkpoint); SERVING again if it moves on.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::trainer::TrainerPulse;

use super::set_health;

/// How often the pulse is read.
const EVERY: Duration = Duration::from_secs(1);

/// Reads `pulse` every second until the stop (`stop` true or gone); never
/// where `stuck_after` is zero. The end of a run sets health itself: a
/// stop seen here ends the watch before it would say SERVING again.
pub(super) async fn watch_trainer(
    pulse: Arc<TrainerPulse>,
    stuck_after: Duration,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    if stuck_after.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let busy_for = pulse.busy_for();
        match (stuck, busy_for) {
            (false, Some(lasted)) if lasted >= stuck_after => {
                stuck = true;
                warn!(
                    busy_s = lasted.as_secs(),
                    stuck_after_s = stuck_after.as_secs_f64(),
                    "the trainer has been on one step, report or checkpoint for longer than learner.stuck_after_s (a device call or a blocked file system?): health is NOT_SERVING, so that a liveness probe restarts the learner"
                );
                set_health(&health, tonic_health::ServingStatus::NotServing).await;
            }
            (true, busy_for) if busy_for.is_none_or(|lasted| lasted < stuck_after) => {
                if *stop.borrow() {
                    return;
                }
                stuck = false;
                info!("the trainer moved on: health is SERVING again");
                set_health(&health, tonic_health::ServingStatus::Serving).await;
                // A stop sent since the check above may have set NOT_SERVING
                // before this SERVING landed: said again. (One sent after
                // this check sets it itself, after.)
                if *stop.borrow() {
                    set_health(&health, tonic_health::ServingStatus::NotServing).await;
                    return;
                }
            }
            _ => {}
        }
    }
}
