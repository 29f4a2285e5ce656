//! sockmap-relay LISTEN BACKEND [--count] : a TCP relay whose bytes move in the kernel.
//!
//! Each accepted client gets a backend connection; both sockets go into a BPF sockmap (slots
//! 2n and 2n+1) whose stream-verdict program redirects each socket's bytes to its peer. A thread
//! per pair then only waits in poll() for the ends: EOF (half-close, propagated with
//! shutdown(SHUT_WR)), error/reset (propagated with an SO_LINGER 0 close). VERBOSE=1 prints one
//! line per closed pair (how it ended, the byte counts the program kept with --count).

mod bpf;
mod prog;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

const PAIRS: u32 = 4096;

struct Maps {
    sockmap: OwnedFd,
    peers: OwnedFd,
    free: Mutex<Vec<u32>>,
    verbose: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: sockmap-relay LISTEN BACKEND [--count]");
        std::process::exit(2);
    }
    let count = args.iter().any(|a| a == "--count");
    let sockmap = bpf::map_create(bpf::MAP_SOCKMAP, 4, 4, PAIRS * 2).expect("sockmap");
    // peers: key (ports) → { u32 peer slot, u32 pad, u64 bytes received by this socket }
    let peers = bpf::map_create(bpf::MAP_HASH, 4, 16, PAIRS * 2).expect("peers map");
    let insns = prog::verdict(peers.as_raw_fd(), sockmap.as_raw_fd(), count);
    let prog = bpf::prog_load(&insns).expect("load verdict program");
    bpf::attach_verdict(sockmap.as_raw_fd(), prog.as_raw_fd()).expect("attach");
    let maps = Arc::new(Maps {
        sockmap,
        peers,
        free: Mutex::new((0..PAIRS).rev().collect()),
        verbose: std::env::var_os("VERBOSE").is_some(),
    });
    let listener = TcpListener::bind(&args[1]).expect("bind");
    eprintln!("sockmap-relay: {} -> {} (count: {count})", args[1], args[2]);
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let (maps, backend) = (maps.clone(), args[2].clone());
        std::thread::spawn(move || {
            if let Err(e) = relay(&maps, client, &backend) {
                eprintln!("pair: {e}");
            }
        });
    }
}

fn key_of(s: &TcpStream) -> std::io::Result<u32> {
    Ok(prog::key(s.local_addr()?.port(), s.peer_addr()?.port()))
}

fn relay(maps: &Maps, mut client: TcpStream, backend: &str) -> std::io::Result<()> {
    let mut server = TcpStream::connect(backend)?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let slot = maps.free.lock().unwrap().pop().expect("free slot");
    let (ci, si) = (slot * 2, slot * 2 + 1);
    let (ck, sk) = (key_of(&client)?, key_of(&server)?);
    let val = |peer: u32| [peer.to_ne_bytes(), [0; 4], [0; 4], [0; 4]].concat();
    bpf::map_update(maps.peers.as_raw_fd(), &ck.to_ne_bytes(), &val(si))?;
    bpf::map_update(maps.peers.as_raw_fd(), &sk.to_ne_bytes(), &val(ci))?;
    let sm = maps.sockmap.as_raw_fd();
    // Server first: a client speaks first, and its bytes can only be redirected once the
    // server is in the map (until then the program leaves them in the client's queue).
    if let Err(e) = insert(sm, (si, &server), (ci, &client)) {
        // The kernel takes only ESTABLISHED sockets: a client that already half-closed (its
        // socket is in CLOSE_WAIT) gets EOPNOTSUPP, and must stay on the userspace path.
        let _ = bpf::map_delete(sm, &si.to_ne_bytes());
        unmap(maps, slot, ck, sk);
        if maps.verbose {
            eprintln!("pair {slot}: not in the sockmap ({e}), copied in user space");
        }
        return copy_userspace(client, server);
    }
    // Bytes that arrived before the sockets were in the map are still in their receive
    // queues: move them once by hand (a real integration must order this against new bytes).
    let early = drain(&mut client, &mut server)? + drain(&mut server, &mut client)?;
    let how = wait_ends(&client, &server);
    let _ = bpf::map_delete(sm, &ci.to_ne_bytes());
    let _ = bpf::map_delete(sm, &si.to_ne_bytes());
    let (cb, sb) = (bytes(maps, ck), bytes(maps, sk));
    unmap(maps, slot, ck, sk);
    if maps.verbose {
        eprintln!(
            "pair {slot}: {how}; client->server {cb} B, server->client {sb} B, by hand {early} B"
        );
    }
    Ok(())
}

