//! The node's data directory and the marker that ties it to one network and one node.
//!
//! On first start the node writes `network.json` (network name, genesis hash, node id). On every
//! later start the marker must match, so a node never mixes state of two networks or identities.

use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Marker file name inside the data directory.
pub const MARKER: &str = "network.json";

/// Admissions of nodes that joined after genesis, kept across restarts.
pub const ADMISSIONS: &str = "admissions.json";

/// Reads the stored admissions (none if the file does not exist).
pub fn load_admissions(dir: &Path) -> Result<Vec<archipel_crypto::Admission>, DataDirError> {
    let path = dir.join(ADMISSIONS);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DataDirError::Io {
            dir: dir.to_path_buf(),
            message: format!("{ADMISSIONS} is corrupt ({e}); move it aside — peers will send the admissions again"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(DataDirError::Io { dir: dir.to_path_buf(), message: format!("cannot read {ADMISSIONS}: {e}") }),
    }
}

/// Replaces the stored admissions atomically.
pub fn save_admissions(dir: &Path, admissions: &[archipel_crypto::Admission]) -> Result<(), DataDirError> {
    let io = |m: String| DataDirError::Io { dir: dir.to_path_buf(), message: m };
    let text = serde_json::to_vec_pretty(admissions).map_err(|e| io(e.to_string()))?;
    let tmp = dir.join(format!("{ADMISSIONS}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, dir.join(ADMISSIONS)))
        .map_err(|e| io(format!("cannot write {ADMISSIONS}: {e}")))
}

/// What a data directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDirMarker {
    /// Network name.
    pub network: String,
    /// Genesis hash.
    pub genesis_hash: String,
    /// The node the directory belongs to.
    pub node_id: NodeId,
}

/// A data directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory belongs to another network.
    #[error(
        "data directory {dir} belongs to network {found_network:?} (genesis {found_hash}), but this node's genesis is {expected_network:?} ({expected_hash}): use the genesis that created it, or a fresh --data-dir"
    )]
    OtherNetwork {
        /// The directory.
        dir: PathBuf,
        /// Its network.
        found_network: String,
        /// Its genesis hash (short).
        found_hash: String,
        /// Our network.
        expected_network: String,
        /// Our genesis hash (short).
        expected_hash: String,
    },
    /// The directory belongs to another node key.
    #[error(
        "data directory {dir} belongs to node {found}, but this node's key is {expected}: use that node's key file, or a fresh --data-dir"
    )]
    OtherNode {
        /// The directory.
        dir: PathBuf,
        /// Its node.
        found: String,
        /// Our node.
        expected: String,
    },
    /// Cannot create, read or parse.
    #[error("data directory {dir}: {message}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Opens (creating if needed) `dir` for `expected`, refusing a directory of another network or node.
pub fn open(dir: &Path, expected: &DataDirMarker) -> Result<(), DataDirError> {
    let io = |m: String| DataDirError::Io { dir: dir.to_path_buf(), message: m };
    std::fs::create_dir_all(dir).map_err(|e| io(format!("cannot create it: {e}")))?;
    let path = dir.join(MARKER);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let found: DataDirMarker = serde_json::from_slice(&bytes)
                .map_err(|e| io(format!("{MARKER} is corrupt ({e}); it was not written by archipel or was damaged — move the directory aside")))?;
            if found.genesis_hash != expected.genesis_hash || found.network != expected.network {
                return Err(DataDirError::OtherNetwork {
                    dir: dir.to_path_buf(),
                    found_network: found.network,
                    found_hash: found.genesis_hash.chars().take(12).collect(),
                    expected_network: expected.network.clone(),
                    expected_hash: expected.genesis_hash.chars().take(12).collect(),
                });
            }
            if found.node_id != expected.node_id {
                return Err(DataDirError::OtherNode {
                    dir: dir.to_path_buf(),
                    found: found.node_id.short(),
                    expected: expected.node_id.short(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_vec_pretty(expected).map_err(|e| io(e.to_string()))?;
            let tmp = dir.join(format!("{MARKER}.tmp"));
            std::fs::write(&tmp, text)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| io(format!("cannot write {MARKER}: {e}")))
        }
        Err(e) => Err(io(format!("cannot read {MARKER}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_then_refuses_other_networks_and_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let m = DataDirMarker { network: "a".into(), genesis_hash: "h1".into(), node_id: NodeId([1; 32]) };
        open(dir.path(), &m).unwrap();
        open(dir.path(), &m).unwrap();
        let other = DataDirMarker { genesis_hash: "h2".into(), ..m.clone() };
        let err = open(dir.path(), &other).unwrap_err();
        assert!(matches!(err, DataDirError::OtherNetwork { .. }), "{err}");
        let other = DataDirMarker { node_id: NodeId([2; 32]), ..m.clone() };
        assert!(matches!(open(dir.path(), &other), Err(DataDirError::OtherNode { .. })));
        // The marker was not changed by the refused opens.
        let kept: DataDirMarker = serde_json::from_slice(&std::fs::read(dir.path().join(MARKER)).unwrap()).unwrap();
        assert_eq!(kept, m);
        std::fs::write(dir.path().join(MARKER), "garbage").unwrap();
        assert!(open(dir.path(), &m).unwrap_err().to_string().contains("corrupt"));
    }
}
