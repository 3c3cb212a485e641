#![no_main]
//! Arbitrary bytes as a server certificate for DANE's selector: no panic,
//! and a SubjectPublicKeyInfo found is a part of the input.
use libfuzzer_sys::fuzz_target;
use relay_proto::dane::{selected, subject_public_key_info};

fuzz_target!(|data: &[u8]| {
    if let Some(spki) = subject_public_key_info(data) {
        assert!(spki.len() <= data.len());
        let start = spki.as_ptr() as usize - data.as_ptr() as usize;
        assert!(start + spki.len() <= data.len());
    }
    let _ = selected(data, 0);
    let _ = selected(data, 2);
});
