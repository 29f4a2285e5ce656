//! The PROXY protocol (HAProxy's spec, versions 1 and 2): parsing the header a client's
//! connection begins with (`accept_proxy`), and writing the one weir sends before the
//! client's bytes to a backend (`proxy_protocol`).
//!
//! A leaf module that uses nothing else of weir. Written here rather than taken from the
//! `ppp` crate (2.3.0, which parses both versions incrementally and would do): its writers
//! build a `Vec` (v2) or a `String` (v1) per header, and what weir needs of it is a parser
//! that says "need more bytes" or "malformed" on a bounded prefix, and a writer into a
//! fixed buffer: about as much code as wrapping it, and no allocation per connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 header begins so.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (the spec's 107 bytes).
pub const V1_MAX: usize = 107;
/// The longest header weir accepts: a v2 header with up to 520 bytes of addresses and
/// TLVs (HAProxy's own default buffer takes far more, but what is sent in practice — the
/// addresses, an authority, a few TLVs of a cloud load balancer — fits easily).
pub const MAX_HEADER: usize = 536;
/// The longest header weir writes (v1 TCP6 with the longest addresses is 104).
pub const MAX_WRITTEN: usize = V1_MAX;

/// Which version to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A complete header that was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// How many bytes it took: the client's own bytes start after them.
    pub len: usize,
    pub version: Version,
    /// The original connection's source and destination; None for v1 `UNKNOWN`, v2
    /// `LOCAL` (a health check of the proxy in front) and v2 address families other than
    /// IPv4/IPv6 (unix sockets): the connection's real peer is then the client.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Why bytes are not a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("does not begin with a PROXY protocol signature")]
    NoSignature,
    #[error("v1 header longer than 107 bytes")]
    V1TooLong,
    #[error("v1 header: {0}")]
    V1(&'static str),
    #[error("v2 header: {0}")]
    V2(&'static str),
    #[error("v2 header longer than the 536 bytes weir accepts")]
    V2TooLong,
}

/// Parses the header at the start of `buf`: Ok(None) when `buf` is a proper prefix of a
/// header (more bytes needed; then every byte of `buf` belongs to the header), Err when it
/// can't become one whatever follows. Never reads past the header's end.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, Malformed> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(Malformed::NoSignature),
    }
}

/// Whether `buf` (at least one byte) could be the start of a header of either version:
/// what a connection from a source not trusted with `accept_proxy` is refused for.
pub fn looks_like_header(buf: &[u8]) -> bool {
    let starts = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        n > 0 && buf[..n] == sig[..n]
    };
    starts(V1_PREFIX) || starts(&V2_SIGNATURE)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, Malformed> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(Malformed::NoSignature);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(Malformed::V1TooLong)
        } else {
            Ok(None)
        };
    };
    if lf < V1_PREFIX.len() || buf[lf - 1] != b'\r' {
        return Err(Malformed::V1("line does not end in CRLF"));
    }
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..lf - 1])
        .map_err(|_| Malformed::V1("not ASCII"))?;
    let addresses = v1_addresses(line)?;
    Ok(Some(Header {
        len: lf + 1,
        version: Version::V1,
        addresses,
    }))
}

/// `TCP4 SRC DST SPORT DPORT`, `TCP6 …` or `UNKNOWN …` (the rest ignored).
fn v1_addresses(line: &str) -> Result<Option<(SocketAddr, SocketAddr)>, Malformed> {
    let mut words = line.split(' ');
    let family = words.next().unwrap_or("");
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(Malformed::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let mut field = || words.next().ok_or(Malformed::V1("missing fields"));
    let (src, dst, sport, dport) = (field()?, field()?, field()?, field()?);
    if words.next().is_some() {
        return Err(Malformed::V1("extra fields"));
    }
    let ip = |s: &str| -> Result<IpAddr, Malformed> {
        let ip = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        ip.map_err(|_| Malformed::V1("bad address"))
    };
    let port = |s: &str| -> Result<u16, Malformed> {
        // The spec: decimal without leading zeroes, 0..=65535.
        if s.is_empty()
            || (s.len() > 1 && s.starts_with('0'))
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(Malformed::V1("bad port"));
        }
        s.parse().map_err(|_| Malformed::V1("bad port"))
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Some((source, destination)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, Malformed> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(Malformed::NoSignature);
    }
    if buf.len() < 16 {
        if buf.len() > 12 {
            check_v2_version(buf[12])?;
        }
        return Ok(None);
    }
    let command = check_v2_version(buf[12])?;
    let family = buf[13];
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + length;
    if len > MAX_HEADER {
        return Err(Malformed::V2TooLong);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    let local = command == 0;
    let addresses = match family >> 4 {
        1 if body.len() >= 12 => Some(v2_v4(body)),
        2 if body.len() >= 36 => Some(v2_v6(body)),
        1 | 2 if !local => return Err(Malformed::V2("address block too short")),
        _ => None,
    };
    if !local && !matches!(family & 0x0f, 0..=2) {
        return Err(Malformed::V2("unknown transport"));
    }
    Ok(Some(Header {
        len,
        version: Version::V2,
        addresses: if local { None } else { addresses },
    }))
}

/// The command (0 LOCAL, 1 PROXY) of a v2 version/command byte.
fn check_v2_version(byte: u8) -> Result<u8, Malformed> {
    if byte >> 4 != 2 {
        return Err(Malformed::V2("version is not 2"));
    }
    match byte & 0x0f {
        c @ (0 | 1) => Ok(c),
        _ => Err(Malformed::V2("command is neither LOCAL nor PROXY")),
    }
}

fn v2_v4(b: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |o: usize| Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
    let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    (
        SocketAddr::new(ip(0).into(), port(8)),
        SocketAddr::new(ip(4).into(), port(10)),
    )
}

fn v2_v6(b: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |o: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[o..o + 16]);
        Ipv6Addr::from(octets)
    };
    let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    (
        SocketAddr::new(ip(0).into(), port(32)),
        SocketAddr::new(ip(16).into(), port(34)),
    )
}

