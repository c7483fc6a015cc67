//! Accounts and balances: the `Transfer` and `TransferMany` kinds.

use crate::state::{Receipt, State};
use crate::tx::{Credit, MAX_CREDITS, TxError};
use archipel_types::NodeId;
use std::collections::BTreeMap;

impl State {
    /// Checks a transfer of `amount` plus `fee` from `from` to `to` without changing anything.
    pub(crate) fn check_transfer(&self, from: NodeId, to: NodeId, amount: u64, fee: u64) -> Result<(), TxError> {
        let balance = self.account(&from).balance_micro;
        let needed = amount.checked_add(fee).ok_or(TxError::Overflow)?;
        if balance < needed {
            return Err(TxError::InsufficientFunds { balance_micro: balance, needed_micro: needed });
        }
        if from != to {
            self.account(&to).balance_micro.checked_add(amount).ok_or(TxError::Overflow)?;
        }
        Ok(())
    }

    /// What each recipient of `credits` gains (the signer's own credits left out: they move
    /// nothing), and the sum of all amounts; `None` on overflow.
    fn credit_totals(from: NodeId, credits: &[Credit]) -> Option<(BTreeMap<NodeId, u64>, u64)> {
        let mut gains: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut total: u64 = 0;
        for c in credits {
            total = total.checked_add(c.amount_micro)?;
            if c.to != from {
                let g = gains.entry(c.to).or_default();
                *g = g.checked_add(c.amount_micro)?;
            }
        }
        Some((gains, total))
    }

    /// The checks of [`State::check_transfer_many`] that cost arithmetic only (no allocation, no
    /// account but the signer's): run before the signature is verified, under the chain's lock,
    /// so a forged transaction of 200 credits costs the node no more than it must. 1 to
    /// [`MAX_CREDITS`] credits, none of 0, and the signer covers every amount and `fee`.
    pub(crate) fn check_transfer_many_cheap(&self, from: NodeId, credits: &[Credit], fee: u64) -> Result<(), TxError> {
        if credits.is_empty() || credits.len() > MAX_CREDITS {
            return Err(TxError::Malformed(format!(
                "a transfer_many carries 1 to {MAX_CREDITS} credits, not {}",
                credits.len()
            )));
        }
        let mut needed = fee;
        for (i, c) in credits.iter().enumerate() {
            if c.amount_micro == 0 {
                return Err(TxError::Malformed(format!("credit {i} of the transfer_many moves nothing (amount 0)")));
            }
            needed = needed.checked_add(c.amount_micro).ok_or(TxError::Overflow)?;
        }
        let balance = self.account(&from).balance_micro;
        if balance < needed {
            return Err(TxError::InsufficientFunds { balance_micro: balance, needed_micro: needed });
        }
        Ok(())
    }

    /// Checks a [`crate::Payload::TransferMany`] without changing anything: the cheap checks,
    /// then that no recipient's balance overflows.
    pub(crate) fn check_transfer_many(&self, from: NodeId, credits: &[Credit], fee: u64) -> Result<(), TxError> {
        self.check_transfer_many_cheap(from, credits, fee)?;
        let (gains, _) = Self::credit_totals(from, credits).ok_or(TxError::Overflow)?;
        for (to, gain) in &gains {
            self.account(to).balance_micro.checked_add(*gain).ok_or(TxError::Overflow)?;
        }
        Ok(())
    }

    /// Moves every credit (the fee is charged by the caller); only after
    /// [`State::check_transfer_many`].
    pub(crate) fn apply_transfer_many(&mut self, from: NodeId, credits: &[Credit], fee: u64) -> Receipt {
        let (gains, _) = Self::credit_totals(from, credits).expect("checked before");
        let mut moved = 0;
        for (to, gain) in gains {
            self.update_account(to, |a| a.balance_micro += gain);
            moved += gain;
        }
        self.update_account(from, |a| a.balance_micro -= moved);
        let total_micro = credits.iter().map(|c| c.amount_micro).sum();
        Receipt::TransferredMany { from, credits: credits.len(), total_micro, fee_micro: fee }
    }

