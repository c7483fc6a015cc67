//! Joining by state sync: how a node hands its committed state to a new or far-behind node, and
//! how that node checks it and starts from it instead of replaying every block since genesis.
//!
//! A **snapshot** is one byte stream: a header (magic, version, the height `H` and root the
//! serving node's state store is committed at), every entry of that state in the order of its key's
//! trie hash (the store's own order; a repeated key is refused), then the
//! finalized blocks `H..=C` where `C` is the first block at or above `H` with a finality
//! certificate of its own, then an end frame with both counts. Nothing in it is trusted:
//! [`Join::finish`] checks that the blocks link up by hash and that `C`'s certificate is signed by
//! a quorum of the genesis validators (so block `H` is final), and that the entries hash to block
//! `H`'s state root (rebuilding the trie, as every restart does). Only then are the blocks written
//! to a block log that starts at `H` ([`crate::FileStore::create_at`]) and the state made durable
//! at `H`; the chain opens from the two ([`Chain::open_with`]), replaying `H+1..=C`; marshal and simplex then start from `C` ([`crate::Chain::certified_tip`]).
//!
//! The joined node holds no block below `H` and no transaction index before it: `ledger export`
//! and old transactions are answered by archive nodes. `archipel ledger verify` on an export from
//! an archive node still replays everything from the genesis offline.

use crate::Chain;
use crate::engine::{ConsensusConfig, verify_finality};
use crate::store::{BlockStore, Record};
use archipel_ledger::export::{put_record, take_record};
use archipel_ledger::store::{Commit, StateStore, StoreError};
use archipel_ledger::{Block, Hash, State};
use std::sync::Arc;

/// First bytes of a snapshot.
pub const MAGIC: &[u8; 24] = b"archipel-state-snapshot\n";
/// The snapshot format this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest state key accepted.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Largest state value accepted.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest finality certificate accepted.
pub const MAX_CERTIFICATE_BYTES: usize = 64 * 1024;
/// Most blocks a snapshot may carry after its state (`H..=C`): a certified block comes within a
/// few blocks of any block on a live chain.
pub const MAX_BLOCKS: u64 = 4_096;
/// Entries imported into the store at a time (fewer when they are large: see
/// [`IMPORT_PAGE_BYTES`]).
const IMPORT_PAGE: usize = 4_096;
/// Bytes of entries held before they are imported.
const IMPORT_PAGE_BYTES: usize = 16 << 20;
/// Bytes of blocks a snapshot may carry (they are held until the end).
pub const MAX_BLOCK_BYTES_HELD: usize = 256 << 20;

const TAG_END: u8 = 0;
const TAG_ENTRY: u8 = 1;
const TAG_BLOCK: u8 = 2;
const HEAD_BYTES: usize = MAGIC.len() + 4 + 8 + 32;

/// The header of a snapshot of the state at `height` with root `root`.
pub fn head(height: u64, root: Hash) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&height.to_be_bytes());
    out.extend_from_slice(&root.0);
    out
}

/// Appends one state entry.
pub fn put_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.push(TAG_ENTRY);
    put_record(out, key);
    put_record(out, value);
}

/// Appends the blocks of `raw` (records as the block log and exports hold them: block, then
/// certificate) up to and with the first one that has a certificate; returns how many, and
/// whether one had.
pub fn put_blocks(out: &mut Vec<u8>, raw: &[u8]) -> Result<(u64, bool), String> {
    let (mut at, mut n) = (0, 0);
    while at < raw.len() {
        let block = take_record(raw, &mut at, usize::MAX)?;
        let certificate = take_record(raw, &mut at, usize::MAX)?;
        out.push(TAG_BLOCK);
        put_record(out, block);
        put_record(out, certificate);
        n += 1;
        if !certificate.is_empty() {
            return Ok((n, true));
        }
    }
    Ok((n, false))
}

/// The serving side: one committed state of a chain, read a page at a time (the store keeps it
/// while the chain goes on).
pub struct Source {
    snapshot: Box<dyn archipel_ledger::store::StateSnapshot>,
    height: u64,
    root: Hash,
    after: Option<Vec<u8>>,
    entries: u64,
    started: bool,
    done: bool,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("height", &self.height).field("entries", &self.entries).finish()
    }
}

