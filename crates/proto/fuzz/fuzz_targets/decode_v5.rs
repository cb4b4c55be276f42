//! Fuzzes the MQTT 5.0 decoder; see `fuzz_targets/common.rs`.
#![no_main]

use ferrohub_proto::mqtt::ProtocolVersion;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| common::run(data, ProtocolVersion::V5));
