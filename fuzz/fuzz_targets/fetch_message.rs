//! libFuzzer target: a message on the candidate fetch channel; see `archipel_fuzz::targets::fetch_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::fetch_message(data));
