//! Weight broadcast: the trainer serialises each version once; every
//! subscriber shares the same bytes.
//!
//! A `watch` channel holds only the latest snapshot, so a slow subscriber
//! skips versions instead of queueing them, and memory does not grow with
//! the number of actors.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

/// One published version of the weights.
#[derive(Debug, Clone, Default)]
pub struct WeightsSnapshot {
    /// Training step at which these weights were published (0: initial).
    /// Lag is measured in these units.
    pub version: u64,
    /// `VarStore` bytes, shared by every subscriber without copying.
    pub bytes: Bytes,
    /// True for the last snapshot of the run.
    pub training_done: bool,
}

/// The trainer's end of the broadcast.
#[derive(Debug)]
pub struct Publisher {
    sender: watch::Sender<Arc<WeightsSnapshot>>,
}

impl Publisher {
    /// Starts a broadcast with the initial weights as version 0.
    pub fn new(initial: Bytes) -> (Self, watch::Receiver<Arc<WeightsSnapshot>>) {
        let (sender, receiver) = watch::channel(Arc::new(WeightsSnapshot {
            version: 0,
            bytes: initial,
            training_done: false,
        }));
        (Publisher { sender }, receiver)
    }

    /// Makes `snapshot` the latest version.
    pub fn publish(&self, snapshot: WeightsSnapshot) {
        // send_replace never fails, even with no subscriber connected.
        self.sender.send_replace(Arc::new(snapshot));
    }

    /// The latest published version.
    pub fn latest(&self) -> Arc<WeightsSnapshot> {
        self.sender.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_shares_the_bytes_serialised_once() {
        let (publisher, first) = Publisher::new(Bytes::from_static(b"v0"));
        let second = first.clone();
        publisher.publish(WeightsSnapshot {
            version: 7,
            bytes: Bytes::from(vec![1u8; 1024]),
            training_done: false,
        });
        let (a, b) = (first.borrow().clone(), second.borrow().clone());
        assert_eq!(a.version, 7);
        // Not equal copies: the very same buffer.
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.bytes.as_ptr(), b.bytes.as_ptr());
        assert_eq!(publisher.latest().bytes.as_ptr(), a.bytes.as_ptr());
    }
}
