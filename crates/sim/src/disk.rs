//! A runtime context with a disk of its own.
//!
//! All tasks of one deterministic runtime share one in-memory storage, but the consensus engine
//! opens fixed partition names (as a real node does, alone on its data directory). Several nodes
//! in one simulation would open the same partitions, so each node gets this wrapper: every call is
//! forwarded to the runtime, and storage partitions are prefixed with the node's name.
//!
//! The wrapper can also set the node's wall clock off the runtime's by a fixed [`ClockOffset`]
//! (a validator whose clock is wrong); timers keep running in the runtime's real time.

use commonware_runtime::telemetry::metrics::{Metric, Registered};
use commonware_runtime::{BlobVersion, Clock, Error, Handle, Metrics, Name, Spawner, Storage, Supervisor, signal};
use governor::clock::{Clock as GovernorClock, ReasonablyRealtime};
use rand::{TryCryptoRng, TryRng};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How far a node's wall clock is off the runtime's (real) time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockOffset {
    /// The node reads the real time.
    #[default]
    None,
    /// The node's clock reads this much later than the real time.
    Ahead(Duration),
    /// The node's clock reads this much earlier than the real time.
    Behind(Duration),
}

impl ClockOffset {
    /// What a clock with this offset reads at real time `real`.
    pub fn read(self, real: SystemTime) -> SystemTime {
        match self {
            Self::None => real,
            Self::Ahead(by) => real + by,
            // The simulation starts at the epoch: a clock behind it reads before the epoch
            // (which `SystemTime` represents on every platform the simulator runs on).
            Self::Behind(by) => real.checked_sub(by).unwrap_or_else(|| unreachable!("{real:?} - {by:?} is not a time")),
        }
    }

    /// The real time at which a clock with this offset reads `reading`.
    pub fn real(self, reading: SystemTime) -> SystemTime {
        match self {
            Self::None => reading,
            Self::Ahead(by) => {
                reading.checked_sub(by).unwrap_or_else(|| unreachable!("{reading:?} - {by:?} is not a time"))
            }
            Self::Behind(by) => reading + by,
        }
    }
}

/// `inner` (a runtime context) whose storage partitions are private to one node, and whose wall
/// clock may be off by a [`ClockOffset`].
#[derive(Clone)]
pub struct OwnDisk<E> {
    inner: E,
    prefix: Arc<str>,
    clock: ClockOffset,
}

impl<E> OwnDisk<E> {
    /// Wraps `inner`; partitions become `<node>-<partition>` (`node`: letters, digits, `-`, `_`).
    pub fn new(inner: E, node: &str) -> Self {
        Self { inner, prefix: Arc::from(format!("{node}-")), clock: ClockOffset::None }
    }

    /// This context with its wall clock off by `clock` ([`Clock::current`] and the deadlines of
    /// [`Clock::sleep_until`] are on the skewed clock; durations are real).
    pub fn with_clock_offset(self, clock: ClockOffset) -> Self {
        Self { clock, ..self }
    }

    fn partition(&self, partition: &str) -> String {
        format!("{}{partition}", self.prefix)
    }
}

impl<E> std::fmt::Debug for OwnDisk<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnDisk").field("prefix", &self.prefix).field("clock", &self.clock).finish_non_exhaustive()
    }
}

impl<E: Supervisor> Supervisor for OwnDisk<E> {
    fn name(&self) -> Name {
        self.inner.name()
    }

    fn child(&self, label: &'static str) -> Self {
        Self { inner: self.inner.child(label), prefix: self.prefix.clone(), clock: self.clock }
    }

    fn with_attribute(self, key: &'static str, value: impl std::fmt::Display) -> Self {
        Self { inner: self.inner.with_attribute(key, value), prefix: self.prefix, clock: self.clock }
    }
}

impl<E: Spawner> Spawner for OwnDisk<E> {
    fn shared(self, blocking: bool) -> Self {
        Self { inner: self.inner.shared(blocking), prefix: self.prefix, clock: self.clock }
    }

    fn dedicated(self) -> Self {
        Self { inner: self.inner.dedicated(), prefix: self.prefix, clock: self.clock }
    }

    fn spawn<F, Fut, T>(self, f: F) -> Handle<T>
    where
        F: FnOnce(Self) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (prefix, clock) = (self.prefix, self.clock);
        self.inner.spawn(move |inner| f(Self { inner, prefix, clock }))
    }

    async fn stop(self, value: i32, timeout: Option<Duration>) -> Result<(), Error> {
        self.inner.stop(value, timeout).await
    }

    fn stopped(&self) -> signal::Signal {
        self.inner.stopped()
    }
}

impl<E: Clock> Clock for OwnDisk<E> {
    fn current(&self) -> SystemTime {
        self.clock.read(self.inner.current())
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send + 'static + use<E> {
        self.inner.sleep(duration)
    }

    fn sleep_until(&self, deadline: SystemTime) -> impl Future<Output = ()> + Send + 'static + use<E> {
        self.inner.sleep_until(self.clock.real(deadline))
    }
}

impl<E: Clock> GovernorClock for OwnDisk<E> {
    type Instant = SystemTime;

    fn now(&self) -> SystemTime {
        self.current()
    }
}

impl<E: Clock> ReasonablyRealtime for OwnDisk<E> {}

impl<E: Metrics> Metrics for OwnDisk<E> {
    fn register<N: Into<String>, H: Into<String>, M: Metric>(&self, name: N, help: H, metric: M) -> Registered<M> {
        self.inner.register(name, help, metric)
    }

    fn encode(&self) -> String {
        self.inner.encode()
    }
}

impl<E: Storage> Storage for OwnDisk<E> {
    type Blob = E::Blob;

    async fn open_versioned(
        &self,
        partition: &str,
        name: &[u8],
        versions: std::ops::RangeInclusive<BlobVersion>,
    ) -> Result<(Self::Blob, u64, BlobVersion), Error> {
        self.inner.open_versioned(&self.partition(partition), name, versions).await
    }

    async fn remove(&self, partition: &str, name: Option<&[u8]>) -> Result<(), Error> {
        self.inner.remove(&self.partition(partition), name).await
    }

    async fn scan(&self, partition: &str) -> Result<Vec<Vec<u8>>, Error> {
        self.inner.scan(&self.partition(partition)).await
    }
}

impl<E: TryRng> TryRng for OwnDisk<E> {
    type Error = E::Error;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        self.inner.try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.inner.try_next_u64()
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Self::Error> {
        self.inner.try_fill_bytes(dest)
    }
}

impl<E: TryCryptoRng> TryCryptoRng for OwnDisk<E> {}
