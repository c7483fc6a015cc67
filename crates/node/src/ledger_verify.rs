//! Offline verification of a ledger export (`archipel ledger verify`) and of proofs
//! (`archipel proof verify`): everything is checked against the genesis embedded in the export or
//! named by the proof, with no node involved.

use crate::genesis::Genesis;
use crate::ledger_api::{AnyProof, Proof};
use archipel_consensus::block::BlockCfg;
use archipel_consensus::engine::{ConsensusConfig, namespace, verify_finality};
use archipel_ledger::export::{self, Verified};
use archipel_ledger::{BlockHeader, ChainError};
use std::cell::OnceCell;

/// Length of a genesis hash in hex characters (BLAKE3, 32 bytes).
pub const GENESIS_HASH_HEX_LEN: usize = 64;

/// A genesis hash given by a user (`--genesis-hash`): exactly [`GENESIS_HASH_HEX_LEN`] hex
/// characters, returned in lowercase as [`Genesis::hash`] writes it. A prefix is refused: it
/// would let a different genesis with the same first digits through.
pub fn parse_genesis_hash(text: &str) -> Result<String, String> {
    let t = text.trim();
    if let Some(bad) = t.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("{bad:?} is not a hex digit"));
    }
    if t.len() != GENESIS_HASH_HEX_LEN {
        return Err(format!("it has {} hex characters, not {GENESIS_HASH_HEX_LEN}", t.len()));
    }
    Ok(t.to_ascii_lowercase())
}

/// The consensus parameters of a genesis: its validators and namespace.
pub fn consensus_config(genesis: &Genesis) -> ConsensusConfig {
    let validators = genesis.validators.iter().filter_map(|v| archipel_crypto::public_key(v).ok()).collect();
    ConsensusConfig::new(namespace(&genesis.hash()), validators, BlockCfg::from(&genesis.ledger))
}

/// Verifies an export: the canonical genesis, then per block its finality certificate by the
/// genesis validators, links, transaction root, signatures, full replay and state root.
pub fn verify_export(bytes: &[u8]) -> Result<(Genesis, Verified), ChainError> {
    verify_export_pinned(bytes, None)
}

/// [`verify_export`], also requiring the embedded genesis to have hash `expected` (from a genesis
/// file the auditor trusts). Without a pin, an altered genesis shows up at block 1, whose
/// certificate no longer matches the validators and namespace it implies.
pub fn verify_export_pinned(bytes: &[u8], expected: Option<&str>) -> Result<(Genesis, Verified), ChainError> {
    let genesis: OnceCell<(Genesis, ConsensusConfig)> = OnceCell::new();
    let checked_one = std::cell::Cell::new(false);
    let verified = export::verify(
        bytes,
        |g| {
            let parsed = Genesis::from_canonical(g)?;
            if let Some(expected) = expected
                && parsed.hash() != expected
            {
                return Err(format!(
                    "its hash is {}, not the trusted {expected}: the export is of another network (or its genesis was changed)",
                    parsed.hash()
                ));
            }
            let state = parsed.ledger_state();
            let cfg = consensus_config(&parsed);
            let _ = genesis.set((parsed, cfg));
            Ok(state)
        },
        |header: &BlockHeader, cert: &[u8]| {
            let (g, cfg) = genesis.get().ok_or("no genesis")?;
            let first = !checked_one.replace(true);
            verify_finality(cfg, &header.hash(), cert).map_err(|e| {
                if first {
                    format!(
                        "{e} (of genesis {}: if the genesis was altered, no certificate matches it)",
                        &g.hash()[..16]
                    )
                } else {
                    e
                }
            })
        },
    )?;
    let (genesis, _) = genesis.into_inner().ok_or(ChainError { height: 0, what: "no genesis".into() })?;
    Ok((genesis, verified))
}

/// What a proof shows once verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProofReport {
    /// `transaction` or `state`.
    pub kind: &'static str,
    /// Height of the block the proof is against.
    pub height: u64,
    /// The block hash.
    pub block: archipel_ledger::Hash,
    /// What is proven (transaction hash, or `key = value`).
    pub shows: String,
}

/// Verifies a proof from `GET /v1/proof/...` against `genesis`: the Merkle path up to the
/// header, and the header's finality certificate by the genesis validators.
pub fn verify_proof(genesis: &Genesis, proof: &AnyProof) -> Result<ProofReport, String> {
    let cfg = consensus_config(genesis);
    let check_header =
        |genesis_hash: &str, header: &BlockHeader, links: &[BlockHeader], cert_hex: &str| -> Result<(), String> {
            if genesis_hash != genesis.hash() {
                return Err(format!("the proof is for network {genesis_hash}, not this genesis {}", genesis.hash()));
            }
            if header.height == 0 {
                let expected = archipel_ledger::genesis_header(&genesis.ledger_state());
                return if *header == expected && links.is_empty() {
                    Ok(())
                } else {
                    Err("the header is not this genesis".into())
                };
            }
            // A block finalized as an ancestor is shown final by its descendants' hash links up to
            // a certified block.
            let mut last = *header;
            for l in links {
                if l.parent != last.hash() || l.height != last.height + 1 {
                    return Err(format!("link {} does not follow block {}", l.height, last.height));
                }
                last = *l;
            }
            let cert = hex::decode(cert_hex).map_err(|_| "the certificate is not hex".to_string())?;
            verify_finality(&cfg, &last.hash(), &cert)
                .map_err(|e| format!("block {} is not shown final: {e}", last.height))
        };
    match proof {
        AnyProof::Tx(Proof { genesis_hash, proof, links, certificate }) => {
            let h = proof.verify(&genesis.network_hash()).map_err(|e| e.to_string())?;
            check_header(genesis_hash, &proof.header, links, certificate)?;
            Ok(ProofReport {
                kind: "transaction",
                height: proof.header.height,
                block: proof.header.hash(),
                shows: h.to_string(),
            })
        }
        AnyProof::State(Proof { genesis_hash, proof, links, certificate }) => {
            let value = proof.verify().map_err(|e| e.to_string())?;
            check_header(genesis_hash, &proof.header, links, certificate)?;
            Ok(ProofReport {
                kind: "state",
                height: proof.header.height,
                block: proof.header.hash(),
                shows: match value {
                    Some(v) => format!("{} = {v}", proof.key),
                    None => format!("{} has no entry", proof.key),
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_genesis_hash_is_all_64_hex_digits() {
        let full = "ab".repeat(32);
        assert_eq!(parse_genesis_hash(&format!(" {} ", full.to_uppercase())), Ok(full.clone()));
        for bad in ["", "ab", &full[..63], &format!("{full}0"), &format!("{}zz", &full[..62])] {
            let e = parse_genesis_hash(bad).unwrap_err();
            assert!(e.contains("64") || e.contains("hex digit"), "{bad:?}: {e}");
        }
    }
}
