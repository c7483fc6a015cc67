//! libFuzzer target: a ledger block (`ledger verify`, the block log), executed on the genesis; see `archipel_fuzz::targets::block`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::block(data));
