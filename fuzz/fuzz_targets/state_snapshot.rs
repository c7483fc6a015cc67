//! libFuzzer target: a state snapshot read by `node run --join`; see `archipel_fuzz::targets::state_snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::state_snapshot(data));
