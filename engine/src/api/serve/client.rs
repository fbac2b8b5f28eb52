//! Who the client of a connection is, for the per-address cap and the logs.
//!
//! Behind a reverse proxy every connection comes from the proxy, so a cap per peer address
//! would cap the proxy: the whole instance would serve `http.max_connections_per_ip`
//! connections. A peer listed in `http.trusted_proxies` may therefore name the client:
//! by a PROXY protocol header (v1 text or v2 binary) at the start of the connection, else by
//! `X-Forwarded-For` in the first request, read from the right and skipping the hops that
//! are trusted proxies themselves (the leftmost entries are whatever the client sent, so only
//! what a trusted hop appended counts). A peer not in the list names nobody. A proxy that
//! pools its upstream connections carries several clients' requests on one connection; the
//! connection counts against the client of its first request.
//!
//! IPv6 addresses count per /64: one subscriber usually holds a whole /64, and counting
//! single addresses would let it take the instance with as many connections as it likes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Cidr;

/// The proxies whose word on the client's address is taken.
#[derive(Debug, Clone, Default)]
pub struct Proxies(Vec<Cidr>);

impl Proxies {
    pub fn new(blocks: Vec<Cidr>) -> Self {
        Self(blocks)
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|block| block.contains(ip))
    }

    /// The client of a request that arrived from the trusted `hop`: the rightmost address of
    /// `X-Forwarded-For` (all its lines, in order) that is not a trusted proxy; `hop` when
    /// the header is absent or names only trusted proxies; `None` when the hop to take is
    /// not an address (nobody is named then, and the caller keeps the peer).
    pub fn forwarded_for(&self, hop: IpAddr, head: &[u8]) -> Option<IpAddr> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        request.parse(head).ok()?;
        let chain: Vec<&[u8]> = request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .collect();
        let mut client = hop;
        for entry in chain.into_iter().rev() {
            if !self.trusts(client) {
                break;
            }
            client = parse_hop(std::str::from_utf8(entry).ok()?.trim())?;
        }
        Some(client)
    }
}

/// One `X-Forwarded-For` entry: an address, perhaps with a port (`1.2.3.4:5`,
/// `[2001:db8::1]:443`).
fn parse_hop(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// The key an address counts under: IPv4 as it is (an IPv4-mapped IPv6 address too), IPv6
/// by its /64.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        },
    }
}

/// What the start of a connection from a trusted proxy holds.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A complete header of `len` bytes naming `client` (`None`: a health check of the
    /// proxy's own, `LOCAL`/`UNKNOWN`, or an address family without one).
    Complete { len: usize, client: Option<IpAddr> },
    /// The start of one; read more.
    Partial,
    /// Not a PROXY header: the request itself.
    Absent,
    /// A PROXY header that does not parse: the connection is closed.
    Invalid,
}

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included (the specification's figure).
const V1_MAX: usize = 107;
/// The v2 header's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The longest v2 address block taken (TLVs beyond the addresses are skipped, but only
/// this much is read).
const V2_MAX: usize = 512;

/// Parses a PROXY protocol header (v1 or v2) at the start of `buf`.
pub fn proxy_header(buf: &[u8]) -> ProxyHeader {
    let starts = |prefix: &[u8]| {
        let n = buf.len().min(prefix.len());
        buf[..n] == prefix[..n]
    };
    if buf.is_empty() {
        return ProxyHeader::Partial;
    }
    if starts(V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return ProxyHeader::Partial;
        }
        return v1(buf);
    }
    if starts(V2_SIGNATURE) {
        if buf.len() < V2_FIXED {
            return ProxyHeader::Partial;
        }
        return v2(buf);
    }
    ProxyHeader::Absent
}

/// `PROXY TCP4 192.0.2.9 10.0.0.1 5555 443\r\n`, or `PROXY UNKNOWN ...\r\n`.
fn v1(buf: &[u8]) -> ProxyHeader {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() < V1_MAX {
            ProxyHeader::Partial
        } else {
            ProxyHeader::Invalid
        };
    };
    let Ok(line) = std::str::from_utf8(&buf[..end]) else {
        return ProxyHeader::Invalid;
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let client = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", "TCP4", src, _, _, _] => match src.parse::<Ipv4Addr>() {
            Ok(ip) => Some(IpAddr::V4(ip)),
            Err(_) => return ProxyHeader::Invalid,
        },
        ["PROXY", "TCP6", src, _, _, _] => match src.parse::<Ipv6Addr>() {
            Ok(ip) => Some(IpAddr::V6(ip)),
            Err(_) => return ProxyHeader::Invalid,
        },
        _ => return ProxyHeader::Invalid,
    };
    ProxyHeader::Complete {
        len: end + 2,
        client,
    }
}

