//! Revoked access tokens: each account's list of revoked token ids (`RevokeTokens`).
//!
//! A tenant's S3 gateway hands out access keys backed by capability tokens the tenant signed;
//! a token (and every token attenuated from it) stops working once one of its ids is in the
//! signer's list here. The ids are opaque hashes (the gateway hashes a token block's revocation
//! id); the ledger only keeps them, sorted and bounded, so a gateway reads one entry to know
//! every revocation of its tenant.

use crate::Hash;
use crate::state::State;
use crate::tx::TxError;
use archipel_types::NodeId;

/// Most ids one `RevokeTokens` carries.
pub const MAX_REVOKE_PER_TX: usize = 64;
/// Most ids one account's list holds.
pub const MAX_REVOCATIONS: usize = 1024;

impl State {
    /// The token ids `account` revoked, sorted.
    pub fn revocations(&self, account: &NodeId) -> Vec<Hash> {
        self.revocations
            .get(account, |id| self.load(&crate::StateKey::Revocations(*id), crate::state::decode_json))
            .unwrap_or_default()
    }

    /// `account`'s list with `ids` added, sorted, without repeats; refused past
    /// [`MAX_REVOCATIONS`].
    fn with_revoked(&self, account: NodeId, ids: &[Hash]) -> Result<Vec<Hash>, TxError> {
        let mut list = self.revocations(&account);
        list.extend_from_slice(ids);
        list.sort();
        list.dedup();
        if list.len() > MAX_REVOCATIONS {
            return Err(TxError::NotAllowed(format!(
                "account {account} would have {} revoked tokens, more than the {MAX_REVOCATIONS} the ledger keeps \
                 per account: revoke a parent token instead (its attenuated tokens go with it)",
                list.len()
            )));
        }
        Ok(list)
    }

    pub(crate) fn check_revoke_tokens(&self, signer: NodeId, ids: &[Hash]) -> Result<(), TxError> {
        if ids.is_empty() || ids.len() > MAX_REVOKE_PER_TX {
            return Err(TxError::Malformed(format!("1 to {MAX_REVOKE_PER_TX} token ids per RevokeTokens")));
        }
        self.with_revoked(signer, ids).map(drop)
    }

    pub(crate) fn apply_revoke_tokens(&mut self, signer: NodeId, ids: &[Hash]) -> crate::Receipt {
        // Checked by `check_revoke_tokens` just before: the list fits.
        let list = self.with_revoked(signer, ids).unwrap_or_default();
        let total = list.len() as u32;
        self.revocations.set(signer, Some(list));
        crate::Receipt::TokensRevoked { account: signer, revoked: ids.len() as u32, total }
    }
}

#[cfg(test)]
mod tests {
    use crate::state::tests::{genesis, id, signed};
    use crate::{Hash, Payload, Receipt};

    #[test]
    fn revocations_accumulate_sorted_bounded_and_in_the_root() {
        let mut s = genesis();
        s.begin_block(1, 1_000);
        let a = id(0).node_id();
        let root = s.seal().unwrap();
        let mut nonce = 0;
        let mut send = |s: &mut crate::State, ids: Vec<Hash>| {
            let r = s.apply(&signed(0, nonce, Payload::RevokeTokens { ids }));
            if r.is_ok() {
                nonce += 1;
            }
            r
        };
        let r = send(&mut s, vec![Hash([9; 32]), Hash([1; 32]), Hash([9; 32])]).unwrap();
        assert_eq!(r, Receipt::TokensRevoked { account: a, revoked: 3, total: 2 });
        assert_eq!(s.revocations(&a), vec![Hash([1; 32]), Hash([9; 32])]);
        assert_ne!(s.seal().unwrap(), root, "revocations are in the state root");
        assert!(s.revocations(&id(1).node_id()).is_empty());
        // Empty or too many per transaction, or past the account's bound: refused, nothing kept.
        let e = send(&mut s, vec![]).unwrap_err().to_string();
        assert!(e.contains("1 to 64"), "{e}");
        let e = send(&mut s, vec![Hash([3; 32]); 65]).unwrap_err().to_string();
        assert!(e.contains("1 to 64"), "{e}");
        // 2 + 15 x 64 + 62 = 1024: the bound exactly, then one more is refused.
        for batch in 0..16u16 {
            let n = if batch == 15 { 62 } else { 64 };
            let ids = (0..n).map(|i| Hash::of(&[&(batch * 64 + i).to_be_bytes()])).collect();
            send(&mut s, ids).unwrap_or_else(|e| panic!("batch {batch}: {e}"));
        }
        assert_eq!(s.revocations(&a).len(), 1024);
        let e = send(&mut s, vec![Hash([200; 32])]).unwrap_err().to_string();
        assert!(e.contains("more than the 1024") && e.contains("parent token"), "{e}");
        assert_eq!(s.revocations(&a).len(), 1024);
        // Revoking an id again costs a transaction and changes nothing.
        send(&mut s, vec![Hash([1; 32])]).unwrap();
        assert_eq!(s.revocations(&a).len(), 1024);
    }
}