/// A header to write: at most `MAX_WRITTEN` bytes, on the stack.
pub struct Written {
    buf: [u8; MAX_WRITTEN],
    len: usize,
}

impl Written {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Whether a v2 header describes a stream (TCP) or datagram (UDP) connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}

/// The header for a connection from `source` to `destination`. Families that differ
/// (an IPv4 client on an IPv6 listener) are written as IPv6, v4-mapped. v1 has no
/// datagrams: `transport` is then ignored (config refuses v1 for udp pools).
pub fn write(
    version: Version,
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
) -> Written {
    let (source, destination) = same_family(source, destination);
    let mut out = Written {
        buf: [0; MAX_WRITTEN],
        len: 0,
    };
    match version {
        Version::V1 => write_v1(&mut out, source, destination),
        Version::V2 => write_v2(&mut out, transport, source, destination),
    }
    out
}

fn same_family(s: SocketAddr, d: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        (v6(s), v6(d))
    }
}

fn write_v1(out: &mut Written, s: SocketAddr, d: SocketAddr) {
    use std::io::Write;
    let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    let mut cursor = std::io::Cursor::new(&mut out.buf[..]);
    // At most 104 bytes: "PROXY TCP6 " + 2×39 + 2×5 + 3 spaces + CRLF.
    let written = write!(
        cursor,
        "PROXY {family} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    );
    debug_assert!(written.is_ok());
    out.len = cursor.position() as usize;
}

fn write_v2(out: &mut Written, transport: Transport, s: SocketAddr, d: SocketAddr) {
    out.push(&V2_SIGNATURE);
    let proto = match transport {
        Transport::Stream => 1,
        Transport::Datagram => 2,
    };
    match (s.ip(), d.ip()) {
        (IpAddr::V4(si), IpAddr::V4(di)) => {
            out.push(&[0x21, 0x10 | proto, 0, 12]);
            out.push(&si.octets());
            out.push(&di.octets());
        }
        (si, di) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(ip) => ip.octets(),
                IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            };
            out.push(&[0x21, 0x20 | proto, 0, 36]);
            out.push(&v6(si));
            out.push(&v6(di));
        }
    }
    out.push(&s.port().to_be_bytes());
    out.push(&d.port().to_be_bytes());
}

