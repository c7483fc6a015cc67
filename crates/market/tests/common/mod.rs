//! The accounts the market tests move money through: a map of balances.

use archipel_market::{Accounts, MarketError, Micro};
use archipel_types::NodeId;
use std::collections::BTreeMap;

/// Balances by account.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct Book(pub BTreeMap<NodeId, Micro>);

impl Accounts for Book {
    fn debit(&mut self, who: &NodeId, amount: Micro) -> Result<(), MarketError> {
        let b = self.0.entry(*who).or_default();
        if *b < amount {
            return Err(MarketError::Insufficient { need: amount });
        }
        *b -= amount;
        Ok(())
    }
    fn credit(&mut self, who: &NodeId, amount: Micro) {
        *self.0.entry(*who).or_default() += amount;
    }
}

impl Book {
    /// `who`'s balance.
    #[allow(dead_code)]
    pub fn of(&self, who: &NodeId) -> Micro {
        self.0.get(who).copied().unwrap_or(0)
    }
}