impl Source {
    /// The state `chain` last committed to its store.
    pub fn new(chain: &Chain) -> Result<Self, String> {
        let snapshot = chain.state_snapshot()?;
        let Some(c) = snapshot.committed().filter(|c| c.height > 0) else {
            return Err("the state store holds no committed state past the genesis yet".into());
        };
        if c.height < chain.first_block() {
            return Err(format!("the state at {} is below the first block held ({})", c.height, chain.first_block()));
        }
        Ok(Source { snapshot, height: c.height, root: c.root, after: None, entries: 0, started: false, done: false })
    }

    /// The height of the state served.
    pub fn height(&self) -> u64 {
        self.height
    }

    /// The next part of the stream: the header, then up to `page` entries per call; `None` once
    /// every entry is out.
    pub fn next_entries(&mut self, page: usize) -> Result<Option<Vec<u8>>, String> {
        if self.done {
            return Ok(None);
        }
        let mut out = if self.started { Vec::new() } else { head(self.height, self.root) };
        self.started = true;
        let entries = self.snapshot.entries(self.after.as_deref(), page.max(1)).map_err(|e| e.to_string())?;
        match entries.last() {
            Some((k, _)) => self.after = Some(k.clone()),
            None => self.done = true,
        }
        for (k, v) in &entries {
            put_entry(&mut out, k, v);
        }
        self.entries += entries.len() as u64;
        Ok(Some(out))
    }

    /// The blocks from the state's height to the first certified one at or above it, and the
    /// end frame; `None` while no certificate covers the state's block yet.
    pub fn tail(&self, chain: &Chain) -> Result<Option<Vec<u8>>, String> {
        if self.height < chain.first_block() {
            return Err(format!("block {} was pruned while the snapshot was read: ask again", self.height));
        }
        // Block by block up to the first with a certificate: a handful on a live chain.
        let mut raw = Vec::new();
        for height in self.height..self.height.saturating_add(MAX_BLOCKS) {
            let Some((block, certificate)) = chain.block(height)? else { return Ok(None) };
            put_record(&mut raw, &block.to_bytes());
            put_record(&mut raw, &certificate);
            if !certificate.is_empty() {
                break;
            }
        }
        let mut out = Vec::new();
        let (blocks, certified) = put_blocks(&mut out, &raw)?;
        if !certified {
            return Ok(None);
        }
        put_end(&mut out, self.entries, blocks);
        Ok(Some(out))
    }
}

/// Appends the end frame.
pub fn put_end(out: &mut Vec<u8>, entries: u64, blocks: u64) {
    out.push(TAG_END);
    out.extend_from_slice(&entries.to_be_bytes());
    out.extend_from_slice(&blocks.to_be_bytes());
}

/// Reads a snapshot as it arrives, in pieces of any size, with every length bounded.
#[derive(Debug)]
struct Reader {
    buf: Vec<u8>,
    /// Height and root the header claims.
    head: Option<(u64, Hash)>,
    /// The trie hash of the last entry's key.
    last_key: Option<Hash>,
    entries: u64,
    blocks: Vec<Record>,
    /// Their bytes.
    block_bytes: usize,
    ended: bool,
    max_block_bytes: usize,
}

/// What [`Reader::frame`] found at the start of the buffer.
enum Frame {
    /// More bytes are needed.
    Partial,
    Entry(Vec<u8>, Vec<u8>),
    Block(Record),
    End {
        entries: u64,
        blocks: u64,
    },
}

impl Reader {
    /// A reader of a snapshot whose blocks are at most `max_block_bytes`.
    fn new(max_block_bytes: usize) -> Self {
        Reader {
            buf: Vec::new(),
            head: None,
            last_key: None,
            entries: 0,
            blocks: Vec::new(),
            block_bytes: 0,
            ended: false,
            max_block_bytes,
        }
    }

