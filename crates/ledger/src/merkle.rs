//! Binary BLAKE3 Merkle trees with inclusion proofs, used for both the transaction root of a block
//! and the state root.
//!
//! Leaves and inner nodes are hashed under different prefixes so a leaf can never pass for an inner
//! node. An odd node at the end of a level is carried up unchanged; a path therefore only lists the
//! levels where the node had a sibling.

use crate::hash::Hash;
use serde::{Deserialize, Serialize};

/// Hash of a state leaf: its key and value, length-prefixed so no two pairs collide.
pub fn leaf_hash(key: &[u8], value: &[u8]) -> Hash {
    Hash::of(&[b"archipel/leaf", &(key.len() as u64).to_be_bytes(), key, value])
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Hash::of(&[b"archipel/node", &left.0, &right.0])
}

/// The root of an empty tree.
pub fn empty_root() -> Hash {
    Hash::of(&[b"archipel/empty"])
}

/// Merkle root of `leaves` (in order).
pub fn root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return empty_root();
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = next_level(&level);
    }
    level[0]
}

fn next_level(level: &[Hash]) -> Vec<Hash> {
    level
        .chunks(2)
        .map(|pair| match pair {
            [a, b] => node_hash(a, b),
            [a] => *a,
            _ => unreachable!("chunks(2) yields one or two items"),
        })
        .collect()
}

/// One step of an inclusion path: the sibling and on which side it sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The sibling's hash.
    pub sibling: Hash,
    /// True when the sibling is the left child.
    pub left: bool,
}

/// The inclusion path of leaf `index` in `leaves`, or `None` when out of range.
pub fn path(leaves: &[Hash], mut index: usize) -> Option<Vec<Step>> {
    if index >= leaves.len() {
        return None;
    }
    let mut steps = Vec::new();
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        let sibling = index ^ 1;
        if sibling < level.len() {
            steps.push(Step { sibling: level[sibling], left: sibling < index });
        }
        level = next_level(&level);
        index /= 2;
    }
    Some(steps)
}

/// The root implied by `leaf` and its path.
pub fn root_from_path(leaf: Hash, steps: &[Step]) -> Hash {
    steps.iter().fold(leaf, |acc, s| if s.left { node_hash(&s.sibling, &acc) } else { node_hash(&acc, &s.sibling) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes(), b"v")).collect()
    }

    #[test]
    fn every_leaf_changes_the_root() {
        let l = leaves(5);
        let r = root(&l);
        for i in 0..5 {
            let mut t = l.clone();
            t[i].0[0] ^= 1;
            assert_ne!(root(&t), r);
        }
        assert_ne!(root(&[]), root(&leaves(1)));
    }

    proptest! {
        #[test]
        fn paths_prove_exactly_their_leaf(n in 1usize..40, pick in 0usize..40) {
            let l = leaves(n);
            let i = pick % n;
            let p = path(&l, i).unwrap();
            prop_assert_eq!(root_from_path(l[i], &p), root(&l));
            let other = leaf_hash(b"other", b"v");
            prop_assert_ne!(root_from_path(other, &p), root(&l));
            prop_assert!(path(&l, n).is_none());
        }
    }
}