/// A trusted source range of `accept_proxy`: `ADDR/LEN`, or a bare address (one host).
/// IPv4 ranges also match IPv4 clients seen as v4-mapped IPv6 (a dual-stack listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8` or `192.0.2.7`; the address must be the network's
    /// first (host bits zero), as a typo there is more likely than a deliberate one.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, len) = match text.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (text, None),
        };
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("\"{text}\" is not a CIDR (ADDR/LEN, e.g. 10.0.0.0/8)"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(l) if l <= max => l,
                _ => return Err(format!("\"{text}\": the prefix length must be 0..={max}")),
            },
        };
        let cidr = Cidr { network: ip, len };
        if cidr.masked(ip) != ip {
            return Err(format!(
                "\"{text}\" has bits set after its /{len} prefix (the network is {}/{len})",
                cidr.masked(ip)
            ));
        }
        Ok(cidr)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits =
                    u32::from(v4) & u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4(bits.into())
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6)
                    & u128::MAX
                        .checked_shl(128 - u32::from(self.len))
                        .unwrap_or(0);
                IpAddr::V6(bits.into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.network.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            ip => ip,
        };
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
        ]
    }

    fn version() -> impl Strategy<Value = Version> {
        prop_oneof![Just(Version::V1), Just(Version::V2)]
    }

    /// What the parser gives back for a header written for (s, d).
    fn expected(s: SocketAddr, d: SocketAddr) -> (SocketAddr, SocketAddr) {
        same_family(s, d)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse(&bytes);
            let _ = looks_like_header(&bytes);
        }

        #[test]
        fn bytes_after_a_signature_never_panic(v2 in any::<bool>(), rest in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut bytes = if v2 { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            bytes.extend(rest);
            if let Ok(Some(h)) = parse(&bytes) {
                prop_assert!(h.len <= bytes.len() && h.len <= MAX_HEADER);
            }
        }

        #[test]
        fn every_written_header_round_trips_split_anywhere(
            version in version(),
            datagram in any::<bool>(),
            s in addr(),
            d in addr(),
            payload in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let transport = if datagram { Transport::Datagram } else { Transport::Stream };
            let header = write(version, transport, s, d);
            let bytes = header.as_bytes();
            prop_assert!(bytes.len() <= MAX_WRITTEN);
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..cut]), Ok(None), "cut at {}", cut);
                prop_assert!(looks_like_header(&bytes[..cut.max(1)]));
            }
            let mut with_payload = bytes.to_vec();
            with_payload.extend(&payload);
            let parsed = parse(&with_payload).unwrap().unwrap();
            prop_assert_eq!(parsed.len, bytes.len());
            prop_assert_eq!(parsed.version, version);
            prop_assert_eq!(parsed.addresses, Some(expected(s, d)));
        }
    }

    #[test]
    fn v1_examples() {
        let h = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET").unwrap();
        let h = h.unwrap();
        assert_eq!(h.len, 45);
        assert_eq!(
            h.addresses,
            Some((
                "192.0.2.1:56324".parse().unwrap(),
                "198.51.100.2:443".parse().unwrap()
            ))
        );
        let h = parse(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.addresses.unwrap().0, "[2001:db8::1]:1".parse().unwrap());
        let unknown = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nx")
            .unwrap()
            .unwrap();
        assert_eq!((unknown.len, unknown.addresses), (35, None));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().addresses,
            None
        );
    }

    #[test]
    fn malformed_v1_is_told_from_incomplete() {
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"PROXX"), Err(Malformed::NoSignature));
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n").is_err());
        assert!(parse(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n").is_err());
        assert!(parse(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n").is_err());
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 100]].concat();
        assert_eq!(parse(&long), Err(Malformed::V1TooLong));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Malformed::NoSignature));
        assert!(!looks_like_header(b"GET"));
        assert!(looks_like_header(b"PROXY TCP4"));
    }

    #[test]
    fn v2_local_keeps_the_real_peer_and_skips_its_body() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 3, 9, 9, 9]);
        let h = parse(&local).unwrap().unwrap();
        assert_eq!((h.len, h.addresses), (19, None));
        // LOCAL with an address block (some senders fill it in): still ignored.
        let mut proxied = write(
            Version::V2,
            Transport::Stream,
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
        )
        .as_bytes()
        .to_vec();
        proxied[12] = 0x20;
        assert_eq!(parse(&proxied).unwrap().unwrap().addresses, None);
    }

    #[test]
    fn v2_with_tlvs_and_bounds() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([0x21, 0x11, 0, 12 + 7]);
        h.extend([1, 2, 3, 4, 5, 6, 7, 8, 0, 80, 1, 187]);
        h.extend([0x02, 0, 4, b'a', b'b', b'c', b'd']); // PP2_TYPE_AUTHORITY
        let p = parse(&h).unwrap().unwrap();
        assert_eq!(p.len, 35);
        assert_eq!(p.addresses.unwrap().0, "1.2.3.4:80".parse().unwrap());
        let mut big = V2_SIGNATURE.to_vec();
        big.extend([0x21, 0x11, 0x02, 0x09]);
        assert_eq!(parse(&big), Err(Malformed::V2TooLong));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse(&short).is_err());
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.push(0x31);
        assert!(parse(&v3).is_err());
        // AF_UNSPEC with PROXY: accepted, no addresses (the spec: the receiver keeps its own).
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend([0x21, 0x00, 0, 0]);
        assert_eq!(parse(&unspec).unwrap().unwrap().addresses, None);
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let w = write(
            Version::V1,
            Transport::Stream,
            "1.2.3.4:5".parse().unwrap(),
            "[::1]:6".parse().unwrap(),
        );
        assert_eq!(w.as_bytes(), b"PROXY TCP6 ::ffff:1.2.3.4 ::1 5 6\r\n");
    }

    #[test]
    fn cidrs() {
        let net = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(net.contains("127.0.0.3".parse().unwrap()));
        assert!(net.contains("::ffff:127.0.0.3".parse().unwrap()));
        assert!(!net.contains("10.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        let host = Cidr::parse("192.0.2.7").unwrap();
        assert!(host.contains("192.0.2.7".parse().unwrap()));
        assert!(!host.contains("192.0.2.8".parse().unwrap()));
        assert!(
            Cidr::parse("fd00::/8")
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        assert!(Cidr::parse("10.0.0.1/8").is_err());
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten/8").is_err());
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
    }
}
