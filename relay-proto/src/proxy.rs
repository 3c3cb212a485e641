//! PROXY protocol v1 and v2 headers (HAProxy's spec), as an AWS Network
//! Load Balancer sends them: the real client address of a connection
//! relayed by a proxy.
//!
//! Sans-I/O: [`parse`] looks at the first bytes of a connection and says
//! whether more are needed, what the header says and how long it was. Who
//! may send a header at all (`trusted_proxies`) is the driver's check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1 headers are at most 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// Largest v2 header we accept (TLVs included); AWS sends well under this.
pub const V2_MAX: usize = 4096;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxy's own connection (health checks, `UNKNOWN`): keep the
    /// socket's addresses.
    Local,
    /// A relayed TCP connection.
    Tcp {
        /// The client, as the proxy saw it.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
}

/// Why the first bytes are not a PROXY header we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The connection does not start with a PROXY signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A v1 (text) header that breaks the grammar, and where.
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    /// A v2 (binary) header that breaks the format, and where.
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    /// No complete header within the size the protocol allows.
    #[error("PROXY header longer than allowed")]
    TooLong,
}

/// Result of looking at the buffered bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed to decide.
    NeedMore,
    /// The header, and how many bytes it took.
    Done(ProxyHeader, usize),
}

/// Looks at the first bytes of a connection: a header, a request for more, or an error.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.is_empty() {
        return Ok(Parsed::NeedMore);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if buf.len() < 16 {
            Ok(Parsed::NeedMore)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::TooLong)
        } else {
            Ok(Parsed::NeedMore)
        };
    };
    if end + 1 > V1_MAX {
        return Err(ProxyError::TooLong);
    }
    let line = buf[..end]
        .strip_suffix(b"\r")
        .ok_or(ProxyError::V1("line must end with CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1("not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Parsed::Done(ProxyHeader::Local, end + 1)),
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let src: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::V1("bad source address"))?;
            let dst: IpAddr = dst
                .parse()
                .map_err(|_| ProxyError::V1("bad destination address"))?;
            let v4 = *proto == "TCP4";
            if src.is_ipv4() != v4 || dst.is_ipv4() != v4 {
                return Err(ProxyError::V1("address family does not match"));
            }
            let port = |p: &str| -> Result<u16, ProxyError> {
                if p.is_empty()
                    || p.len() > 5
                    || (p.len() > 1 && p.starts_with('0'))
                    || !p.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ProxyError::V1("bad port"));
                }
                p.parse().map_err(|_| ProxyError::V1("bad port"))
            };
            Ok(Parsed::Done(
                ProxyHeader::Tcp {
                    source: SocketAddr::new(src, port(sport)?),
                    destination: SocketAddr::new(dst, port(dport)?),
                },
                end + 1,
            ))
        }
        _ => Err(ProxyError::V1("expected PROXY TCP4|TCP6|UNKNOWN")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < total {
        return Ok(Parsed::NeedMore);
    }
    let body = &buf[16..total];
    match ver_cmd & 0x0f {
        // LOCAL: the proxy speaking for itself; the address block is ignored.
        0 => Ok(Parsed::Done(ProxyHeader::Local, total)),
        1 => {
            let header = match family {
                0x00 => ProxyHeader::Local,
                0x11 => {
                    if body.len() < 12 {
                        return Err(ProxyError::V2("TCP4 address block too short"));
                    }
                    let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                    let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
                    ProxyHeader::Tcp {
                        source: SocketAddr::new(src.into(), u16::from_be_bytes([body[8], body[9]])),
                        destination: SocketAddr::new(
                            dst.into(),
                            u16::from_be_bytes([body[10], body[11]]),
                        ),
                    }
                }
                0x21 => {
                    if body.len() < 36 {
                        return Err(ProxyError::V2("TCP6 address block too short"));
                    }
                    let mut s = [0u8; 16];
                    let mut d = [0u8; 16];
                    s.copy_from_slice(&body[..16]);
                    d.copy_from_slice(&body[16..32]);
                    ProxyHeader::Tcp {
                        source: SocketAddr::new(
                            Ipv6Addr::from(s).into(),
                            u16::from_be_bytes([body[32], body[33]]),
                        ),
                        destination: SocketAddr::new(
                            Ipv6Addr::from(d).into(),
                            u16::from_be_bytes([body[34], body[35]]),
                        ),
                    }
                }
                _ => return Err(ProxyError::V2("only TCP over IPv4/IPv6 is supported")),
            };
            // Whatever follows the addresses are TLVs (AWS sends 0xEA with
            // the VPC endpoint id): tolerated and skipped.
            Ok(Parsed::Done(header, total))
        }
        _ => Err(ProxyError::V2("unknown command")),
    }
}

