//! The only module with `unsafe`: the bpf(2) syscall (map create/update/delete/lookup, program
//! load and attach) and poll(2)/shutdown(2)/recv(2) on raw descriptors. Numbers checked against
//! /usr/include/linux/bpf.h of kernel 6.18 (linux-libc-dev).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_ATTACH: i64 = 8;
pub const MAP_HASH: u32 = 1;
pub const MAP_SOCKMAP: u32 = 15;
const PROG_SK_SKB: u32 = 14;
const ATTACH_STREAM_VERDICT: u32 = 5;

/// `union bpf_attr` is at most a few hundred bytes; the kernel accepts a shorter, zero-padded one.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: i64, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable, zero-padded bpf_attr of the size passed; every pointer
    // stored in it (keys, values, instructions, log buffer) outlives this call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, 128u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd(r: i64) -> OwnedFd {
    // SAFETY: r is a new descriptor the kernel just returned to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

pub fn map_create(kind: u32, key: u32, value: u32, max: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new()
        .u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, max);
    bpf(BPF_MAP_CREATE, &mut a).map(fd)
}

pub fn map_update(map: RawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut a = Attr::new()
        .u32(0, map as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

pub fn map_delete(map: RawFd, key: &[u8]) -> io::Result<()> {
    let mut a = Attr::new().u32(0, map as u32).u64(8, key.as_ptr() as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(|_| ())
}

pub fn map_lookup(map: RawFd, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut a = Attr::new()
        .u32(0, map as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a).map(|_| ())
}

/// Loads an sk_skb program (instructions as 8-byte struct bpf_insn); on a verifier error, the
/// error carries the verifier's log.
pub fn prog_load(insns: &[u64]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new()
        .u32(0, PROG_SK_SKB)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    bpf(BPF_PROG_LOAD, &mut a).map(fd).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!("{e}: {}", String::from_utf8_lossy(&log[..end])),
        )
    })
}

pub fn attach_verdict(map: RawFd, prog: RawFd) -> io::Result<()> {
    let mut a = Attr::new()
        .u32(0, map as u32)
        .u32(4, prog as u32)
        .u32(8, ATTACH_STREAM_VERDICT);
    bpf(BPF_PROG_ATTACH, &mut a).map(|_| ())
}

/// poll(2) on two descriptors; returns their revents.
pub fn poll2(a: RawFd, b: RawFd, events: [i16; 2], timeout_ms: i32) -> io::Result<[i16; 2]> {
    let mut p = [
        libc::pollfd {
            fd: a,
            events: events[0],
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: events[1],
            revents: 0,
        },
    ];
    // SAFETY: p is a valid array of 2 pollfd for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok([p[0].revents, p[1].revents])
}

pub fn shutdown_write(s: RawFd) {
    // SAFETY: plain syscall on a descriptor we own; errors (already closed peer) are harmless.
    unsafe { libc::shutdown(s, libc::SHUT_WR) };
}

/// Sets SO_LINGER 0 so that close() sends a reset (propagating a reset to the other side).
pub fn linger_zero(s: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: l is a valid linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// Reads the pending socket error (SO_ERROR), e.g. ECONNRESET.
pub fn so_error(s: RawFd) -> i32 {
    let mut e: i32 = 0;
    let mut len = 4u32;
    // SAFETY: e and len are valid for the sizes passed.
    unsafe {
        libc::getsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut e as *mut i32 as *mut libc::c_void,
            &mut len,
        )
    };
    e
}
