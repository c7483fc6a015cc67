//! Tidy: every Rust module in the workspace starts with a `//!` comment saying why it exists, and
//! no test is silenced with an ignore attribute.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

fn workspace_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "crates", "xtask", "tests", "fuzz"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "tidy found only {} files: wrong root?", files.len());
    files
}

#[test]
fn every_module_has_a_doc_comment() {
    let missing: Vec<_> = workspace_files()
        .into_iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!")
        })
        .collect();
    assert!(missing.is_empty(), "modules without a //! comment saying why they exist: {missing:#?}");
}

#[test]
fn no_ignored_tests() {
    let needle = ["#[", "ignore]"].concat();
    let offenders: Vec<_> = workspace_files()
        .into_iter()
        .filter(|f| std::fs::read_to_string(f).unwrap_or_default().contains(&needle))
        .collect();
    assert!(offenders.is_empty(), "ignored tests: {offenders:#?}");
}
