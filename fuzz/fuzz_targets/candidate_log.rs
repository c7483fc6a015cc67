//! libFuzzer target: a blob of the candidate log read back on start; see `archipel_fuzz::targets::candidate_log`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::candidate_log(data));