/// Writes the server then the client socket into the sockmap.
fn insert(sm: i32, server: (u32, &TcpStream), client: (u32, &TcpStream)) -> std::io::Result<()> {
    for (slot, s) in [server, client] {
        bpf::map_update(
            sm,
            &slot.to_ne_bytes(),
            &(s.as_raw_fd() as u32).to_ne_bytes(),
        )?;
    }
    Ok(())
}

fn unmap(maps: &Maps, slot: u32, ck: u32, sk: u32) {
    let _ = bpf::map_delete(maps.peers.as_raw_fd(), &ck.to_ne_bytes());
    let _ = bpf::map_delete(maps.peers.as_raw_fd(), &sk.to_ne_bytes());
    maps.free.lock().unwrap().push(slot);
}

/// The fallback: copy both ways in user space, passing each EOF on with shutdown(SHUT_WR).
fn copy_userspace(client: TcpStream, server: TcpStream) -> std::io::Result<()> {
    let (mut c2, mut s2) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(std::net::Shutdown::Write);
    });
    let (mut c, mut s) = (client, server);
    let _ = std::io::copy(&mut s, &mut c);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn drain(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<usize> {
    from.set_nonblocking(true)?;
    let mut buf = [0u8; 16384];
    let mut n = 0;
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                to.write_all(&buf[..k])?;
                n += k;
            }
            Err(_) => break,
        }
    }
    from.set_nonblocking(false)?;
    Ok(n)
}

fn bytes(maps: &Maps, key: u32) -> u64 {
    let mut v = [0u8; 16];
    match bpf::map_lookup(maps.peers.as_raw_fd(), &key.to_ne_bytes(), &mut v) {
        Ok(()) => u64::from_ne_bytes(v[8..16].try_into().unwrap()),
        Err(_) => 0,
    }
}

/// Waits for both directions to end. EOF on one side → shutdown(SHUT_WR) of the other; an
/// error/reset on one side → reset of the other. Returns how the pair ended.
fn wait_ends(client: &TcpStream, server: &TcpStream) -> String {
    let (c, s) = (client.as_raw_fd(), server.as_raw_fd());
    // POLLRDHUP only: bytes are redirected before user space could read them, so POLLIN
    // would report readiness for nothing.
    let rdhup = libc::POLLRDHUP;
    let mut open = [true, true];
    let mut how = Vec::new();
    while open[0] || open[1] {
        let ev = [
            if open[0] { rdhup } else { 0 },
            if open[1] { rdhup } else { 0 },
        ];
        let Ok(r) = bpf::poll2(c, s, ev, 3_600_000) else {
            break;
        };
        for (i, (me, peer, name)) in [(c, s, "client"), (s, c, "server")].into_iter().enumerate() {
            if !open[i] || r[i] == 0 {
                continue;
            }
            let err = bpf::so_error(me); // reading SO_ERROR also clears it
            if err == libc::EPIPE && !open[1 - i] {
                // The peer's EOF (its FIN skb) went through the verdict program and was
                // redirected to this socket after we shut its write side: not a reset.
                how.push(format!(
                    "{name} EPIPE after its write side was shut (ignored)"
                ));
                continue;
            }
            if r[i] & libc::POLLERR != 0 || err != 0 {
                how.push(format!(
                    "{name} error {err} (revents {:#x}) -> reset peer",
                    r[i]
                ));
                bpf::linger_zero(peer);
                return how.join(", ");
            }
            if r[i] & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
                how.push(format!("{name} EOF (revents {:#x}) -> shutdown peer", r[i]));
                bpf::shutdown_write(peer);
                open[i] = false;
            } else {
                how.push(format!("{name} readable without EOF (revents {:#x})", r[i]));
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    how.join(", ")
}
