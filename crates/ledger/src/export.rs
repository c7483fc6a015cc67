//! The ledger export format and its offline verifier (`archipel ledger export` / `verify`).
//!
//! ```text
//! magic "ARCHIPEL-LEDGER\n" | version (1 byte)
//! genesis: length (u32 BE) | canonical genesis JSON
//! per block, heights 1, 2, …: length (u32 BE) | block | length (u32 BE) | finality certificate
//! ```
//!
//! Every byte is covered: the genesis must be in canonical form (so no whitespace can change), a
//! block's bytes are covered by its hash links, transaction root, signatures and state root, and
//! its certificate by the validators' signatures over the block hash. The certificate check and
//! the genesis parsing are passed in, so this crate stays free of consensus and node types.

use crate::block::{Block, BlockHeader, Signatures, execute, genesis_header};
use crate::state::State;
use crate::{ChainError, Hash};

/// The first bytes of an export.
pub const MAGIC: &[u8; 16] = b"ARCHIPEL-LEDGER\n";
/// The format version.
pub const VERSION: u8 = 1;

/// Appends one length-prefixed record.
pub fn put_record(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads one length-prefixed record of at most `max` bytes from `input` at `*at`.
pub fn take_record<'a>(input: &'a [u8], at: &mut usize, max: usize) -> Result<&'a [u8], String> {
    let len_bytes = input.get(*at..*at + 4).ok_or("truncated before a length field")?;
    let len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(format!("record of {len} bytes is larger than the {max} allowed"));
    }
    let body =
        input.get(*at + 4..*at + 4 + len).ok_or_else(|| format!("truncated: a {len}-byte record is cut short"))?;
    *at += 4 + len;
    Ok(body)
}

/// The export header and genesis.
pub fn start(genesis_json: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(VERSION);
    put_record(&mut out, genesis_json);
    out
}

/// Appends a block and its certificate (empty for a block finalized as the ancestor of a later
/// certified block).
pub fn push_block(out: &mut Vec<u8>, block_bytes: &[u8], certificate: &[u8]) {
    put_record(out, block_bytes);
    put_record(out, certificate);
}

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Number of blocks.
    pub blocks: u64,
    /// Number of transactions.
    pub transactions: u64,
    /// The last block's hash (the genesis header's if there are none).
    pub head: Hash,
    /// The state root after the last block.
    pub state_root: Hash,
    /// The state after the last block.
    pub state: State,
}

/// Largest record accepted (a block of the largest allowed size fits well below).
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// Verifies an export offline: the genesis (via `genesis`, which parses canonical JSON into the
/// first state), then per block its certificate (via `certificate`, given the header and the
/// certificate bytes), hash link, transaction root, every signature, a full replay and the state
/// root. Names the first bad block (height 0 = the genesis).
pub fn verify(
    input: &[u8],
    genesis: impl FnOnce(&[u8]) -> Result<State, String>,
    mut certificate: impl FnMut(&BlockHeader, &[u8]) -> Result<(), String>,
) -> Result<Verified, ChainError> {
    let at0 = |what: String| ChainError { height: 0, what };
    if input.len() < MAGIC.len() + 1 || &input[..MAGIC.len()] != MAGIC {
        return Err(at0("not an archipel ledger export (bad magic bytes)".into()));
    }
    if input[MAGIC.len()] != VERSION {
        return Err(at0(format!("export format version {} is not supported (expected {VERSION})", input[MAGIC.len()])));
    }
    let mut at = MAGIC.len() + 1;
    let genesis_bytes = take_record(input, &mut at, MAX_RECORD_BYTES).map_err(|e| at0(format!("genesis: {e}")))?;
    let mut state = genesis(genesis_bytes).map_err(|e| at0(format!("genesis: {e}")))?;
    let mut parent = genesis_header(&state);
    let (mut blocks, mut transactions) = (0u64, 0u64);
    // Blocks finalized as ancestors of a later finalized block carry no certificate of their own;
    // the next certificate proves them through the hash links that `execute` checks.
    let mut unproven: Option<u64> = None;
    while at < input.len() {
        let height = parent.height + 1;
        let bad = |what: String| ChainError { height, what };
        let block_bytes = take_record(input, &mut at, MAX_RECORD_BYTES).map_err(bad)?;
        let cert = take_record(input, &mut at, MAX_RECORD_BYTES).map_err(bad)?;
        let block = Block::from_bytes(block_bytes, state.params().max_block_txs as usize).map_err(bad)?;
        if block.header.height != height {
            return Err(bad(format!("the record holds height {}", block.header.height)));
        }
        if cert.is_empty() {
            unproven.get_or_insert(height);
        } else {
            certificate(&block.header, cert).map_err(|e| bad(format!("finality certificate: {e}")))?;
            unproven = None;
        }
        execute(&mut state, &parent, &block, Signatures::Verify)?;
        blocks += 1;
        transactions += block.txs.len() as u64;
        parent = block.header;
    }
    if let Some(height) = unproven {
        return Err(ChainError { height, what: "no finality certificate: none follows it in the export".into() });
    }
    Ok(Verified { blocks, transactions, head: parent.hash(), state_root: parent.state_root, state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::propose;
    use crate::state::tests::{genesis, transfer};

    /// A stand-in certificate: the block hash itself (the real one is a consensus certificate).
    fn cert(h: &BlockHeader) -> Vec<u8> {
        h.hash().0.to_vec()
    }

    fn check(h: &BlockHeader, c: &[u8]) -> Result<(), String> {
        if c == h.hash().0 { Ok(()) } else { Err("does not sign this block".into()) }
    }

    /// Three blocks; the second was finalized through the third (no certificate of its own).
    fn export() -> (Vec<u8>, Vec<usize>) {
        let mut s = genesis();
        let mut parent = genesis_header(&s);
        let mut out = start(b"genesis");
        let mut starts = Vec::new();
        for i in 0..3 {
            let p = propose(&s, &parent, 10 * (i + 1), [], [transfer(0, i, 1, 1)], Signatures::Verify).unwrap();
            starts.push(out.len());
            let c = if i == 1 { Vec::new() } else { cert(&p.block.header) };
            push_block(&mut out, &p.block.to_bytes(), &c);
            s = p.state;
            parent = p.block.header;
        }
        (out, starts)
    }

    fn parse(b: &[u8]) -> Result<State, String> {
        if b == b"genesis" { Ok(genesis()) } else { Err("not the canonical genesis".into()) }
    }

    #[test]
    fn every_single_byte_change_is_caught_with_the_right_height() {
        let (bytes, starts) = export();
        let ok = verify(&bytes, parse, check).unwrap();
        assert_eq!((ok.blocks, ok.transactions), (3, 3));
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            let e = verify(&t, parse, check).expect_err(&format!("byte {i} changed but the export verified"));
            let expected = starts.iter().filter(|s| **s <= i).count() as u64;
            assert_eq!(e.height, expected, "byte {i}: {e}");
        }
        // Truncation names the block that is cut.
        let e = verify(&bytes[..bytes.len() - 3], parse, check).unwrap_err();
        assert_eq!(e.height, 3);
        // Without the third block, nothing proves the second one final.
        let e = verify(&bytes[..starts[2]], parse, check).unwrap_err();
        assert_eq!(e.height, 2);
        assert!(e.what.contains("no finality certificate"), "{e}");
    }
}
