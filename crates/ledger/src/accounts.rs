//! Accounts and balances: the `Transfer` kind.

use crate::state::{Receipt, State};
use crate::tx::TxError;
use archipel_types::NodeId;

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

    /// Moves `amount` (the fee is charged by the caller); only after [`State::check_transfer`].
    pub(crate) fn apply_transfer(&mut self, from: NodeId, to: NodeId, amount: u64, fee: u64) -> Receipt {
        if from != to {
            self.accounts.entry(from).or_default().balance_micro -= amount;
            self.accounts.entry(to).or_default().balance_micro += amount;
        }
        Receipt::Transferred { from, to, amount_micro: amount, fee_micro: fee }
    }
}

#[cfg(test)]
mod tests {
    use crate::state::tests::{genesis, id, transfer};
    use crate::state::{Account, GenesisState, Receipt, State};
    use proptest::prelude::*;

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
        fn money_is_conserved_and_replay_gives_the_same_root(ops in prop::collection::vec((0u64..3, 0u64..3, 0u64..700), 0..40)) {
            let start = || State::genesis(GenesisState { accounts: (0..3).map(|i| (id(i).node_id(), 1_000)).collect(), ..Default::default() });
            let mut a = start();
            let mut nonces = [0u64; 3];
            let mut applied = Vec::new();
            for (from, to, amount) in ops {
                let t = transfer(from, nonces[from as usize], to, amount);
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
