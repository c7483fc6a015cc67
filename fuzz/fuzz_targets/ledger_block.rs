//! libFuzzer target: a block as consensus receives it (broadcast, backfill); see `archipel_fuzz::targets::ledger_block`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::ledger_block(data));
