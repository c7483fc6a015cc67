//! Ed25519 identities and their key files.
//!
//! A key file holds the 32-byte secret seed as hex under a comment line. It is created with mode
//! 0600, never overwritten, and refused when other users could read it.

use crate::CryptoError;
use archipel_types::NodeId;
use commonware_codec::{DecodeExt, Encode};
use commonware_cryptography::{BatchEntry, BatchVerifier, Signer, Verifier, ed25519};
use commonware_math::algebra::Random;
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

const HEADER: &str = "# archipel Ed25519 secret key: keep it private, never share or commit it";

/// A problem with a key file, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// No file at the path.
    #[error("key file {0} does not exist: create one with `archipel key gen --out {0}`")]
    Missing(PathBuf),
    /// The file exists but cannot be read.
    #[error("cannot read key file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a key file.
    #[error("key file {path} is corrupt: {reason}; restore it from backup (a new key is a new identity)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file is readable by other users.
    #[error("key file {path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Refusing to replace an existing key.
    #[error(
        "key file {0} already exists: refusing to overwrite an identity; choose another path or delete it yourself"
    )]
    Exists(PathBuf),
    /// Writing the file failed.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An Ed25519 signing identity (a node's or a tenant's).
#[derive(Clone, Debug)]
pub struct Identity {
    key: ed25519::PrivateKey,
}

impl Identity {
    /// A fresh identity from the operating system's randomness.
    pub fn generate() -> Self {
        Self { key: ed25519::PrivateKey::random(rand::rng()) }
    }

    /// A deterministic identity for tests and simulations. Never use for real keys.
    pub fn from_seed(seed: u64) -> Self {
        Self { key: ed25519::PrivateKey::from_seed(seed) }
    }

    /// The identity of a commonware key (as consensus holds it).
    pub fn from_private_key(key: ed25519::PrivateKey) -> Self {
        Self { key }
    }

    /// The public key as a node id.
    pub fn node_id(&self) -> NodeId {
        let pk = self.key.public_key();
        let mut out = [0u8; 32];
        out.copy_from_slice(pk.as_ref());
        NodeId(out)
    }

    /// The commonware key, for wiring into p2p.
    pub fn private_key(&self) -> &ed25519::PrivateKey {
        &self.key
    }

    /// A 32-byte secret derived from this key for one purpose (`context` names it, e.g.
    /// `"archipel 2026 object key wrapping"`): the key never leaves, and secrets for different
    /// purposes are unrelated.
    pub fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.key.encode()[..])
    }

    /// Signs `msg` under `namespace`.
    pub fn sign(&self, namespace: &[u8], msg: &[u8]) -> [u8; 64] {
        let sig = self.key.sign(namespace, msg);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }

    /// Loads a key file, refusing missing, corrupt or world-readable files.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyFileError::Missing(path.to_path_buf()));
            }
            Err(source) => return Err(KeyFileError::Unreadable { path: path.to_path_buf(), source }),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::TooOpen { path: path.to_path_buf(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::InvalidData => {
                KeyFileError::Corrupt { path: path.to_path_buf(), reason: "it is not text".into() }
            }
            _ => KeyFileError::Unreadable { path: path.to_path_buf(), source },
        })?;
        Self::parse(&text).map_err(|reason| KeyFileError::Corrupt { path: path.to_path_buf(), reason })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let hex_line = lines.next().ok_or("it holds no key")?;
        if lines.next().is_some() {
            return Err("it has more than one key line".into());
        }
        let mut seed = [0u8; 32];
        hex::decode_to_slice(hex_line, &mut seed)
            .map_err(|_| format!("expected 64 hex characters, found {} characters", hex_line.len()))?;
        let key = ed25519::PrivateKey::decode(seed.to_vec()).map_err(|e| format!("not an Ed25519 key: {e}"))?;
        Ok(Self { key })
    }

    /// Writes the key to a new file with mode 0600. Never overwrites.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| KeyFileError::Write { path: path.to_path_buf(), source })?;
        }
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|source| {
            match source.kind() {
                std::io::ErrorKind::AlreadyExists => KeyFileError::Exists(path.to_path_buf()),
                _ => KeyFileError::Write { path: path.to_path_buf(), source },
            }
        })?;
        let seed = self.key.encode();
        let body = format!("{HEADER}\n{}\n", hex::encode(&seed[..]));
        file.write_all(body.as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(|source| KeyFileError::Write { path: path.to_path_buf(), source })
    }
}

