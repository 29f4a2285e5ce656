#!/usr/bin/env python3
"""Idle-connection memory: RSS a proxy gains per idle connection held through it.

Usage: idle_conns.py PORT COUNT PID [PID...]

Opens COUNT connections to 127.0.0.1:PORT (a Redis backend behind the proxy), sends one
PING on each and reads the +PONG, so every connection has carried traffic both ways and
is then idle, as a pooled keep-alive client connection would be. Prints the summed VmRSS
growth of the PIDs divided by COUNT, in bytes per connection, then closes everything.
"""

import socket
import sys
import time

PING = b"*1\r\n$4\r\nPING\r\n"
SETTLE_SECONDS = 1.0
DEADLINE_SECONDS = 120.0


def rss_bytes(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def main():
    port, count, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    started = time.monotonic()
    before = rss_bytes(pids)
    held = []
    try:
        for _ in range(count):
            if time.monotonic() - started > DEADLINE_SECONDS:
                sys.exit(f"idle_conns: gave up after {len(held)} connections")
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(PING)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    sys.exit(f"idle_conns: connection {len(held)} closed by the proxy")
                reply += chunk
            held.append(s)
        time.sleep(SETTLE_SECONDS)
        after = rss_bytes(pids)
        print(round((after - before) / count))
    finally:
        for s in held:
            s.close()


if __name__ == "__main__":
    main()