/// Builds a v2 header (for tests and tools).
pub fn v2_header(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    let mut addrs = Vec::new();
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            out.push(0x21);
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            addrs.extend_from_slice(&v6(s.ip()).octets());
            addrs.extend_from_slice(&v6(d.ip()).octets());
        }
    }
    addrs.extend_from_slice(&source.port().to_be_bytes());
    addrs.extend_from_slice(&destination.port().to_be_bytes());
    addrs.extend_from_slice(tlvs);
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&addrs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_table() {
        let cases: &[(&[u8], Result<Parsed, ProxyError>)] = &[
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\r\nEHLO",
                Ok(Parsed::Done(
                    ProxyHeader::Tcp {
                        source: sa("192.0.2.7:5555"),
                        destination: sa("198.51.100.1:25"),
                    },
                    43,
                )),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 25\r\n",
                Ok(Parsed::Done(
                    ProxyHeader::Tcp {
                        source: sa("[2001:db8::7]:5555"),
                        destination: sa("[2001:db8::1]:25"),
                    },
                    44,
                )),
            ),
            (
                b"PROXY UNKNOWN\r\n",
                Ok(Parsed::Done(ProxyHeader::Local, 15)),
            ),
            (b"PROXY TCP4 192.0.2.7", Ok(Parsed::NeedMore)),
            (b"PRO", Ok(Parsed::NeedMore)),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\n",
                Err(ProxyError::V1("line must end with CRLF")),
            ),
            (
                b"PROXY TCP4 2001:db8::7 198.51.100.1 5555 25\r\n",
                Err(ProxyError::V1("address family does not match")),
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 99999 25\r\n",
                Err(ProxyError::V1("bad port")),
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 0555 25\r\n",
                Err(ProxyError::V1("bad port")),
            ),
            (
                b"PROXY UDP4 192.0.2.7 198.51.100.1 5555 25\r\n",
                Err(ProxyError::V1("expected PROXY TCP4|TCP6|UNKNOWN")),
            ),
            (b"EHLO client.test\r\n", Err(ProxyError::NotProxy)),
        ];
        for (input, expected) in cases {
            assert_eq!(
                &parse(input),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
        assert_eq!(parse(long.as_bytes()), Err(ProxyError::TooLong));
        assert_eq!(
            parse("PROXY ".repeat(30).as_bytes()),
            Err(ProxyError::TooLong)
        );
    }

    #[test]
    fn v2_round_trips_with_aws_tlvs() {
        // AWS: type 0xEA, length, subtype 0x01, VPC endpoint id.
        let tlv = [
            0xEA, 0x00, 0x09, 0x01, b'v', b'p', b'c', b'e', b'-', b'a', b'b', b'c',
        ];
        let h = v2_header(sa("192.0.2.7:5555"), sa("10.0.0.5:25"), &tlv);
        let mut input = h.clone();
        input.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&input),
            Ok(Parsed::Done(
                ProxyHeader::Tcp {
                    source: sa("192.0.2.7:5555"),
                    destination: sa("10.0.0.5:25")
                },
                h.len()
            ))
        );
        let h6 = v2_header(sa("[2001:db8::7]:5555"), sa("[2001:db8::1]:25"), &[]);
        assert_eq!(
            parse(&h6),
            Ok(Parsed::Done(
                ProxyHeader::Tcp {
                    source: sa("[2001:db8::7]:5555"),
                    destination: sa("[2001:db8::1]:25")
                },
                52
            ))
        );
        // Every truncation asks for more.
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(Parsed::NeedMore), "cut at {cut}");
        }
    }

    #[test]
    fn v2_local_and_errors() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local), Ok(Parsed::Done(ProxyHeader::Local, 16)));
        let mut h = v2_header(sa("192.0.2.7:1"), sa("10.0.0.5:25"), &[]);
        h[12] = 0x11;
        assert_eq!(parse(&h), Err(ProxyError::V2("version is not 2")));
        let mut h = v2_header(sa("192.0.2.7:1"), sa("10.0.0.5:25"), &[]);
        h[12] = 0x2f;
        assert_eq!(parse(&h), Err(ProxyError::V2("unknown command")));
        let mut h = v2_header(sa("192.0.2.7:1"), sa("10.0.0.5:25"), &[]);
        h[13] = 0x12;
        assert_eq!(
            parse(&h),
            Err(ProxyError::V2("only TCP over IPv4/IPv6 is supported"))
        );
        let mut h = v2_header(sa("192.0.2.7:1"), sa("10.0.0.5:25"), &[]);
        h[14..16].copy_from_slice(&4u16.to_be_bytes());
        h.truncate(20);
        assert_eq!(
            parse(&h),
            Err(ProxyError::V2("TCP4 address block too short"))
        );
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&big), Err(ProxyError::TooLong));
        let mut wrong = V2_SIGNATURE.to_vec();
        wrong[5] = b'X';
        assert_eq!(parse(&wrong), Err(ProxyError::NotProxy));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed: u64 = 42;
        for len in 0..300 {
            let mut buf: Vec<u8> = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.push(seed as u8);
            }
            if len % 3 == 0 && len >= 12 {
                buf[..12].copy_from_slice(V2_SIGNATURE);
            }
            let _ = parse(&buf);
        }
    }
}
