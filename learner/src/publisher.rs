//! Weight versions: published by the trainer as a device-side copy,
//! serialised lazily, once, and only when an actor is about to use them.
//!
//! The trainer's part is cheap: [`Publisher::publish`] stores a
//! [`DeviceSnapshot`] (a copy of the parameters on the training device) and
//! bumps the version number. Nothing is brought to the host or encoded on
//! the trainer thread. When a session grants a credit to an actor whose
//! weights are old, it asks [`Publisher::latest`]: the newest snapshot is
//! encoded as safetensors on the blocking pool, cached, and the same
//! `Bytes` go to every actor that needs that version. Versions nobody asks
//! for are never serialised.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use flgfn_common::policy::DeviceSnapshot;
use flgfn_common::weights::{WeightEncoding, WeightsError};
use tokio::sync::watch;

/// One version of the weights, encoded.
#[derive(Debug, Clone, Default)]
pub struct EncodedWeights {
    /// The number these weights were published under: the training step,
    /// plus an offset after a resume (versions continue above every one
    /// published before). Lag is measured in these units.
    pub version: u64,
    /// safetensors bytes, shared by every session without copying.
    pub bytes: Bytes,
    /// When the trainer published it.
    pub published_at: Option<Instant>,
}

/// The newest version as the trainer left it.
struct Pending {
    version: u64,
    snapshot: DeviceSnapshot,
    published_at: Instant,
}

/// Shared by the trainer (which publishes) and the sessions (which read).
pub struct Publisher {
    encoding: WeightEncoding,
    /// Written into every buffer's metadata (model shape, task).
    metadata: BTreeMap<String, String>,
    /// The newest version, on the training device.
    pending: Mutex<Pending>,
    /// Its number, readable without the lock.
    latest_version: AtomicU64,
    /// The newest encoded version; also serialises encoders, so a version
    /// is encoded at most once.
    encoded: Mutex<Arc<EncodedWeights>>,
    /// Taken before an encoder is sent to the blocking pool: sessions
    /// that want the version being encoded wait here, on the async side,
    /// instead of each holding a blocking thread (the pool is sized for
    /// validation plus one encoder). Held by the encoder itself, so that a
    /// session that stops waiting for it (a grant given up on) does not
    /// let the next one block an async worker on `encoded`.
    encoder_turn: Arc<tokio::sync::Mutex<()>>,
    /// Versions encoded so far, for reports.
    encodings: AtomicU64,
    /// Turns true with the final version: sessions tell their actors.
    done: watch::Sender<bool>,
    /// Set before `done` where training reached `max_steps`: the run is
    /// over even if a stop for a restart came meanwhile (during the last
    /// step's evaluation or final checkpoint), and actors told to
    /// reconnect would wait for a learner with nothing left to train.
    reached_max_steps: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("encoding", &self.encoding)
            .field("latest_version", &self.latest_version())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Starts with `initial` as version 0.
    pub fn new(
        initial: DeviceSnapshot,
        encoding: WeightEncoding,
        metadata: BTreeMap<String, String>,
    ) -> Arc<Self> {
        Self::starting_at(0, initial, encoding, metadata)
    }

