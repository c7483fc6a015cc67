//! One kind of state entry (accounts, nodes, leases, …): a map that a block can fork in O(1) and
//! that remembers which keys changed since the state root was last brought up to date.
//!
//! Every write goes through a method that marks its key, so the state root can be updated from
//! exactly the changed entries ([`crate::state::State::seal`]) and no write can slip past it.
//! The map is a persistent B-tree (`imbl`): a clone shares every node, a write copies only its
//! path, so each candidate block keeps its own state without copying the whole state.
//!
//! Two shapes: a [`Table`] holds every entry of its kind in memory (kinds bounded by a genesis
//! parameter, like the node registry, which the node walks often), an [`Overlay`] holds only the
//! entries written since the last commit and reads the others through from the state store
//! (kinds that grow without bound, like accounts).

use imbl::OrdMap;
use std::collections::BTreeSet;

/// Entries of one kind, with the keys changed since [`Table::take_changed`].
#[derive(Clone, Debug)]
pub struct Table<K: Ord + Clone, V: Clone> {
    map: OrdMap<K, V>,
    changed: BTreeSet<K>,
}

impl<K: Ord + Clone, V: Clone> Default for Table<K, V> {
    fn default() -> Self {
        Self { map: OrdMap::new(), changed: BTreeSet::new() }
    }
}

impl<K: Ord + Clone, V: Clone> Table<K, V> {
    /// The entry of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// Whether `key` has an entry.
    pub fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.keys()
    }

    /// Values in key order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }

    /// Sets `key`'s entry.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.changed.insert(key.clone());
        self.map.insert(key, value)
    }

    /// Removes `key`'s entry.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let old = self.map.remove(key);
        if old.is_some() {
            self.changed.insert(key.clone());
        }
        old
    }

    /// Changes `key`'s entry in place, starting from `V::default()` when it has none.
    pub fn update<R>(&mut self, key: K, f: impl FnOnce(&mut V) -> R) -> R
    where
        V: Default,
    {
        self.changed.insert(key.clone());
        if let Some(v) = self.map.get_mut(&key) {
            return f(v);
        }
        let mut v = V::default();
        let r = f(&mut v);
        self.map.insert(key, v);
        r
    }

    /// Changes `key`'s entry in place if it has one.
    pub fn update_existing<R>(&mut self, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let v = self.map.get_mut(key)?;
        self.changed.insert(key.clone());
        Some(f(v))
    }

    /// The keys written since the last call (each once, in order), forgetting them.
    pub fn take_changed(&mut self) -> BTreeSet<K> {
        std::mem::take(&mut self.changed)
    }

    /// Whether a key was written since [`Table::take_changed`].
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for Table<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut t = Table::default();
        for (k, v) in iter {
            t.insert(k, v);
        }
        t
    }
}

/// Entries of one kind written since the last commit (`None`: removed), over those a store holds;
/// with the keys changed since [`Overlay::take_changed`]. Each entry remembers the block height
/// it was written at, so a state forked before a commit can drop what that commit wrote
/// ([`Overlay::forget_through`]).
#[derive(Clone, Debug)]
pub struct Overlay<K: Ord + Clone, V: Clone> {
    map: OrdMap<K, (u64, Option<V>)>,
    changed: BTreeSet<K>,
    /// The height writes are tagged with.
    at: u64,
}

impl<K: Ord + Clone, V: Clone> Default for Overlay<K, V> {
    fn default() -> Self {
        Self { map: OrdMap::new(), changed: BTreeSet::new(), at: 0 }
    }
}

impl<K: Ord + Clone, V: Clone> Overlay<K, V> {
    /// The entry of `key`: written here, or else what `load` reads from the store.
    pub fn get(&self, key: &K, load: impl FnOnce(&K) -> Option<V>) -> Option<V> {
        match self.map.get(key) {
            Some((_, v)) => v.clone(),
            None => load(key),
        }
    }

    /// Tags the writes that follow with block `height`.
    pub fn writing_at(&mut self, height: u64) {
        self.at = height;
    }

    /// Sets (`Some`) or removes (`None`) `key`'s entry.
    pub fn set(&mut self, key: K, value: Option<V>) {
        self.changed.insert(key.clone());
        self.map.insert(key, (self.at, value));
    }

    /// Changes `key`'s entry in place, starting from what `load` reads, or `V::default()`.
    pub fn update<R>(&mut self, key: K, load: impl FnOnce(&K) -> Option<V>, f: impl FnOnce(&mut V) -> R) -> R
    where
        V: Default,
    {
        let mut v = self.get(&key, load).unwrap_or_default();
        let r = f(&mut v);
        self.set(key, Some(v));
        r
    }

    /// The keys written since the last call (each once, in order), forgetting them.
    pub fn take_changed(&mut self) -> BTreeSet<K> {
        std::mem::take(&mut self.changed)
    }

    /// Whether a key was written since [`Overlay::take_changed`].
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }

    /// The entries written since the last commit, in key order (`None`: removed).
    pub fn written(&self) -> impl Iterator<Item = (&K, &Option<V>)> {
        self.map.iter().map(|(k, (_, v))| (k, v))
    }

    /// Forgets the written entries once a store holds them (reads then go to the store).
    pub fn clear_written(&mut self) {
        self.map = OrdMap::new();
    }

    /// Forgets the entries last written at or below `height`, which a store now holds.
    pub fn forget_through(&mut self, height: u64) {
        if self.map.values().any(|(at, _)| *at <= height) {
            self.map =
                self.map.iter().filter(|(_, (at, _))| *at > height).map(|(k, v)| (k.clone(), v.clone())).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_marks_its_key_and_forks_do_not_share_writes() {
        let mut t: Table<u32, u64> = [(1, 10), (2, 20)].into_iter().collect();
        assert_eq!(t.take_changed().into_iter().collect::<Vec<_>>(), [1, 2]);
        let fork = t.clone();
        t.update(3, |v| *v += 5);
        t.update_existing(&1, |v| *v = 11);
        assert_eq!(t.update_existing(&9, |v| *v = 1), None);
        t.remove(&2);
        t.remove(&8); // absent: not a change
        assert_eq!(t.take_changed().into_iter().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!t.has_changes());
        assert_eq!(t.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), [(1, 11), (3, 5)]);
        assert_eq!(fork.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), [(1, 10), (2, 20)]);
        assert!(!fork.has_changes());
    }

    #[test]
    fn an_overlay_reads_through_until_written_and_remembers_removals() {
        let store = |k: &u32| (*k < 5).then_some(u64::from(*k) * 100);
        let mut o: Overlay<u32, u64> = Overlay::default();
        assert_eq!(o.get(&2, store), Some(200));
        o.update(2, store, |v| *v += 1);
        o.set(3, None);
        o.update(7, store, |v| *v = 9);
        assert_eq!(
            (o.get(&2, store), o.get(&3, store), o.get(&4, store), o.get(&7, store)),
            (Some(201), None, Some(400), Some(9))
        );
        assert_eq!(o.take_changed().into_iter().collect::<Vec<_>>(), [2, 3, 7]);
        assert_eq!(o.written().count(), 3);
        o.clear_written();
        assert_eq!(o.get(&3, store), Some(300), "once committed, reads go to the store");
        // Writes at two heights: forgetting through the first keeps the second's.
        o.writing_at(5);
        o.set(1, Some(1));
        o.set(2, Some(2));
        o.writing_at(6);
        o.set(2, Some(22));
        o.forget_through(5);
        assert_eq!((o.get(&1, store), o.get(&2, store)), (Some(100), Some(22)));
    }
}
