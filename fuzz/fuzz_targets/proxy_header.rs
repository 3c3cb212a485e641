#![no_main]
//! PROXY v1/v2 headers: never a panic, never a length past the input.
use libfuzzer_sys::fuzz_target;
use relay_proto::proxy::{parse, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Done(_, used)) = parse(data) {
        assert!(used <= data.len());
    }
});
