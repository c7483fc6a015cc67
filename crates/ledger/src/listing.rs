//! The object index: rows derived from the object entries, kept by the state store in key order
//! beside them, so a listing, a node's shards and the repair queue cost a page of reads instead of
//! a pass over every object.
//!
//! Each object entry contributes (see [`index_rows`]):
//! - `name/<bucket id>/<hex of the key's bytes>` → the object id: listings by key, with prefix
//!   and pagination (hex keeps the bytes' order, and a key's hex prefix is its prefix's hex);
//! - `holder/<node>/<object id>` for each holder: the objects a node holds;
//! - `suspect/<object id>` when a shard failed an audit: repair work that no lease shows.
//!
//! The rows are a function of the entries, written by the same commit that writes the entries
//! ([`crate::State::commit`] reads the object's previous version from the store to remove its
//! old rows), rebuilt on import, and not part of the state root: every node can derive them
//! again. Queries merge the store's rows with the objects written since the last commit, so they
//! show this state, not the store's.

use crate::hash::Hash;
use crate::state::{LeaseStatus, State};
use crate::storage::{ObjectRecord, bucket_id};
use crate::store::{Entries, StoreError};
use archipel_types::NodeId;
use std::collections::{BTreeMap, BTreeSet};

const NAME: &[u8] = b"name/";
const HOLDER: &[u8] = b"holder/";
const SUSPECT: &[u8] = b"suspect/";
/// Rows read per store call (a few in unit tests, so their listings cross pages).
const PAGE: usize = if cfg!(test) { 3 } else { 1_024 };

fn hex_of(bytes: &[u8]) -> Vec<u8> {
    hex::encode(bytes).into_bytes()
}

/// `name/<bucket id>/`: the rows of one bucket.
fn bucket_rows(bucket: &str) -> Vec<u8> {
    [NAME, &hex_of(&bucket_id(bucket).0), b"/"].concat()
}

/// `holder/<node>/`: the rows of one holder.
fn holder_rows(node: &NodeId) -> Vec<u8> {
    [HOLDER, &hex_of(node.as_bytes()), b"/"].concat()
}

/// The index rows of a state entry: none unless it is an object (`object/<id>` with a record).
pub fn index_rows(key: &[u8], value: &[u8]) -> Entries {
    let Some(id) = key.strip_prefix(b"object/").and_then(|h| std::str::from_utf8(h).ok()?.parse::<Hash>().ok()) else {
        return Vec::new();
    };
    // A record that does not decode has no rows (reading it fails elsewhere, and says so).
    let Ok(o) = serde_json::from_slice::<ObjectRecord>(value) else { return Vec::new() };
    let mut out = vec![([bucket_rows(&o.bucket), hex_of(o.key.as_bytes())].concat(), id.0.to_vec())];
    let holders: BTreeSet<&NodeId> = o.holders.iter().collect();
    out.extend(holders.into_iter().map(|h| ([holder_rows(h), hex_of(&id.0)].concat(), Vec::new())));
    if !o.suspect.is_empty() {
        out.push(([SUSPECT, &hex_of(&id.0)].concat(), Vec::new()));
    }
    out
}

/// The index writes that take the rows of `old` to those of `new` (an object entry's previous
/// and next value).
pub(crate) fn index_changes(key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let old: BTreeMap<Vec<u8>, Vec<u8>> = old.map(|v| index_rows(key, v)).unwrap_or_default().into_iter().collect();
    let new: BTreeMap<Vec<u8>, Vec<u8>> = new.map(|v| index_rows(key, v)).unwrap_or_default().into_iter().collect();
    let mut out: Vec<_> = old.keys().filter(|k| !new.contains_key(*k)).map(|k| (k.clone(), None)).collect();
    out.extend(new.into_iter().filter(|(k, v)| old.get(k) != Some(v)).map(|(k, v)| (k, Some(v))));
    out
}

/// Checks that `store`'s index rows are exactly those its entries give (O(state): for tests and
/// inspection); names the first difference.
pub fn check_index(store: &dyn crate::store::StateStore) -> Result<(), String> {
    let mut want: Entries = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(b"object/", after.as_deref(), 4_096).map_err(|e| e.to_string())?;
        let full = page.len() == 4_096;
        after = page.last().map(|(k, _)| k.clone());
        want.extend(page.iter().flat_map(|(k, v)| index_rows(k, v)));
        if !full {
            break;
        }
    }
    want.sort();
    let got = store.index_scan(b"", None, usize::MAX).map_err(|e| e.to_string())?;
    if got == want {
        return Ok(());
    }
    let text = |r: Option<&(Vec<u8>, Vec<u8>)>| r.map(|(k, _)| String::from_utf8_lossy(k).into_owned());
    let at = got.iter().zip(&want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
    Err(format!(
        "the index holds {} rows, its entries give {}; first difference at row {at}: {:?} where {:?} belongs",
        got.len(),
        want.len(),
        text(got.get(at)),
        text(want.get(at))
    ))
}

/// The object id a row names: the value of a name row, the last part of a holder or suspect row.
fn id_of_row(key: &[u8], value: &[u8]) -> Option<Hash> {
    if key.starts_with(NAME) {
        return value.try_into().ok().map(Hash);
    }
    let hex = key.rsplit(|b| *b == b'/').next()?;
    std::str::from_utf8(hex).ok()?.parse().ok()
}

