//! libFuzzer target: a genesis file; see `archipel_fuzz::targets::genesis`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::genesis(data));
