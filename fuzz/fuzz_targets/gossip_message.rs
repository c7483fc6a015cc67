//! libFuzzer target: a membership gossip message, handed to a peer table; see `archipel_fuzz::targets::gossip_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::gossip_message(data));