    /// Moves `amount` (the fee is charged by the caller); only after [`State::check_transfer`].
    pub(crate) fn apply_transfer(&mut self, from: NodeId, to: NodeId, amount: u64, fee: u64) -> Receipt {
        if from != to {
            self.update_account(from, |a| a.balance_micro -= amount);
            self.update_account(to, |a| a.balance_micro += amount);
        }
        Receipt::Transferred { from, to, amount_micro: amount, fee_micro: fee }
    }
}

#[cfg(test)]
mod tests {
    use crate::state::tests::{genesis, id, signed, transfer};
    use crate::state::{Account, GenesisState, Receipt, State};
    use crate::tx::{Credit, MAX_CREDITS, Payload, TxError};
    use proptest::prelude::*;

    fn many(from: u64, nonce: u64, credits: &[(u64, u64)]) -> crate::SignedTransaction {
        let credits =
            credits.iter().map(|&(to, amount)| Credit { to: id(to).node_id(), amount_micro: amount }).collect();
        signed(from, nonce, Payload::TransferMany { credits })
    }

    #[test]
    fn transfer_many_moves_every_credit_and_pays_a_fee_per_credit() {
        let mut s = genesis();
        // Account 1 twice, the signer itself once (moves nothing, still paid for).
        let r = s.apply(&many(0, 0, &[(1, 100), (10, 50), (1, 25), (0, 7)])).unwrap();
        assert_eq!(r, Receipt::TransferredMany { from: id(0).node_id(), credits: 4, total_micro: 182, fee_micro: 4 });
        assert_eq!(s.account(&id(0).node_id()), Account { balance_micro: 1_000 - 175 - 4, nonce: 1 });
        assert_eq!(s.account(&id(1).node_id()).balance_micro, 625);
        assert_eq!(s.account(&id(10).node_id()).balance_micro, 150);
        assert_eq!(s.chain().fees_burned_micro, 4);
        assert_eq!(s.total_micro(), 1_600, "what was burned is counted as burned");
    }

    #[test]
    fn transfer_many_is_all_or_nothing() {
        let mut s = genesis();
        let root = s.state_root();
        // 821 left after fees of 2 would be needed twice over: nothing moves.
        let e = s.apply(&many(0, 0, &[(1, 500), (10, 499)])).unwrap_err();
        assert_eq!(e, TxError::InsufficientFunds { balance_micro: 1_000, needed_micro: 1_001 });
        assert_eq!(s.state_root(), root, "a refused transfer_many changes nothing");
        // Exactly the balance: fine.
        s.apply(&many(0, 0, &[(1, 500), (10, 498)])).unwrap();
        assert_eq!(s.account(&id(0).node_id()).balance_micro, 0);
        // A credit that overflows a recipient's balance refuses the lot.
        let mut s = State::genesis(GenesisState {
            accounts: vec![(id(0).node_id(), u64::MAX), (id(1).node_id(), u64::MAX - 5)],
            ..Default::default()
        });
        assert_eq!(s.apply(&many(0, 0, &[(2, 10), (1, 3), (1, 3)])).unwrap_err(), TxError::Overflow);
        assert_eq!(s.account(&id(2).node_id()).balance_micro, 0);
        // Amounts whose sum overflows.
        assert_eq!(s.apply(&many(0, 0, &[(2, u64::MAX), (3, 1)])).unwrap_err(), TxError::Overflow);
    }