    /// Starts with `initial` as `version` (a resumed run continues its
    /// versions: they never go backwards).
    pub fn starting_at(
        version: u64,
        initial: DeviceSnapshot,
        encoding: WeightEncoding,
        metadata: BTreeMap<String, String>,
    ) -> Arc<Self> {
        Arc::new(Publisher {
            encoding,
            metadata,
            pending: Mutex::new(Pending {
                version,
                snapshot: initial,
                published_at: Instant::now(),
            }),
            latest_version: AtomicU64::new(version),
            encoder_turn: Arc::new(tokio::sync::Mutex::new(())),
            encoded: Mutex::new(Arc::new(EncodedWeights {
                version: u64::MAX,
                bytes: Bytes::new(),
                published_at: None,
            })),
            encodings: AtomicU64::new(0),
            done: watch::channel(false).0,
            reached_max_steps: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes `snapshot` the newest version. Cheap: no host copy, no
    /// encoding; the previous snapshot is freed.
    pub fn publish(&self, version: u64, snapshot: DeviceSnapshot) {
        let previous = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.version = version;
            pending.published_at = Instant::now();
            std::mem::replace(&mut pending.snapshot, snapshot)
        };
        self.latest_version.store(version, Ordering::Release);
        drop(previous);
    }

    /// Tells every session that training is over: called once the run's
    /// end is saved (its final checkpoint written), never before. An actor
    /// told it stops for good (compose restarts only a failed one), and a
    /// learner that then failed to save would resume, from an earlier
    /// checkpoint, to no actors.
    /// `reached_max_steps`: training ended at its last step, not at a
    /// stop.
    pub fn finish(&self, reached_max_steps: bool) {
        self.reached_max_steps
            .store(reached_max_steps, Ordering::Release);
        self.done.send_replace(true);
    }

    /// Whether training ended at `max_steps` (known once `done`).
    pub fn reached_max_steps(&self) -> bool {
        self.reached_max_steps.load(Ordering::Acquire)
    }

    /// The newest version number.
    pub fn latest_version(&self) -> u64 {
        self.latest_version.load(Ordering::Acquire)
    }

    /// Resolves once training is over.
    pub fn done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    /// Versions encoded so far.
    pub fn encodings(&self) -> u64 {
        self.encodings.load(Ordering::Relaxed)
    }

    /// The newest version, encoded (on the blocking pool if it is not
    /// yet); or, if another session encoded one while this one waited its
    /// turn, that one when it is at least version `least`. Otherwise, once
    /// the trainer publishes faster than a version encodes, every waiting
    /// session would encode again in turn (the one before it finished an
    /// already outdated version), one after another.
    pub async fn latest(self: &Arc<Self>, least: u64) -> Result<Arc<EncodedWeights>, WeightsError> {
        let encodings_before = self.encodings();
        // Never waits for the `encoded` lock here (this runs on an async
        // worker, and an encoder holds it while it works).
        // (An encoder that panicked leaves the lock poisoned, and what it
        // holds as it was: still the newest encoded.)
        let ready = match self.encoded.try_lock() {
            Ok(encoded) => Some(encoded.clone()),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner().clone()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(encoded) = ready
            && encoded.version == self.latest_version()
        {
            return Ok(encoded);
        }
        let turn = self.encoder_turn.clone().lock_owned().await;
        // Encoders hold the turn: with it, the lock is only ever held for
        // a moment.
        let encoded = self
            .encoded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let encoded_meanwhile = self.encodings() != encodings_before;
        // u64::MAX marks "none yet".
        if encoded.version != u64::MAX
            && (encoded.version == self.latest_version()
                || encoded_meanwhile && encoded.version >= least)
        {
            return Ok(encoded);
        }
        let publisher = self.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            publisher.encode_latest()
        })
        .await
        .unwrap_or_else(|join| Err(WeightsError::Format(format!("encoder task: {join}"))))
    }

    /// Encodes the newest version unless it already is; blocking.
    fn encode_latest(&self) -> Result<Arc<EncodedWeights>, WeightsError> {
        let mut encoded = self.encoded.lock().unwrap_or_else(PoisonError::into_inner);
        let (version, snapshot, published_at) = {
            let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            (
                pending.version,
                pending.snapshot.shallow_clone(),
                pending.published_at,
            )
        };
        if encoded.version == version {
            return Ok(encoded.clone());
        }
        let bytes = snapshot.encode(self.encoding, &self.metadata_of(version))?;
        *encoded = Arc::new(EncodedWeights {
            version,
            bytes: Bytes::from(bytes),
            published_at: Some(published_at),
        });
        self.encodings.fetch_add(1, Ordering::Relaxed);
        Ok(encoded.clone())
    }

    /// The newest version in `encoding` (the run's final weights are kept
    /// in f32 whatever actors receive), with the same metadata; blocking,
    /// and not kept.
    pub fn encode_newest_as(&self, encoding: WeightEncoding) -> Result<Vec<u8>, WeightsError> {
        let (version, snapshot) = {
            let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            (pending.version, pending.snapshot.shallow_clone())
        };
        snapshot.encode(encoding, &self.metadata_of(version))
    }

    /// What every encoded version carries: task, model and its number.
    fn metadata_of(&self, version: u64) -> BTreeMap<String, String> {
        let mut metadata = self.metadata.clone();
        metadata.insert("version".to_owned(), version.to_string());
        metadata
    }
}

#[cfg(test)]
mod tests {
    use flgfn_common::policy::{ModelSpec, Policy};
    use tch::Device;

