//! The PROXY protocol header parser (`weir::proxy_protocol::parse`), on the bytes a
//! client's connection begins with. Besides never panicking, it must keep the promises a
//! caller reading a socket relies on, at every prefix of the input:
//!
//! - `Ok(None)` ("more bytes needed") until the header is complete, then the same
//!   `Ok(Some(header))` for every longer prefix, its `len` where it became complete (it
//!   never reads past its end);
//! - once `Err`, `Err` whatever follows;
//! - `looks_like_header` (what refuses an untrusted source) agrees with the parser on
//!   whether the bytes start with a signature;
//! - a header with addresses, written back by `write`, parses to the same addresses.

use weir::proxy_protocol::{Header, Malformed, Transport, looks_like_header, parse, write};

fn check_prefixes(data: &[u8]) {
    let mut complete: Option<Header> = None;
    let mut failed_at = None;
    for k in 0..=data.len() {
        let got = parse(&data[..k]);
        if k > 0 {
            assert_eq!(
                looks_like_header(&data[..k]),
                got != Err(Malformed::NoSignature),
                "looks_like_header disagrees with parse on {:?}: {got:?}",
                &data[..k]
            );
        }
        match (got, complete, failed_at) {
            (Err(_), None, _) => failed_at = failed_at.or(Some(k)),
            (Ok(None), None, None) => {}
            (Ok(Some(h)), None, None) => {
                assert_eq!(h.len, k, "a header of {} bytes complete at {k}", h.len);
                complete = Some(h);
            }
            (Ok(Some(h)), Some(first), None) => assert_eq!(h, first, "changed at {k}"),
            (got, complete, failed_at) => panic!(
                "at {k} bytes: {got:?}, after complete {complete:?} / failed at {failed_at:?}"
            ),
        }
    }
    if let Some(h) = complete {
        roundtrip(h);
    }
}

fn roundtrip(h: Header) {
    let Some((source, destination)) = h.addresses else {
        return;
    };
    let written = write(h.version, Transport::Stream, source, destination);
    let again = parse(written.as_bytes());
    let again = again.unwrap_or_else(|e| panic!("{:?} does not parse: {e}", written.as_bytes()));
    let again = again.expect("a written header is complete");
    assert_eq!(again.len, written.as_bytes().len());
    assert_eq!(again.version, h.version);
    assert_eq!(again.addresses, h.addresses, "{:?}", written.as_bytes());
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        // The parser never looks past its 536-byte bound; nor does this.
        let data = &data[..data.len().min(weir::proxy_protocol::MAX_HEADER + 8)];
        check_prefixes(data);
    });
}
