//! libFuzzer target: a node descriptor in JSON (registry transactions, gossip, genesis and descriptor files); see `archipel_fuzz::targets::descriptor`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::descriptor(data));
