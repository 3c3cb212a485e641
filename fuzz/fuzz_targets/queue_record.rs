#![no_main]
//! Stored queue records: decoding garbage is an error, never a panic, and
//! whatever decodes encodes back to an equal record.
use libfuzzer_sys::fuzz_target;
use relay_proto::queue::QueueEntry;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = QueueEntry::decode(data) {
        let again = QueueEntry::decode(entry.encode().as_bytes()).expect("re-decode");
        assert_eq!(again, entry);
        let _ = relay_proto::dsn::status_from_reply(&entry.last_error.clone().unwrap_or_default(), "5.0.0");
    }
});