/// Turns a node id into a commonware public key, rejecting points that are not valid keys.
pub fn public_key(id: &NodeId) -> Result<ed25519::PublicKey, CryptoError> {
    decoded_key(&mut KEYS.lock().unwrap_or_else(std::sync::PoisonError::into_inner), id)
}

/// Most keys decoded at once before [`KEYS`] starts over (~200 bytes each).
const KEY_CACHE_ENTRIES: usize = 1 << 16;

/// Keys already decoded. Decoding decompresses a curve point, a third of what checking a
/// signature costs, and the same accounts sign transaction after transaction.
static KEYS: LazyLock<Mutex<HashMap<NodeId, ed25519::PublicKey>>> = LazyLock::new(Default::default);

fn decoded_key(
    cache: &mut HashMap<NodeId, ed25519::PublicKey>,
    id: &NodeId,
) -> Result<ed25519::PublicKey, CryptoError> {
    if let Some(pk) = cache.get(id) {
        return Ok(pk.clone());
    }
    let pk = ed25519::PublicKey::decode(id.as_bytes().to_vec()).map_err(|_| CryptoError::BadPublicKey(id.short()))?;
    if cache.len() >= KEY_CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(*id, pk.clone());
    Ok(pk)
}

/// Verifies `sig` over `msg` under `namespace` by `signer`.
pub fn verify_signature(signer: &NodeId, namespace: &[u8], msg: &[u8], sig: &[u8; 64]) -> Result<(), CryptoError> {
    let pk = public_key(signer)?;
    let sig = ed25519::Signature::decode(sig.to_vec()).map_err(|_| CryptoError::BadSignature(signer.short()))?;
    if pk.verify(namespace, msg, &sig) { Ok(()) } else { Err(CryptoError::BadSignature(signer.short())) }
}

/// One signature to check in a batch: signer, signed message, signature.
pub type SignatureItem<'a> = (&'a NodeId, &'a [u8], &'a [u8; 64]);

