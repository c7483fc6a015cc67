//! A runtime context with a disk of its own.
//!
//! All tasks of one deterministic runtime share one in-memory storage, but the consensus engine
//! opens fixed partition names (as a real node does, alone on its data directory). Several nodes
//! in one simulation would open the same partitions, so each node gets this wrapper: every call is
//! forwarded to the runtime, and storage partitions are prefixed with the node's name.

use commonware_runtime::telemetry::metrics::{Metric, Registered};
use commonware_runtime::{BlobVersion, Clock, Error, Handle, Metrics, Name, Spawner, Storage, Supervisor, signal};
use governor::clock::{Clock as GovernorClock, ReasonablyRealtime};
use rand::{TryCryptoRng, TryRng};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// `inner` (a runtime context) whose storage partitions are private to one node.
#[derive(Clone)]
pub struct OwnDisk<E> {
    inner: E,
    prefix: Arc<str>,
}

impl<E> OwnDisk<E> {
    /// Wraps `inner`; partitions become `<node>-<partition>` (`node`: letters, digits, `-`, `_`).
    pub fn new(inner: E, node: &str) -> Self {
        Self { inner, prefix: Arc::from(format!("{node}-")) }
    }

    fn partition(&self, partition: &str) -> String {
        format!("{}{partition}", self.prefix)
    }
}

impl<E> std::fmt::Debug for OwnDisk<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnDisk").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl<E: Supervisor> Supervisor for OwnDisk<E> {
    fn name(&self) -> Name {
        self.inner.name()
    }

    fn child(&self, label: &'static str) -> Self {
        Self { inner: self.inner.child(label), prefix: self.prefix.clone() }
    }

    fn with_attribute(self, key: &'static str, value: impl std::fmt::Display) -> Self {
        Self { inner: self.inner.with_attribute(key, value), prefix: self.prefix }
    }
}

impl<E: Spawner> Spawner for OwnDisk<E> {
    fn shared(self, blocking: bool) -> Self {
        Self { inner: self.inner.shared(blocking), prefix: self.prefix }
    }

    fn dedicated(self) -> Self {
        Self { inner: self.inner.dedicated(), prefix: self.prefix }
    }

    fn spawn<F, Fut, T>(self, f: F) -> Handle<T>
    where
        F: FnOnce(Self) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let prefix = self.prefix;
        self.inner.spawn(move |inner| f(Self { inner, prefix }))
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
        self.inner.current()
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send + 'static + use<E> {
        self.inner.sleep(duration)
    }

    fn sleep_until(&self, deadline: SystemTime) -> impl Future<Output = ()> + Send + 'static + use<E> {
        self.inner.sleep_until(deadline)
    }
}

impl<E: Clock> GovernorClock for OwnDisk<E> {
    type Instant = SystemTime;

    fn now(&self) -> SystemTime {
        self.inner.current()
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
