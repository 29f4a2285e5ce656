//! The stream-verdict program, assembled by hand (struct bpf_insn: u8 code, u8 dst:4|src:4,
//! i16 off, i32 imm; little-endian machine).
//!
//! ```text
//! r6 = r1                                  ; ctx (struct __sk_buff *)
//! r2 = *(u32 *)(r6 + 136)                  ; local_port, host order
//! r3 = *(u32 *)(r6 + 132)                  ; remote_port, network order in the upper 16 bits
//! r2 |= r3
//! *(u32 *)(r10 - 4) = r2                   ; key on the stack
//! r1 = peers map ; r2 = r10 - 4 ; call map_lookup_elem
//! if r0 == 0 goto pass
//! r7 = *(u32 *)(r0 + 0)                    ; peer's index in the sockmap
//! [count] r1 = *(u32 *)(r6 + 0) ; lock *(u64 *)(r0 + 8) += r1   ; bytes received by this socket
//! r1 = r6 ; r2 = sockmap ; r3 = r7 ; r4 = 0 ; call sk_redirect_map
//! pass: r0 = 1 (SK_PASS) ; exit            ; a failed redirect or unknown socket: keep locally
//! ```

const CALL_MAP_LOOKUP: i32 = 1;
const CALL_SK_REDIRECT_MAP: i32 = 52;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst & 0xf) | (src << 4)) as u64) << 8
        | ((off as u16) as u64) << 16
        | ((imm as u32) as u64) << 32
}

/// Two instructions: load a map's descriptor (BPF_PSEUDO_MAP_FD = 1) into `dst`.
fn ld_map(dst: u8, map_fd: i32) -> [u64; 2] {
    [insn(0x18, dst, 1, 0, map_fd), 0]
}

/// The key a socket is found by in the peers map: what the program computes from its
/// __sk_buff (local port in host order | remote port in network order << 16).
pub fn key(local_port: u16, remote_port: u16) -> u32 {
    local_port as u32 | (remote_port.to_be() as u32) << 16
}

pub fn verdict(peers_fd: i32, sockmap_fd: i32, count: bool) -> Vec<u64> {
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),   // r6 = r1
        insn(0x61, 2, 6, 136, 0), // r2 = local_port
        insn(0x61, 3, 6, 132, 0), // r3 = remote_port
        insn(0x4f, 2, 3, 0, 0),   // r2 |= r3
        insn(0x63, 10, 2, -4, 0), // *(u32*)(r10-4) = r2
    ];
    p.extend(ld_map(1, peers_fd));
    p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
    p.push(insn(0x07, 2, 0, 0, -4)); // r2 += -4
    p.push(insn(0x85, 0, 0, 0, CALL_MAP_LOOKUP));
    let tail = if count { 9 } else { 7 }; // instructions between the jump and pass
    p.push(insn(0x15, 0, 0, tail, 0)); // if r0 == 0 goto pass
    p.push(insn(0x61, 7, 0, 0, 0)); // r7 = peer index
    if count {
        p.push(insn(0x61, 1, 6, 0, 0)); // r1 = skb->len
        p.push(insn(0xdb, 0, 1, 8, 0)); // lock *(u64*)(r0+8) += r1 (BPF_ATOMIC, BPF_ADD)
    }
    p.push(insn(0xbf, 1, 6, 0, 0)); // r1 = ctx
    p.extend(ld_map(2, sockmap_fd));
    p.push(insn(0xbf, 3, 7, 0, 0)); // r3 = r7
    p.push(insn(0xb7, 4, 0, 0, 0)); // r4 = 0 (egress of the peer)
    p.push(insn(0x85, 0, 0, 0, CALL_SK_REDIRECT_MAP));
    // SK_PASS (1) whatever the helper returned: when the redirect failed (the peer is not in
    // the sockmap yet) the bytes stay in this socket's own receive queue, where user space
    // reads them, instead of being dropped after TCP acknowledged them.
    p.push(insn(0xb7, 0, 0, 0, 1)); // pass: r0 = SK_PASS
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    p
}
