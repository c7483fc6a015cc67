//! Fuzzing of every decoder that reads the network or the disk.
//!
//! - [`targets`]: one function per decoder, shared by the libFuzzer binaries in `fuzz_targets/`
//!   (`cargo xtask fuzz`, nightly) and the stable harness in every `cargo test`
//!   (`crates/node/tests/fuzz_decoders.rs`, which includes this file by path).
//! - [`fixture`]: the small network the targets decode against.
//! - [`seeds`]: valid encodings per target, the committed corpus `corpus/<target>/seed-*`.
//! - [`mutate`]: the stable harness's deterministic mutator.

pub mod fixture;
pub mod mutate;
pub mod seeds;
pub mod targets;
