//! libFuzzer target: a heartbeat from the liveness channel; see `archipel_fuzz::targets::heartbeat`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::heartbeat(data));
