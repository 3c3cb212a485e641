#![no_main]
//! Any command line: a command or a reply with an error code, never a panic.
use libfuzzer_sys::fuzz_target;
use relay_proto::smtp::command::{parse, SyntaxError};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(_) => {}
        Err(SyntaxError(reply)) => assert!((500..=555).contains(&reply.code), "{reply}"),
    }
});
