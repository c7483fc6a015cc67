//! libFuzzer target: the body of a storage node's `POST /v1/seal-batch`; see `archipel_fuzz::targets::seal_batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::seal_batch(data));
