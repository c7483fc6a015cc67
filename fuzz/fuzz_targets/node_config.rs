//! libFuzzer target: a node configuration file (`node.toml`); see `archipel_fuzz::targets::node_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| archipel_fuzz::targets::node_config(data));
