//! libFuzzer target: the block log (`ledger/blocks.log`) opened on start; see `archipel_fuzz::targets::block_log`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::block_log(data));
