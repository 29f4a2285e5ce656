# Ends through the relay: half-close both ways, reset both ways. Usage:
#   sockmap-relay 127.0.0.1:RELAY 127.0.0.1:BACKEND & python3 ends.py RELAY BACKEND
# (each socket operation has a 5 s timeout)
import socket, time, struct, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind(("127.0.0.1", int(sys.argv[2]))); ls.listen(8)
def pair():
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    b, _ = ls.accept(); b.settimeout(5)
    return c, b
# 1. half-close from client: backend sees EOF after data, can still answer
c, b = pair()
# one round trip first: when the client has the answer, the relay has put the pair in the map
c.sendall(b"hello"); assert b.recv(5) == b"hello"; b.sendall(b"ready"); assert c.recv(5) == b"ready"
c.sendall(b" more"); c.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = b.recv(100)
    if not d: break
    got += d
print("half-close: backend got", got, "then EOF")
b.sendall(b"answer after half-close"); b.close()
r = b""
while True:
    d = c.recv(100)
    if not d: break
    r += d
print("half-close: client got", r, "then EOF"); c.close()
time.sleep(0.2)
# 2. reset from backend: client should see a reset
c, b = pair()
c.sendall(b"x"); print("reset: backend got", b.recv(10))
b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); b.close()
try:
    d = c.recv(10); print("reset: client recv ->", d, "(EOF, not reset)" if d == b"" else "")
except Exception as e: print("reset: client recv ->", repr(e))
c.close(); time.sleep(0.2)
# 3. reset from client: backend should see a reset
c, b = pair()
c.sendall(b"y"); print("reset2: backend got", b.recv(10))
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
try:
    d = b.recv(10); print("reset2: backend recv ->", d, "(EOF, not reset)" if d == b"" else "")
except Exception as e: print("reset2: backend recv ->", repr(e))
b.close(); time.sleep(0.3)
