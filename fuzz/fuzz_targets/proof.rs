//! libFuzzer target: a proof file (`archipel proof verify`); see `archipel_fuzz::targets::proof`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::proof(data));
