//! libFuzzer target: a ledger export (`archipel ledger verify`); see `archipel_fuzz::targets::export`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::export(data));