    use super::*;

    fn policy() -> Policy {
        let spec = ModelSpec {
            input_dim: 3,
            hidden: vec![4],
            forward_actions: 2,
            backward_actions: 2,
        };
        Policy::new(&spec, Device::Cpu)
    }

    #[tokio::test]
    async fn versions_are_encoded_lazily_once_and_shared() {
        let policy = policy();
        let publisher = Publisher::new(policy.snapshot(), WeightEncoding::F32, BTreeMap::new());
        // Published but never asked for: never encoded.
        for version in 1..=5 {
            publisher.publish(version, policy.snapshot());
        }
        assert_eq!(publisher.encodings(), 0);
        let (a, b) = (
            publisher.latest(0).await.unwrap(),
            publisher.latest(0).await.unwrap(),
        );
        assert_eq!(a.version, 5);
        assert_eq!(publisher.encodings(), 1);
        // Not equal copies: the very same buffer.
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.bytes.as_ptr(), b.bytes.as_ptr());
        let decoded = flgfn_common::weights::decode(&a.bytes).unwrap();
        assert_eq!(decoded.metadata["version"], "5");
        assert_eq!(decoded.arrays, policy.weights());
    }

    #[tokio::test]
    async fn a_session_that_waited_for_an_encoding_takes_it_if_new_enough() {
        let policy = policy();
        let publisher = Publisher::new(policy.snapshot(), WeightEncoding::F32, BTreeMap::new());
        publisher.publish(1, policy.snapshot());
        assert_eq!(publisher.latest(0).await.unwrap().version, 1);
        // Nobody encoding: a newer version is encoded, not the cached one
        // handed out.
        publisher.publish(2, policy.snapshot());
        assert_eq!(publisher.latest(1).await.unwrap().version, 2);
        assert_eq!(publisher.encodings(), 2);

        // A session waits while another encodes version 3; the trainer
        // publishes 4 meanwhile.
        publisher.publish(3, policy.snapshot());
        let turn = publisher.encoder_turn.lock().await;
        let waiting = tokio::spawn({
            let publisher = publisher.clone();
            async move { publisher.latest(3).await.unwrap().version }
        });
        tokio::task::yield_now().await;
        assert_eq!(publisher.encode_latest().unwrap().version, 3);
        publisher.publish(4, policy.snapshot());
        drop(turn);
        // Version 3 is what it needs: no second encoding.
        assert_eq!(waiting.await.unwrap(), 3);
        assert_eq!(publisher.encodings(), 3);

        // One that needs more than was encoded while it waited encodes.
        let turn = publisher.encoder_turn.lock().await;
        let waiting = tokio::spawn({
            let publisher = publisher.clone();
            async move { publisher.latest(6).await.unwrap().version }
        });
        tokio::task::yield_now().await;
        publisher.publish(5, policy.snapshot());
        assert_eq!(publisher.encode_latest().unwrap().version, 5);
        publisher.publish(6, policy.snapshot());
        drop(turn);
        assert_eq!(waiting.await.unwrap(), 6);
        assert_eq!(publisher.encodings(), 5);
    }

    #[tokio::test]
    async fn a_snapshot_is_the_weights_at_publish_time() {
        let mut policy = policy();
        let publisher = Publisher::new(policy.snapshot(), WeightEncoding::F32, BTreeMap::new());
        let at_publish = policy.weights();
        publisher.publish(1, policy.snapshot());
        // The trainer goes on changing its weights after publishing.
        let changed: Vec<_> = at_publish
            .iter()
            .cloned()
            .map(|mut array| {
                array.values.iter_mut().for_each(|x| *x += 1.0);
                array
            })
            .collect();
        policy.load_weights(&changed).unwrap();
        assert_eq!(policy.weights(), changed);
        let encoded = publisher.latest(0).await.unwrap();
        let decoded = flgfn_common::weights::decode(&encoded.bytes).unwrap();
        assert_eq!(decoded.arrays, at_publish);
        let mut done = publisher.done();
        publisher.publish(2, policy.snapshot());
        assert!(!*done.borrow_and_update(), "a version is no end");
        publisher.finish(true);
        assert!(*done.borrow_and_update());
        assert!(publisher.reached_max_steps());
    }
}