    #[test]
    fn transfer_many_carries_one_to_max_credits() {
        let mut s = genesis();
        let e = s.apply(&many(0, 0, &[])).unwrap_err();
        assert_eq!(e.code(), "malformed");
        assert!(e.to_string().contains("1 to 200 credits, not 0"), "{e}");
        let too_many: Vec<(u64, u64)> = (0..=MAX_CREDITS as u64).map(|_| (1, 1)).collect();
        assert!(s.apply(&many(0, 0, &too_many)).unwrap_err().to_string().contains("not 201"));
        let zero = s.apply(&many(0, 0, &[(1, 5), (10, 0)])).unwrap_err();
        assert!(zero.to_string().contains("credit 1 of the transfer_many moves nothing"), "{zero}");
        s.apply(&many(0, 0, &too_many[..MAX_CREDITS])).unwrap();
        assert_eq!(s.account(&id(1).node_id()).balance_micro, 700);
    }

    /// Before signatures (`precheck`), a forged transfer_many is judged by arithmetic alone; the
    /// recipients' balances are looked at only once its signature passed.
    #[test]
    fn the_precheck_of_transfer_many_is_arithmetic_and_the_full_check_adds_recipients() {
        let s = State::genesis(GenesisState {
            accounts: vec![(id(0).node_id(), 1_000), (id(1).node_id(), u64::MAX - 500)],
            ..Default::default()
        });
        let overflowing = many(0, 0, &[(1, 5_00), (1, 5_00)]);
        let mut forged = many(0, 0, &[(1, 1)]);
        forged.signature[0] ^= 1;
        // Cheap: passes on the signer's balance; the recipient overflow is the full check's.
        assert_eq!(
            s.precheck(&overflowing, 100),
            Err(TxError::InsufficientFunds { balance_micro: 1_000, needed_micro: 1_002 })
        );
        let fits = many(0, 0, &[(1, 600), (1, 300)]);
        s.precheck(&fits, 100).unwrap();
        assert_eq!(s.admit(&fits, 100), Err(TxError::Overflow), "the full check looks at the recipient");
        s.precheck(&forged, 100).unwrap();
        assert!(matches!(s.admit(&forged, 100), Err(TxError::BadSignature(_))));
    }

    #[test]
    fn transfers_move_money_burn_the_fee_and_bump_the_nonce() {
        let mut s = genesis();
        let r = s.apply(&transfer(0, 0, 1, 300)).unwrap();
        assert!(matches!(r, Receipt::Transferred { amount_micro: 300, fee_micro: 1, .. }));
        assert_eq!(s.account(&id(0).node_id()), Account { balance_micro: 699, nonce: 1 });
        assert_eq!(s.account(&id(1).node_id()).balance_micro, 800);
        assert_eq!(s.chain().fees_burned_micro, 1);
        // Amount + fee must be covered.
        assert!(s.apply(&transfer(0, 1, 1, 699)).is_err());
        s.apply(&transfer(0, 1, 1, 698)).unwrap();
        assert_eq!(s.account(&id(0).node_id()).balance_micro, 0);
    }

    proptest! {
        #[test]
        fn money_is_conserved_and_replay_gives_the_same_root(ops in prop::collection::vec((0u64..3, 0u64..3, 0u64..700, 0usize..4), 0..40)) {
            let start = || State::genesis(GenesisState { accounts: (0..3).map(|i| (id(i).node_id(), 1_000)).collect(), ..Default::default() });
            let mut a = start();
            let mut nonces = [0u64; 3];
            let mut applied = Vec::new();
            for (from, to, amount, extra) in ops {
                // `extra` > 0: a transfer_many to `to` and the next accounts in turn.
                let nonce = nonces[from as usize];
                let t = match extra {
                    0 => transfer(from, nonce, to, amount),
                    n => many(from, nonce, &(0..=n as u64).map(|k| ((to + k) % 3, amount / (k + 1))).collect::<Vec<_>>()),
                };
                if a.apply(&t).is_ok() {
                    nonces[from as usize] += 1;
                    applied.push(t);
                }
                prop_assert_eq!(a.total_micro(), 3_000);
            }
            let mut b = start();
            for t in &applied {
                prop_assert!(b.apply(t).is_ok());
            }
            prop_assert_eq!(a.state_root(), b.state_root());
        }
    }
}
