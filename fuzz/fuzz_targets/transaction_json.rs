//! libFuzzer target: a transaction in JSON form (`POST /v1/tx` with a JSON content type); see `archipel_fuzz::targets::transaction_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::transaction_json(data));