/// The binary header: signature, version 2 and a command (`LOCAL` or `PROXY`), the family,
/// the length of what follows, then the addresses.
fn v2(buf: &[u8]) -> ProxyHeader {
    let (version, command, family) = (buf[12] >> 4, buf[12] & 0x0f, buf[13]);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if version != 2 || command > 1 || len > V2_MAX {
        return ProxyHeader::Invalid;
    }
    if buf.len() < V2_FIXED + len {
        return ProxyHeader::Partial;
    }
    let addresses = &buf[V2_FIXED..V2_FIXED + len];
    let client = match (command, family >> 4) {
        // LOCAL: the proxy's own connection (a health check).
        (0, _) => None,
        (_, 1) if addresses.len() >= 12 => Some(IpAddr::V4(Ipv4Addr::new(
            addresses[0],
            addresses[1],
            addresses[2],
            addresses[3],
        ))),
        (_, 2) if addresses.len() >= 36 => {
            let src: [u8; 16] = addresses[..16].try_into().expect("16 bytes");
            Some(IpAddr::V6(Ipv6Addr::from(src)))
        }
        (_, 1 | 2) => return ProxyHeader::Invalid,
        // AF_UNSPEC, AF_UNIX: no address to take.
        _ => None,
    };
    ProxyHeader::Complete {
        len: V2_FIXED + len,
        client,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(blocks: &[&str]) -> Proxies {
        Proxies::new(blocks.iter().map(|b| Cidr::parse(b).unwrap()).collect())
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let p = proxies(&["10.0.0.0/8"]);
        let head = |xff: &str| format!("GET / HTTP/1.1\r\nHost: x\r\n{xff}\r\n").into_bytes();
        let hop = ip("10.0.0.1");
        let cases = [
            ("", Some("10.0.0.1")),
            ("X-Forwarded-For: 203.0.113.7\r\n", Some("203.0.113.7")),
            (
                "X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n",
                Some("203.0.113.7"),
            ),
            (
                "X-Forwarded-For: 203.0.113.7, 10.1.1.1\r\n",
                Some("203.0.113.7"),
            ),
            (
                "x-forwarded-for: 6.6.6.6\r\nX-Forwarded-For: 203.0.113.8\r\n",
                Some("203.0.113.8"),
            ),
            ("X-Forwarded-For: 10.1.1.1, 10.2.2.2\r\n", Some("10.1.1.1")),
            (
                "X-Forwarded-For: [2001:db8::1]:443\r\n",
                Some("2001:db8::1"),
            ),
            ("X-Forwarded-For: 203.0.113.7:5000\r\n", Some("203.0.113.7")),
            // The hop to take is garbage: nobody is named.
            ("X-Forwarded-For: 203.0.113.7, unknown\r\n", None),
            // Garbage left of the first untrusted hop is never looked at.
            (
                "X-Forwarded-For: unknown, 203.0.113.7\r\n",
                Some("203.0.113.7"),
            ),
        ];
        for (xff, want) in cases {
            assert_eq!(p.forwarded_for(hop, &head(xff)), want.map(ip), "{xff:?}");
        }
        // An untrusted hop names nobody else.
        assert_eq!(
            p.forwarded_for(ip("192.0.2.1"), &head("X-Forwarded-For: 203.0.113.7\r\n")),
            Some(ip("192.0.2.1"))
        );
        assert_eq!(p.forwarded_for(hop, b"\x16\x03\x01 not http"), None);
    }

    #[test]
    fn ipv6_counts_per_slash_64() {
        assert_eq!(key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(key(ip("2001:db8:1:2::ffff")), key(ip("2001:db8:1:2:1::")));
        assert_ne!(key(ip("2001:db8:1:2::1")), key(ip("2001:db8:1:3::1")));
        assert_eq!(key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(key(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn proxy_headers_v1_and_v2() {
        let v1 = b"PROXY TCP4 192.0.2.9 10.0.0.1 5555 443\r\nGET /";
        assert_eq!(
            proxy_header(v1),
            ProxyHeader::Complete {
                len: 40,
                client: Some(ip("192.0.2.9"))
            }
        );
        assert_eq!(
            proxy_header(b"PROXY TCP6 2001:db8::9 2001:db8::1 5555 443\r\n"),
            ProxyHeader::Complete {
                len: 45,
                client: Some(ip("2001:db8::9"))
            }
        );
        assert_eq!(
            proxy_header(b"PROXY UNKNOWN\r\n"),
            ProxyHeader::Complete {
                len: 15,
                client: None
            }
        );
        for partial in [&b"PRO"[..], b"PROXY TCP4 192.0", b"\r\n\r\n\0\r\nQU"] {
            assert_eq!(proxy_header(partial), ProxyHeader::Partial, "{partial:?}");
        }
        for invalid in [
            &b"PROXY TCP4 nonsense 10.0.0.1 1 2\r\n"[..],
            b"PROXY HTTP/1.1\r\n",
        ] {
            assert_eq!(proxy_header(invalid), ProxyHeader::Invalid, "{invalid:?}");
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(proxy_header(&long), ProxyHeader::Invalid);
        assert_eq!(proxy_header(b"GET / HTTP/1.1\r\n"), ProxyHeader::Absent);

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 9, 10, 0, 0, 1, 0x15, 0xb3, 1, 187,
        ]);
        assert_eq!(proxy_header(&v2[..20]), ProxyHeader::Partial);
        v2.extend_from_slice(b"GET /");
        assert_eq!(
            proxy_header(&v2),
            ProxyHeader::Complete {
                len: 28,
                client: Some(ip("192.0.2.9"))
            }
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            proxy_header(&local),
            ProxyHeader::Complete {
                len: 16,
                client: None
            }
        );
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert_eq!(proxy_header(&bad), ProxyHeader::Invalid);
    }
}
