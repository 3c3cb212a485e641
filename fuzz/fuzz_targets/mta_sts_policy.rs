#![no_main]
//! Whatever an MTA-STS policy server (or an attacker in its place) sends:
//! the HTTP answer and the policy parse without panicking, and a policy
//! that parses has a bounded max_age and answers any MX host name.
use libfuzzer_sys::fuzz_target;
use relay_proto::mta_sts::{parse_policy, parse_record, policy_from_response, MAX_AGE_LIMIT};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_record(&[text.to_string()]);
    let body = policy_from_response(data).unwrap_or_else(|_| text.to_string());
    if let Ok(policy) = parse_policy(&body) {
        assert!(policy.max_age <= MAX_AGE_LIMIT);
        let _ = policy.allows("mx.example.com");
        let _ = policy.allows(&text);
    }
});
