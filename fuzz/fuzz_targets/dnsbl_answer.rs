#![no_main]
//! DNSBL answer interpretation: a listing only ever comes from 127/8 outside
//! 127.255.255.0/24.
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use relay_core::dnsbl::{interpret, ZoneAnswer};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b) % 4) * 4;
    let addrs = |bytes: &[u8]| -> Vec<Ipv4Addr> {
        bytes.chunks_exact(4).map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3])).collect()
    };
    let body = data.get(1..).unwrap_or_default();
    let (codes, answers) = body.split_at(split.min(body.len()));
    if let ZoneAnswer::Listed(a) = interpret(&addrs(answers), &addrs(codes)) {
        let o = a.octets();
        assert_eq!(o[0], 127);
        assert!(!(o[1] == 255 && o[2] == 255));
    }
});
