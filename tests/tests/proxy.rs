//! End-to-end: PROXY protocol from a trusted load balancer.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use backupmx_tests::*;
use relay_core::proxy::v2_header;

fn proxied(s: &Server, from: &str, claimed: &str) -> Client {
    let mut c = Client::connect_from_raw(from.parse().unwrap(), s.addr);
    let claimed: SocketAddr = claimed.parse().unwrap();
    // AWS NLB style: v2 with the 0xEA TLV.
    let tlv = [0xEA, 0x00, 0x04, 0x01, b'v', b'p', b'c'];
    c.send(v2_header(claimed, s.addr, &tlv));
    let g = c.read_reply();
    assert!(g.starts_with("220 "), "{g}");
    c
}

#[test]
fn the_client_address_comes_from_the_proxy_header() {
    let s = Server::start(
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\nproxy_header_timeout = \"1s\"\nmax_connections_per_ip = 2",
        "[greylist]\nenabled = true\ndelay = \"1s\"\n",
    );
    // Greylisting keys on the claimed client, 192.0.2.7.
    let mut c = proxied(&s, "127.0.0.1", "192.0.2.7:40000");
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    c.expect("RCPT TO:<bob@example.test>", "450 4.2.0");
    std::thread::sleep(Duration::from_millis(1200));
    // A neighbour of 192.0.2.7 (same /24) through the same proxy passes.
    let mut c = proxied(&s, "127.0.0.1", "192.0.2.99:40001");
    let id = queue_id(&c.send_message(
        "alice@remote.test",
        &["bob@example.test"],
        "Subject: via nlb\r\n\r\nx\r\n",
    ));
    let raw = String::from_utf8(s.raw(&id)).unwrap();
    // Sender authentication checked the real client, not the proxy.
    assert!(
        raw.starts_with("Authentication-Results: mx2.test;"),
        "{raw}"
    );
    assert!(raw.contains("policy.iprev=192.0.2.99"), "{raw}");
    let trace = backupmx_tests::skip_field(raw.as_bytes(), b"Authentication-Results: ");
    assert!(
        trace.starts_with(b"Received: from client.test ([192.0.2.99])"),
        "{raw}"
    );
    assert_eq!(s.queue()[0]["client_ip"], "192.0.2.99");
    // Another network via the same proxy is a new triplet.
    let mut c = proxied(&s, "127.0.0.1", "198.51.100.1:40002");
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    c.expect("RCPT TO:<bob@example.test>", "450 4.2.0");
    // Per-IP limits count claimed clients, not the proxy.
    let _a = proxied(&s, "127.0.0.1", "203.0.113.5:1");
    let _b = proxied(&s, "127.0.0.1", "203.0.113.5:2");
    let mut third = Client::connect_from_raw("127.0.0.1".parse().unwrap(), s.addr);
    third.send(v2_header("203.0.113.5:3".parse().unwrap(), s.addr, &[]));
    assert!(third.read_reply().starts_with("421 4.7.0"));
    let _other = proxied(&s, "127.0.0.1", "203.0.113.6:1");
}

#[test]
fn v1_headers_and_local_health_checks_are_accepted() {
    let s = Server::start(
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]",
        "",
    );
    let mut c = Client::connect_from_raw("127.0.0.1".parse().unwrap(), s.addr);
    c.send("PROXY TCP4 192.0.2.8 10.0.0.1 5555 25\r\n");
    assert!(c.read_reply().starts_with("220 "));
    let id = queue_id(&c.send_message(
        "a@remote.test",
        &["b@example.test"],
        "Subject: v1\r\n\r\nx\r\n",
    ));
    assert!(String::from_utf8(s.raw(&id))
        .unwrap()
        .contains("([192.0.2.8])"));
    // LOCAL: the balancer's own health check; the session is its own.
    let mut hc = Client::connect_from_raw("127.0.0.2".parse().unwrap(), s.addr);
    hc.send(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    assert!(hc.read_reply().starts_with("220 "));
    hc.expect("QUIT", "221");
}

#[test]
fn untrusted_malformed_or_missing_headers_close_the_connection() {
    let s = Server::start(
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\nproxy_header_timeout = \"1s\"",
        "",
    );
    // Not from a trusted proxy: closed without a greeting, header or not.
    let mut c = Client::connect_from_raw("127.0.0.2".parse().unwrap(), s.addr);
    c.send(v2_header("192.0.2.7:1".parse().unwrap(), s.addr, &[]));
    assert!(c.is_closed());
    // Malformed.
    let mut c = Client::connect_from_raw("127.0.0.1".parse().unwrap(), s.addr);
    c.send("PROXY TCP4 not-an-ip 10.0.0.1 1 25\r\n");
    assert!(c.is_closed());
    // Plain SMTP where a header is required.
    let mut c = Client::connect_from_raw("127.0.0.1".parse().unwrap(), s.addr);
    c.send("EHLO sneaky.test\r\n");
    assert!(c.is_closed());
    // Nothing at all: closed after the header timeout.
    let mut c = Client::connect_from_raw("127.0.0.1".parse().unwrap(), s.addr);
    assert!(c.is_closed());
    let _ = c.stream().flush();
    let log = s.log();
    assert!(
        log.contains("not a trusted proxy") && log.contains("timed out waiting for the header"),
        "{log}"
    );
    // The server still works for a proper client.
    let mut ok = proxied(&s, "127.0.0.1", "192.0.2.50:1");
    ok.expect("NOOP", "250");
}

#[test]
fn proxy_protocol_without_trusted_proxies_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[smtp]\nproxy_protocol = true\n").unwrap();
    let out = std::process::Command::new(backupmx_bin())
        .args(["ingest", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trusted_proxies"));
}

#[test]
fn the_container_health_check_passes_with_the_templates_settings() {
    // As infra/template.yaml runs it: PROXY on, trusted_proxies = the VPC
    // CIDR, and `backupmx health --connect 127.0.0.1:PORT --proxy` from
    // inside the container.
    let s = Server::start(
        "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/16\"]",
        "",
    );
    let out = Command::new(backupmx_bin())
        .args(["health", "--connect", &s.addr.to_string(), "--proxy"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    // This host may send LOCAL, never a forwarded client address.
    let mut c = Client::connect_from_raw("127.0.0.1".parse().unwrap(), s.addr);
    c.send("PROXY TCP4 192.0.2.7 192.0.2.1 40000 25\r\n");
    assert!(c.is_closed());
    assert!(s.log().contains("not a trusted proxy"), "{}", s.log());
}

#[test]
fn a_bare_tcp_health_check_is_neither_an_error_nor_a_rejection() {
    let port = free_port();
    let s = Server::start(
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.0/8\"]",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    for _ in 0..3 {
        // The NLB's TCP check: connect, close.
        drop(std::net::TcpStream::connect(s.addr).unwrap());
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!s.log().contains("proxy_header_refused"), "{}", s.log());
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(!text.contains("reason=\"proxy_header\""), "{text}");
}