impl State {
    /// Every index row under `prefix` after `after`, a page at a time, until `f` says stop.
    fn for_each_row(
        &self,
        prefix: &[u8],
        after: Option<Vec<u8>>,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = after;
        loop {
            let page = self.store.index_scan(prefix, after.as_deref(), PAGE)?;
            let full = page.len() == PAGE;
            for (k, v) in &page {
                if !f(k, v) {
                    return Ok(());
                }
            }
            after = match page.into_iter().last() {
                Some((k, _)) if full => Some(k),
                _ => return Ok(()),
            };
        }
    }

    /// The objects written since the last commit (`None`: deleted), by id.
    fn objects_written(&self) -> BTreeMap<Hash, Option<ObjectRecord>> {
        self.objects.written().map(|(id, o)| (*id, o.clone())).collect()
    }

    /// Up to `limit` objects of `bucket` whose keys start with `prefix` and sort after the bytes
    /// `after`, in key order: one page of a listing, O(page) reads. Errs if the store failed (a
    /// listing is never silently short).
    pub fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<ObjectRecord>, StoreError> {
        let written = self.objects_written();
        let past = |key: &str| after.is_none_or(|a| key.as_bytes() > a);
        let mut out: Vec<ObjectRecord> = written
            .values()
            .flatten()
            .filter(|o| o.bucket == bucket && o.key.starts_with(prefix) && past(&o.key))
            .cloned()
            .collect();
        let rows = bucket_rows(bucket);
        let mut from_store = 0;
        self.for_each_row(
            &[&rows[..], &hex_of(prefix.as_bytes())].concat(),
            after.map(|a| [&rows[..], &hex_of(a)].concat()),
            |k, v| {
                // An object written since the commit is listed from `written`, or was deleted.
                if let Some(id) = id_of_row(k, v).filter(|id| !written.contains_key(id))
                    && let Some(o) = self.object_by_id(&id).filter(|o| o.bucket == bucket && o.key.starts_with(prefix))
                {
                    out.push(o);
                    from_store += 1;
                }
                from_store < limit
            },
        )?;
        self.check_fault()?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.truncate(limit);
        Ok(out)
    }

    /// Every object with a shard on `node`, O(its objects). A store failure is kept (see
    /// [`State::store_fault`]) and lists what was read before it.
    pub fn objects_on(&self, node: &NodeId) -> Vec<ObjectRecord> {
        self.indexed_objects(&holder_rows(node), |o| o.holders.contains(node))
    }

    /// The objects `keep` accepts, from the index rows under `prefix` (each object's current
    /// record checked again) and the objects written since the last commit. A store failure is
    /// kept and lists what was read before it.
    fn indexed_objects(&self, prefix: &[u8], keep: impl Fn(&ObjectRecord) -> bool) -> Vec<ObjectRecord> {
        let written = self.objects_written();
        let mut out: Vec<ObjectRecord> = written.values().flatten().filter(|o| keep(o)).cloned().collect();
        let read = self.for_each_row(prefix, None, |k, v| {
            if let Some(id) = id_of_row(k, v).filter(|id| !written.contains_key(id))
                && let Some(o) = self.object_by_id(&id).filter(|o| keep(o))
            {
                out.push(o);
            }
            true
        });
        self.keep_fault(read);
        out
    }

    /// Every node holding a shard of some object, O(holders) reads.
    pub fn holder_nodes(&self) -> BTreeSet<NodeId> {
        let mut out: BTreeSet<NodeId> =
            self.objects_written().values().flatten().flat_map(|o| o.holders.iter().copied()).collect();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let row = match self.store.index_scan(HOLDER, after.as_deref(), 1) {
                Ok(page) => page.into_iter().next(),
                Err(e) => {
                    self.keep_fault(Err(e));
                    return out;
                }
            };
            let Some((k, _)) = row else { return out };
            let node = k
                .get(HOLDER.len()..HOLDER.len() + 64)
                .and_then(|h| std::str::from_utf8(h).ok()?.parse::<NodeId>().ok());
            let Some(node) = node else {
                self.keep_fault(Err(StoreError::Corrupt(format!(
                    "index row {} names no node",
                    String::from_utf8_lossy(&k)
                ))));
                return out;
            };
            out.insert(node);
            // Past every row of this node: 'g' sorts after every hex digit.
            after = Some([holder_rows(&node), b"g".to_vec()].concat());
        }
    }

    /// Objects one of whose shards failed an audit, O(those objects).
    pub fn suspect_objects(&self) -> Vec<ObjectRecord> {
        self.indexed_objects(SUSPECT, |o| !o.suspect.is_empty())
    }

    /// Objects that may need repair: those on a holder that left the registry, is not Up, or
    /// moved since it registered (it may be outside a geofence now), and those with a suspect
    /// shard. A superset — whether a shard may move is [`State::unhealthy_at`]'s call — read in
    /// O(holders + those objects), not O(objects).
    pub fn repair_candidates(&self) -> Vec<ObjectRecord> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let at_risk = self.holder_nodes().into_iter().filter(|n| match self.nodes.get(n) {
            None => true,
            Some(rec) => rec.relocated || self.lease_status(n) != LeaseStatus::Up,
        });
        for o in at_risk.flat_map(|n| self.objects_on(&n)).chain(self.suspect_objects()) {
            if seen.insert(o.version) {
                out.push(o);
            }
        }
        out
    }
}