    /// The next frame at the start of `buf` and its length.
    fn frame(&self, buf: &[u8]) -> Result<(Frame, usize), String> {
        let Some(&tag) = buf.first() else { return Ok((Frame::Partial, 0)) };
        // A record whose length is known but whose bytes have not all arrived is partial; a
        // length above the limit is an error at once.
        let record = |at: &mut usize, max: usize, what: &str| -> Result<Option<Vec<u8>>, String> {
            let Some(len) = buf.get(*at..*at + 4) else { return Ok(None) };
            let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
            if len > max {
                return Err(format!("a {what} of {len} bytes is larger than the {max} allowed"));
            }
            let Some(body) = buf.get(*at + 4..*at + 4 + len) else { return Ok(None) };
            *at += 4 + len;
            Ok(Some(body.to_vec()))
        };
        let mut at = 1;
        let frame = match tag {
            TAG_ENTRY => {
                let Some(key) = record(&mut at, MAX_KEY_BYTES, "key")? else { return Ok((Frame::Partial, 0)) };
                let Some(value) = record(&mut at, MAX_VALUE_BYTES, "value")? else { return Ok((Frame::Partial, 0)) };
                Frame::Entry(key, value)
            }
            TAG_BLOCK => {
                let Some(block) = record(&mut at, self.max_block_bytes, "block")? else {
                    return Ok((Frame::Partial, 0));
                };
                let Some(certificate) = record(&mut at, MAX_CERTIFICATE_BYTES, "certificate")? else {
                    return Ok((Frame::Partial, 0));
                };
                Frame::Block(Record { block, certificate })
            }
            TAG_END => {
                let Some(counts) = buf.get(1..17) else { return Ok((Frame::Partial, 0)) };
                at = 17;
                Frame::End {
                    entries: u64::from_be_bytes(counts[..8].try_into().expect("8 bytes")),
                    blocks: u64::from_be_bytes(counts[8..].try_into().expect("8 bytes")),
                }
            }
            other => return Err(format!("unknown frame tag {other}")),
        };
        Ok((frame, at))
    }

    /// Takes `bytes`; returns the entries completed by them.
    fn push(&mut self, bytes: &[u8]) -> Result<archipel_ledger::store::Entries, String> {
        if self.ended && !bytes.is_empty() {
            return Err("bytes after the end of the snapshot".into());
        }
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        if self.head.is_none() {
            if self.buf.len() < HEAD_BYTES {
                let n = self.buf.len().min(MAGIC.len());
                if self.buf[..n] != MAGIC[..n] {
                    return Err("not a state snapshot (wrong magic)".into());
                }
                return Ok(Vec::new());
            }
            if &self.buf[..MAGIC.len()] != MAGIC {
                return Err("not a state snapshot (wrong magic)".into());
            }
            let version = u32::from_be_bytes(self.buf[24..28].try_into().expect("4 bytes"));
            if version != VERSION {
                return Err(format!("snapshot version {version}; this build reads version {VERSION}"));
            }
            let height = u64::from_be_bytes(self.buf[28..36].try_into().expect("8 bytes"));
            if height > u64::MAX / 2 {
                return Err(format!("height {height} is not a chain's"));
            }
            let root = Hash(self.buf[36..68].try_into().expect("32 bytes"));
            self.head = Some((height, root));
            at = HEAD_BYTES;
        }
        let mut entries = Vec::new();
        while at < self.buf.len() && !self.ended {
            let (frame, len) = self.frame(&self.buf[at..])?;
            match frame {
                Frame::Partial => break,
                Frame::Entry(key, value) => {
                    if !self.blocks.is_empty() {
                        return Err("a state entry after the blocks".into());
                    }
                    let h = archipel_ledger::trie::key_hash(&key);
                    if self.last_key.is_some_and(|last| last >= h) {
                        return Err(format!(
                            "entry {} is not in key-hash order (repeated or out of order)",
                            String::from_utf8_lossy(&key)
                        ));
                    }
                    self.last_key = Some(h);
                    self.entries += 1;
                    entries.push((key, value));
                }
                Frame::Block(record) => {
                    if self.blocks.len() as u64 >= MAX_BLOCKS {
                        return Err(format!("more than {MAX_BLOCKS} blocks after the state"));
                    }
                    self.block_bytes += record.block.len() + record.certificate.len();
                    if self.block_bytes > MAX_BLOCK_BYTES_HELD {
                        return Err(format!("more than {MAX_BLOCK_BYTES_HELD} bytes of blocks after the state"));
                    }
                    self.blocks.push(record);
                }
                Frame::End { entries: n, blocks } => {
                    if n != self.entries || blocks != self.blocks.len() as u64 {
                        return Err(format!(
                            "the end frame counts {n} entries and {blocks} blocks, the stream held {} and {}",
                            self.entries,
                            self.blocks.len()
                        ));
                    }
                    self.ended = true;
                }
            }
            at += len;
        }
        self.buf.drain(..at);
        if self.ended && !self.buf.is_empty() {
            return Err("bytes after the end of the snapshot".into());
        }
        Ok(entries)
    }
}

