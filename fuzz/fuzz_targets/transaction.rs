//! libFuzzer target: a transaction in binary form (`POST /v1/tx`, blocks, gossip); see `archipel_fuzz::targets::transaction`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::transaction(data));
