//! libFuzzer target: a transaction batch from the transaction gossip channel (and `POST /v1/txs`); see `archipel_fuzz::targets::tx_batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::tx_batch(data));
