//! Writing files the operator owns: always to a new path, never over an existing file.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path`, creating parent directories, refusing to replace an existing file.
/// The error message says what went wrong and what to do.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            "it already exists; refusing to overwrite (edit it, or remove it yourself)".to_string()
        } else {
            e.to_string()
        }
    })?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| e.to_string())
}