/// A join in progress: a snapshot read into an emptied state store, checked when it ends.
pub struct Join {
    genesis_state: State,
    cfg: ConsensusConfig,
    states: Arc<dyn StateStore>,
    reader: Reader,
    page: archipel_ledger::store::Entries,
    page_bytes: usize,
}

impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Join").field("head", &self.reader.head).field("entries", &self.reader.entries).finish()
    }
}

/// What a join did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The height of the state taken (the block log's first block).
    pub height: u64,
    /// Entries in it.
    pub entries: u64,
    /// The certified block the log reaches (the chain opens there).
    pub certified: u64,
}

fn failed(e: StoreError) -> String {
    format!("the state store failed: {e}")
}

impl Join {
    /// Starts a join into `states`, which is cleared first (what it held is replaced).
    pub fn new(genesis_state: State, cfg: ConsensusConfig, states: Arc<dyn StateStore>) -> Result<Self, String> {
        states.clear().map_err(failed)?;
        let reader = Reader::new(genesis_state.params().max_block_bytes as usize);
        Ok(Join { genesis_state, cfg, states, reader, page: Vec::new(), page_bytes: 0 })
    }

    /// Takes the next bytes of the snapshot; entries go to the store a page at a time.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), String> {
        let entries = self.reader.push(bytes)?;
        self.page_bytes += entries.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        self.page.extend(entries);
        if self.page.len() >= IMPORT_PAGE || self.page_bytes >= IMPORT_PAGE_BYTES {
            self.states.import(&std::mem::take(&mut self.page)).map_err(failed)?;
            self.page_bytes = 0;
        }
        Ok(())
    }

    /// Whether the snapshot's end frame has arrived (nothing more may follow).
    pub fn ended(&self) -> bool {
        self.reader.ended
    }

    /// The height and root the snapshot's header claims, once it has arrived.
    pub fn claimed(&self) -> Option<(u64, Hash)> {
        self.reader.head
    }

    /// Entries read so far.
    pub fn entries(&self) -> u64 {
        self.reader.entries
    }

    /// Checks the whole snapshot (see the module's documentation), writes its blocks to `log` (an
    /// empty log starting at the snapshot's height, see [`Join::claimed`]) and commits its state.
    /// The chain then opens from the two ([`Chain::open_with`]), replaying the blocks after the
    /// state. On an error the store is cleared again; `log` is the caller's to remove.
    pub fn finish(mut self, log: &mut dyn BlockStore) -> Result<Joined, String> {
        let result = self.check_and_commit(log);
        if result.is_err() {
            let _ = self.states.clear();
        }
        result
    }

    fn check_and_commit(&mut self, log: &mut dyn BlockStore) -> Result<Joined, String> {
        let Some((height, claimed_root)) = self.reader.head else { return Err("the snapshot is empty".into()) };
        if !self.reader.ended {
            return Err(format!("the snapshot ended early, after {} entries", self.reader.entries));
        }
        if height == 0 {
            return Err("the snapshot is of the genesis state: nothing to sync".into());
        }
        if height > u64::MAX - MAX_BLOCKS {
            return Err(format!("height {height} is not a chain's"));
        }
        self.states.import(&std::mem::take(&mut self.page)).map_err(failed)?;
        let max_txs = self.genesis_state.params().max_block_txs as usize;
        let mut headers = Vec::new();
        for (i, record) in self.reader.blocks.iter().enumerate() {
            let block =
                Block::from_bytes(&record.block, max_txs).map_err(|e| format!("block {i} of the snapshot: {e}"))?;
            let h = block.header;
            let want = height + i as u64;
            if h.height != want {
                return Err(format!("the snapshot's block {i} is at height {}, not {want}", h.height));
            }
            // The header is what the certificates sign: the body must be the one it names.
            if h.tx_root != archipel_ledger::block::tx_root(&block.txs)
                || h.liveness_root != archipel_ledger::liveness_root(&block.liveness)
            {
                return Err(format!("block {}'s body does not match its header", h.height));
            }
            if let Some(parent) = headers.last().map(archipel_ledger::BlockHeader::hash)
                && h.parent != parent
            {
                return Err(format!("block {} does not link to block {}", h.height, h.height - 1));
            }
            if !record.certificate.is_empty() {
                verify_finality(&self.cfg, &h.hash(), &record.certificate)
                    .map_err(|e| format!("block {}'s finality certificate: {e}", h.height))?;
            }
            headers.push(h);
        }
        let Some(last) = self.reader.blocks.last() else {
            return Err("the snapshot holds no blocks to show its state final".into());
        };
        if last.certificate.is_empty() {
            return Err(format!(
                "the snapshot's last block {} has no finality certificate: nothing shows its state final",
                height + headers.len() as u64 - 1
            ));
        }
        let root = headers[0].state_root;
        if root != claimed_root {
            return Err(format!(
                "the snapshot claims root {} but final block {height} has state root {}",
                claimed_root.short(),
                root.short()
            ));
        }
        if log.first() != height || log.height() != height - 1 {
            return Err(format!("the new block log must be empty and start at {height}"));
        }
        // The commit naming the state's height comes last: a crash before it leaves entries
        // without a height, which the next start clears.
        self.states.commit(&Commit { height, root, ..Commit::default() }, false).map_err(failed)?;
        // The entries must hash to the final root: rebuilding the trie from them checks it.
        match State::open(self.states.clone()) {
            Ok(Some(_)) => {}
            Ok(None) => return Err("the state store lost the snapshot's commit".into()),
            Err(StoreError::Corrupt(e)) => {
                return Err(format!("the snapshot's entries are not the final state at {height}: {e}"));
            }
            Err(e) => return Err(failed(e)),
        }
        for record in &self.reader.blocks {
            log.append(record)?;
        }
        let synced = futures::executor::block_on(log.sync()).map_err(|_| "the block log's sync was dropped")??;
        if synced < log.height() {
            return Err(format!("the block log synced to {synced}, below its height {}", log.height()));
        }
        // Durable only now that the log holding its block is: a store is never ahead of its log.
        self.states.flush().map_err(failed)?;
        Ok(Joined { height, entries: self.reader.entries, certified: log.height() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockCfg;
    use crate::engine::sign_finality;
    use crate::store::MemoryStore;
    use archipel_crypto::Identity;
    use archipel_ledger::store::MemoryStore as MemoryStates;
    use archipel_ledger::{GenesisState, Payload, SignedTransaction, Transaction};
    use commonware_cryptography::Signer as _;
    use commonware_cryptography::ed25519::PrivateKey;

    fn genesis() -> State {
        let accounts = (0..3).map(|i| (Identity::from_seed(i).node_id(), 1_000_000)).collect();
        State::genesis(GenesisState { accounts, ..GenesisState::default() })
    }

    fn validators() -> (ConsensusConfig, Vec<PrivateKey>) {
        let keys: Vec<PrivateKey> = (0..4).map(PrivateKey::from_seed).collect();
        let cfg = ConsensusConfig::new(
            b"join-test".to_vec(),
            keys.iter().map(|k| k.public_key()).collect(),
            BlockCfg::from(genesis().params()),
        );
        (cfg, keys)
    }

    fn transfer(nonce: u64) -> SignedTransaction {
        let id = Identity::from_seed(0);
        let to = Identity::from_seed(1).node_id();
        Transaction { signer: id.node_id(), nonce, payload: Payload::Transfer { to, amount_micro: 1 } }
            .sign(&id, &Hash::ZERO)
    }

    /// Grows `chain` by `n` blocks of one transfer each; every 5th block gets a real finality
    /// certificate, the others none (final as its ancestors). Returns the blocks and their
    /// certificates.
    fn grow(chain: &Chain, n: u64) -> Vec<(Block, Vec<u8>)> {
        let (cfg, keys) = validators();
        let mut out = Vec::new();
        for _ in 0..n {
            let head = chain.head();
            let now = 1_000 * (head.height + 1);
            chain.submit(transfer(head.height), 100, now).unwrap();
            let block = chain.build(&head.hash(), now, |_| Vec::new()).unwrap();
            let height = block.header.height;
            let certificate = if height.is_multiple_of(5) {
                sign_finality(&cfg, &keys[..3], &block.hash(), height).expect("a quorum signs")
            } else {
                Vec::new()
            };
            chain.finalize_known(&block.hash(), certificate.clone()).unwrap().expect("finalized");
            out.push((block, certificate));
        }
        out
    }

    fn serve(chain: &Chain) -> Vec<u8> {
        let mut source = Source::new(chain).unwrap();
        let mut out = Vec::new();
        while let Some(part) = source.next_entries(3).unwrap() {
            out.extend(part);
        }
        out.extend(source.tail(chain).unwrap().expect("a certified block covers the state"));
        out
    }

    fn join(bytes: &[u8], states: &MemoryStates) -> Result<Chain, String> {
        let (cfg, _) = validators();
        let mut join = Join::new(genesis(), cfg, Arc::new(states.clone()))?;
        for piece in bytes.chunks(7) {
            join.push(piece)?;
        }
        let first = join.claimed().map_or(1, |(h, _)| h);
        let mut log = MemoryStore::starting_at(first);
        let joined = join.finish(&mut log)?;
        assert_eq!(joined.height, first);
        Chain::open_with(genesis(), Box::new(log), Arc::new(states.clone()))
    }

    /// `joined` (at block 35 of [`served_chain`]) takes the served chain's blocks 36 to its head,
    /// then `more` new ones, each executed with its signatures checked: the same block gives the
    /// same state root every time.
    fn follow(joined: &Chain, served: &Chain, more: u64) {
        for height in 36..=served.head().height {
            let (block, certificate) = served.block(height).unwrap().unwrap();
            joined.finalize(block, certificate).unwrap().expect("applies");
        }
        for (block, certificate) in grow(served, more) {
            let header = block.header;
            joined.finalize(block, certificate).unwrap().expect("applies");
            assert_eq!(joined.head(), header, "same block, same state root");
            assert_eq!(joined.with_state(State::state_root), header.state_root);
        }
    }

    fn served_chain() -> Chain {
        let chain = Chain::open_with(genesis(), Box::new(MemoryStore::default()), Arc::new(MemoryStates::default()))
            .unwrap()
            .with_checkpoint_every(16);
        grow(&chain, 38);
        // The checkpoint at 32 runs on the commit thread.
        chain.wait_for_commit().unwrap();
        chain
    }

    #[test]
    fn a_joined_chain_starts_at_the_snapshot_and_agrees_on_every_later_root() {
        let served = served_chain();
        // The store was last committed at the checkpoint at 32; block 35 is the first certified
        // one above it.
        let bytes = serve(&served);
        let states = MemoryStates::default();
        let joined = join(&bytes, &states).unwrap();
        assert_eq!(joined.first_block(), 32);
        assert_eq!(joined.opened(), crate::Opened { state_height: 32, replayed: 3 });
        assert_eq!(joined.head(), served.block(35).unwrap().unwrap().0.header);
        assert_eq!(joined.certified_tip().unwrap().map(|(b, _)| b.header.height), Some(35));
        assert_eq!(joined.block(31).unwrap(), None, "nothing below the snapshot");
        // It follows the chain from there: blocks 36.. executed (signatures checked) agree on
        // every root with the chain that replayed from the genesis.
        follow(&joined, &served, 40);
        assert_eq!(joined.with_state(State::state_root), served.with_state(State::state_root));
        // A restart opens what it stored, and still knows where its log starts.
        joined.close().unwrap();
        let log = {
            // Rebuild a log holding what the joined chain holds, from its own reads.
            let log = MemoryStore::starting_at(32);
            let mut l = log.clone();
            for h in 32..=joined.head().height {
                let (b, c) = joined.block(h).unwrap().unwrap();
                l.append(&Record { block: b.to_bytes(), certificate: c }).unwrap();
            }
            log
        };
        drop(joined);
        let reopened = Chain::open_with(genesis(), Box::new(log), Arc::new(states.clone())).unwrap();
        assert_eq!(reopened.head(), served.head());
        assert_eq!(reopened.opened().replayed, 0);
        // Without its state, a joined node cannot rebuild one: it is told to join again.
        let err =
            Chain::open_with(genesis(), Box::new(MemoryStore::starting_at(32)), Arc::new(MemoryStates::default()))
                .unwrap_err();
        assert!(err.contains("--join"), "{err}");
    }

    #[test]
    fn a_join_onto_the_node_s_disk_stores_agrees_on_every_root_after_a_reopen() {
        let served = served_chain();
        let bytes = serve(&served);
        let dir = tempfile::tempdir().unwrap();
        let (log_path, state_path) = (dir.path().join("blocks.log"), dir.path().join("state.redb"));
        let states = Arc::new(crate::state_db::StateDb::open(&state_path).unwrap());
        let (cfg, _) = validators();
        let mut join = Join::new(genesis(), cfg, states.clone()).unwrap();
        for piece in bytes.chunks(1_000) {
            join.push(piece).unwrap();
        }
        let first = join.claimed().unwrap().0;
        let mut log = crate::FileStore::create_at(&log_path, first).unwrap();
        assert_eq!(join.finish(&mut log).unwrap().height, 32);
        drop(log);
        drop(states);
        // As the node does: everything reopened from the files.
        let open = || {
            let log = crate::FileStore::open(&log_path).unwrap();
            let states = Arc::new(crate::state_db::StateDb::open(&state_path).unwrap());
            Chain::open_with(genesis(), Box::new(log), states).unwrap()
        };
        let joined = open();
        assert_eq!((joined.first_block(), joined.head().height), (32, 35));
        follow(&joined, &served, 20);
        joined.close().unwrap();
        drop(joined);
        let reopened = open();
        assert_eq!(reopened.head(), served.head());
        assert_eq!(reopened.opened().replayed, 0);
    }

    #[test]
    fn a_snapshot_that_does_not_check_out_is_refused_and_leaves_no_state() {
        let served = served_chain();
        let good = serve(&served);
        let states = MemoryStates::default();
        let refused = |bytes: &[u8]| {
            let err = join(bytes, &states).unwrap_err();
            assert_eq!(states.committed().unwrap(), None, "nothing stays committed after: {err}");
            err
        };
        // One entry's value changed (same length): the entries miss the final root.
        let mut bad = good.clone();
        let at = bad.windows(8).position(|w| w == b"account/").expect("an account entry");
        let value_at = at + 8 + 64 + 4;
        bad[value_at] ^= 1;
        let err = refused(&bad);
        assert!(err.contains("not the final state at 32"), "{err}");
        // A header claiming another root.
        let mut bad = good.clone();
        bad[40] ^= 1;
        assert!(refused(&bad).contains("claims root"));
        // Cut short.
        assert!(refused(&good[..good.len() - 3]).contains("ended early"));
        // A certificate that is not a quorum's: the last block's certificate signed by too few.
        let (cfg, keys) = validators();
        let (block35, _) = served.block(35).unwrap().unwrap();
        assert_eq!(sign_finality(&cfg, &keys[..1], &block35.hash(), 35), None, "one signer is no quorum");
        let foreign: Vec<PrivateKey> = (10..13).map(PrivateKey::from_seed).collect();
        let other = ConsensusConfig::new(
            b"join-test".to_vec(),
            foreign.iter().map(|k| k.public_key()).collect(),
            BlockCfg::from(genesis().params()),
        );
        let forged = sign_finality(&other, &foreign, &block35.hash(), 35).unwrap();
        let mut source = Source::new(&served).unwrap();
        let mut bytes = Vec::new();
        while let Some(part) = source.next_entries(100).unwrap() {
            bytes.extend(part);
        }
        let mut raw = Vec::new();
        for h in 32..=35 {
            let (b, c) = served.block(h).unwrap().unwrap();
            put_record(&mut raw, &b.to_bytes());
            put_record(&mut raw, if h == 35 { &forged } else { &c });
        }
        let (n, _) = put_blocks(&mut bytes, &raw).unwrap();
        put_end(&mut bytes, source.entries, n);
        assert!(refused(&bytes).contains("finality certificate"));
        // Blocks whose bodies are not the ones their (certified) headers name; no blocks; a last
        // block without a certificate.
        let with_blocks = |records: &[(Vec<u8>, Vec<u8>)]| {
            let mut out = Vec::new();
            let mut source = Source::new(&served).unwrap();
            while let Some(part) = source.next_entries(100).unwrap() {
                out.extend(part);
            }
            let mut raw = Vec::new();
            for (b, c) in records {
                put_record(&mut raw, b);
                put_record(&mut raw, c);
            }
            let (n, _) = put_blocks(&mut out, &raw).unwrap();
            assert_eq!(n, records.len() as u64, "no certified block before the last");
            put_end(&mut out, source.entries, n);
            out
        };
        let record = |h: u64| {
            let (b, c) = served.block(h).unwrap().unwrap();
            (b.to_bytes(), c)
        };
        let mut forged = served.block(33).unwrap().unwrap().0;
        forged.txs = served.block(34).unwrap().unwrap().0.txs;
        let bodies = [record(32), (forged.to_bytes(), Vec::new()), record(34), record(35)];
        assert!(refused(&with_blocks(&bodies)).contains("body does not match its header"));
        assert!(refused(&with_blocks(&[])).contains("no blocks"));
        assert!(refused(&with_blocks(&[record(32), record(33)])).contains("no finality certificate"));
        // And the good one still joins after all that.
        assert!(join(&good, &states).is_ok());
    }

    fn reader() -> Reader {
        Reader::new(1024)
    }

    fn sample() -> Vec<u8> {
        let mut out = head(7, Hash([3; 32]));
        put_entry(&mut out, b"account/a", b"1");
        put_entry(&mut out, b"account/b", b"22");
        let mut raw = Vec::new();
        put_record(&mut raw, b"block-bytes");
        put_record(&mut raw, b"");
        assert_eq!(put_blocks(&mut out, &raw).unwrap(), (1, false));
        put_end(&mut out, 2, 1);
        out
    }

    #[test]
    fn a_snapshot_reads_the_same_in_pieces_of_any_size() {
        let bytes = sample();
        for piece in [1, 2, 5, 13, bytes.len()] {
            let mut r = reader();
            let mut entries = Vec::new();
            for chunk in bytes.chunks(piece) {
                entries.extend(r.push(chunk).unwrap());
            }
            assert!(r.ended, "piece {piece}");
            assert_eq!(r.head, Some((7, Hash([3; 32]))));
            assert_eq!(entries, vec![(b"account/a".to_vec(), b"1".to_vec()), (b"account/b".to_vec(), b"22".to_vec())]);
            assert_eq!(r.blocks, vec![Record { block: b"block-bytes".to_vec(), certificate: Vec::new() }]);
        }
    }

    #[test]
    fn bad_snapshots_are_named_errors() {
        let err = |bytes: &[u8]| reader().push(bytes).unwrap_err();
        assert!(err(b"GET / HTTP/1.1\r\n").contains("wrong magic"));
        let mut v2 = head(7, Hash::ZERO);
        v2[27] = 2;
        assert!(err(&v2).contains("version 2"));
        // Out of order, or the same key twice.
        let mut dup = head(7, Hash::ZERO);
        let mut keys = [&b"a"[..], b"b"];
        keys.sort_by_key(|k| std::cmp::Reverse(archipel_ledger::trie::key_hash(k)));
        put_entry(&mut dup, keys[0], b"1");
        put_entry(&mut dup, keys[1], b"1");
        assert!(err(&dup).contains("key-hash order"));
        let mut twice = head(7, Hash::ZERO);
        put_entry(&mut twice, b"a", b"1");
        put_entry(&mut twice, b"a", b"2");
        assert!(err(&twice).contains("key-hash order"));
        // A length above its limit is refused before its bytes arrive.
        let mut huge = head(7, Hash::ZERO);
        huge.push(TAG_ENTRY);
        huge.extend_from_slice(&(MAX_KEY_BYTES as u32 + 1).to_be_bytes());
        assert!(err(&huge).contains("larger than"));
        let mut tag = head(7, Hash::ZERO);
        tag.push(9);
        assert!(err(&tag).contains("unknown frame tag 9"));
        // Counts that do not match, and anything after the end.
        let mut counts = head(7, Hash::ZERO);
        put_entry(&mut counts, b"a", b"1");
        put_end(&mut counts, 5, 0);
        assert!(err(&counts).contains("counts 5 entries"));
        let mut after = sample();
        after.push(0);
        assert!(err(&after).contains("after the end"));
        let mut late = head(7, Hash::ZERO);
        let mut raw = Vec::new();
        put_record(&mut raw, b"b");
        put_record(&mut raw, b"");
        put_blocks(&mut late, &raw).unwrap();
        put_entry(&mut late, b"a", b"1");
        assert!(err(&late).contains("after the blocks"));
    }
}