/// Checks every signature in `items` (all under `namespace`) as one batch: a single
/// multi-scalar equation, about twice as fast per signature as checking each alone. False if any
/// is bad, a key is malformed or `items` is empty: check them one by one to find which.
pub fn verify_signatures(namespace: &[u8], items: &[SignatureItem<'_>]) -> bool {
    let mut decoded = Vec::with_capacity(items.len());
    {
        let mut keys = KEYS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (signer, msg, sig) in items {
            let (Ok(pk), Ok(sig)) = (decoded_key(&mut keys, signer), ed25519::Signature::decode(sig.to_vec())) else {
                return false;
            };
            decoded.push((pk, *msg, sig));
        }
    }
    ed25519::PublicKey::verify_batch(
        &mut rand::rng(),
        &decoded,
        |_, (public_key, message, signature)| BatchEntry { namespace, message, public_key, signature },
        &commonware_parallel::Sequential,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_with_0600_loads_back_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let id = Identity::generate();
        id.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Identity::load(&path).unwrap().node_id(), id.node_id());
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(Identity::generate().save(&path), Err(KeyFileError::Exists(_))));
        assert_eq!(std::fs::read(&path).unwrap(), before, "existing key was modified");
        // The secret never appears in the public id.
        let secret = hex::encode(&id.private_key().encode()[..]);
        assert!(!id.node_id().to_string().contains(&secret));
    }

    #[test]
    fn refuses_missing_corrupt_and_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.key");
        let err = Identity::load(&missing).unwrap_err();
        assert!(matches!(err, KeyFileError::Missing(_)));
        assert!(err.to_string().contains("archipel key gen"));

        let corrupt = dir.path().join("corrupt.key");
        std::fs::write(&corrupt, "# c\nabcd\n").unwrap();
        std::fs::set_permissions(&corrupt, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Identity::load(&corrupt).unwrap_err();
        assert!(matches!(err, KeyFileError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("corrupt.key"));

        let binary = dir.path().join("binary.key");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Identity::load(&binary), Err(KeyFileError::Corrupt { .. })));

        let open = dir.path().join("open.key");
        Identity::generate().save(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&open).unwrap_err();
        assert!(matches!(err, KeyFileError::TooOpen { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn signatures_are_bound_to_namespace_message_and_key() {
        let a = Identity::from_seed(1);
        let b = Identity::from_seed(2);
        let sig = a.sign(b"ns", b"hello");
        assert!(verify_signature(&a.node_id(), b"ns", b"hello", &sig).is_ok());
        assert!(verify_signature(&a.node_id(), b"other", b"hello", &sig).is_err());
        assert!(verify_signature(&a.node_id(), b"ns", b"hellO", &sig).is_err());
        assert!(verify_signature(&b.node_id(), b"ns", b"hello", &sig).is_err());
    }

    #[test]
    fn decoded_keys_are_cached_but_malformed_ones_never_pass() {
        let a = Identity::from_seed(3);
        let sig = a.sign(b"ns", b"m");
        for _ in 0..2 {
            assert!(verify_signature(&a.node_id(), b"ns", b"m", &sig).is_ok());
            assert!(verify_signature(&a.node_id(), b"ns", b"x", &sig).is_err());
        }
        // Some 32-byte strings are not curve points: refused each time, never cached.
        let bad = (0u8..=255).map(|i| NodeId([i; 32])).find(|id| public_key(id).is_err()).expect("a non-point");
        assert!(matches!(public_key(&bad), Err(CryptoError::BadPublicKey(_))));
        assert!(!verify_signatures(b"ns", &[(&bad, b"m".as_slice(), &sig)]));
    }

    #[test]
    fn a_batch_passes_only_when_every_signature_does() {
        let ids: Vec<Identity> = (0..8).map(Identity::from_seed).collect();
        let node_ids: Vec<NodeId> = ids.iter().map(Identity::node_id).collect();
        let msgs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40]).collect();
        let sigs: Vec<[u8; 64]> = ids.iter().zip(&msgs).map(|(id, m)| id.sign(b"ns", m)).collect();
        let items = |sigs: &[[u8; 64]]| -> Vec<(NodeId, Vec<u8>, [u8; 64])> {
            node_ids.iter().zip(&msgs).zip(sigs).map(|((n, m), s)| (*n, m.clone(), *s)).collect()
        };
        let check = |ns: &[u8], v: &[(NodeId, Vec<u8>, [u8; 64])]| {
            let refs: Vec<SignatureItem<'_>> = v.iter().map(|(n, m, s)| (n, m.as_slice(), s)).collect();
            verify_signatures(ns, &refs)
        };
        assert!(check(b"ns", &items(&sigs)));
        assert!(!check(b"other", &items(&sigs)), "namespace is bound");
        assert!(!check(b"ns", &[]), "an empty batch proves nothing");
        for bad in 0..8 {
            let mut tampered = sigs.clone();
            tampered[bad][5] ^= 1;
            assert!(!check(b"ns", &items(&tampered)), "signature {bad} tampered");
            let mut swapped = items(&sigs);
            swapped[bad].1[0] ^= 1;
            assert!(!check(b"ns", &swapped), "message {bad} tampered");
        }
    }
}
