#!/usr/bin/env bash
# DNS queries per second through weir and through NGINX's stream module, side by side, to
# the same unbound on loopback, in one run: unbound direct (the ceiling), then weir and
# nginx alternately, RUNS runs of SECONDS each, and the median of each.
#
#   bash benches/udp_qps.sh              # builds target/release/weir if needed
#   RUNS=5 SECONDS_EACH=5 bash benches/udp_qps.sh
#
# Needs: unbound, nginx with the stream module (Debian: nginx + libnginx-mod-stream, or
# nginx-full), and dnsperf if available (else a bounded Python client, much slower: then
# the client is the limit and the numbers only show that neither proxy is). Installs
# nothing itself; on Debian:
#   apt-get install -y unbound nginx libnginx-mod-stream dnsperf
#
# Both proxies are set up alike: one UDP listener on 127.0.0.1, one backend, sessions kept
# per client address (nginx: no proxy_responses, so a session outlives one answer, as in
# weir), as many workers as cores. Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SECONDS_EACH=${SECONDS_EACH:-4}
CLIENTS=${CLIENTS:-8}        # dnsperf -c: client sockets, i.e. sessions through the proxy
OUTSTANDING=${OUTSTANDING:-200}
WEIR=${WEIR:-target/release/weir}

need() { command -v "$1" >/dev/null || { echo "udp_qps: $1 is not installed ($2)" >&2; exit 2; }; }
need unbound "apt-get install -y unbound"
need nginx "apt-get install -y nginx libnginx-mod-stream"

WORK=$(mktemp -d -t weir-udp-qps.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_udp_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_answer() { # PORT: until a query through it is answered (10 s at most)
    local port=$1
    for _ in $(seq 100); do
        if query_once "$port"; then return 0; fi
        sleep 0.1
    done
    echo "udp_qps: nothing answers on port $port" >&2
    exit 1
}

query_once() {
    python3 - "$1" <<'EOF'
import socket, sys
q = bytes.fromhex("abcd01000001000000000000") + b"\x01a\x04weir\x04test\x00" + b"\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
s.sendto(q, ("127.0.0.1", int(sys.argv[1])))
try:
    r = s.recv(4096)
except OSError:
    sys.exit(1)
sys.exit(0 if r[:2] == b"\xab\xcd" and b"\x00\x04\x0a\x00\x00\x01" in r else 1)
EOF
}

# --- unbound: one server, local data only, as many threads as cores.
CORES=$(nproc)
UNBOUND_PORT=$(free_udp_port)
mkdir -p "$WORK/unbound"
cat >"$WORK/unbound/unbound.conf" <<EOF
server:
  interface: 127.0.0.1
  port: $UNBOUND_PORT
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$WORK/unbound"
  pidfile: "$WORK/unbound/unbound.pid"
  use-syslog: no
  logfile: "$WORK/unbound/unbound.log"
  verbosity: 0
  do-ip6: no
  do-tcp: no
  num-threads: $CORES
  so-reuseport: yes
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "weir.test." static
  local-data: "a.weir.test. A 10.0.0.1"
  local-data: "b.weir.test. A 10.0.0.2"
  local-data: 'who.weir.test. TXT "bench"'
remote-control:
  control-enable: no
EOF
unbound -d -c "$WORK/unbound/unbound.conf" >/dev/null 2>&1 &
PIDS+=($!)
wait_answer "$UNBOUND_PORT"

# --- weir
if [ ! -x "$WEIR" ]; then
    echo "building $WEIR ..." >&2
    cargo build --release --quiet
fi
WEIR_PORT=$(free_udp_port)
cat >"$WORK/weir.yaml" <<EOF
listeners:
  dns:
    bind: 127.0.0.1:$WEIR_PORT
    protocol: udp
    pool: dns
pools:
  dns:
    backends:
      - address: 127.0.0.1:$UNBOUND_PORT
EOF
RUST_LOG=warn "$WEIR" run -c "$WORK/weir.yaml" 2>"$WORK/weir.log" &
WEIR_PID=$!
PIDS+=("$WEIR_PID")
wait_answer "$WEIR_PORT"

# --- nginx
NGINX_PORT=$(free_udp_port)
mkdir -p "$WORK/nginx"
STREAM_MODULE=""
for m in /usr/lib/nginx/modules/ngx_stream_module.so /usr/lib64/nginx/modules/ngx_stream_module.so; do
    if [ -f "$m" ]; then STREAM_MODULE="load_module $m;"; fi
done
cat >"$WORK/nginx/nginx.conf" <<EOF
$STREAM_MODULE
worker_processes $CORES;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
daemon off;
events { worker_connections 8192; }
stream {
    upstream dns { server 127.0.0.1:$UNBOUND_PORT; }
    server {
        listen 127.0.0.1:$NGINX_PORT udp reuseport;
        proxy_pass dns;
        proxy_timeout 30s;
    }
}
EOF
nginx -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_answer "$NGINX_PORT"

# --- the client
printf 'a.weir.test A\nb.weir.test A\nwho.weir.test TXT\n' >"$WORK/queries"
if command -v dnsperf >/dev/null; then
    CLIENT="dnsperf -c $CLIENTS -q $OUTSTANDING -l $SECONDS_EACH"
    measure() { # PORT -> queries/s
        dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/queries" -c "$CLIENTS" -q "$OUTSTANDING" \
            -l "$SECONDS_EACH" -t 2 2>/dev/null >"$WORK/dnsperf.out"
        # "QPS LOST COMPLETED": queries/s, queries that got no answer within 2 s, answers.
        awk '/Queries lost:/ {lost = $3} /Queries per second:/ {qps = int($4)}
             /Queries completed:/ {done = $3} END {print qps, lost, done}' "$WORK/dnsperf.out"
    }
else
    CLIENT="python (dnsperf not installed): $CLIENTS sockets, $SECONDS_EACH s"
    measure() {
        python3 - "$1" "$SECONDS_EACH" "$CLIENTS" <<'EOF'
import socket, sys, time, select
port, secs, clients = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
q = bytes.fromhex("abcd01000001000000000000") + b"\x01a\x04weir\x04test\x00" + b"\x00\x01\x00\x01"
socks = []
for _ in range(clients):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("127.0.0.1", port)); s.setblocking(False)
    socks.append(s)
window, done, end = 16, 0, time.time() + secs
for s in socks:
    for _ in range(window): s.send(q)
while time.time() < end:
    ready, _, _ = select.select(socks, [], [], 0.5)
    if not ready:  # lost datagrams: refill the window
        for s in socks: s.send(q)
    for s in ready:
        try:
            while True:
                s.recv(4096); done += 1; s.send(q)
        except BlockingIOError:
            pass
print(int(done / secs), "?", done)
EOF
    }
fi

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# CPU time (user + system, clock ticks) of a process and its children, so far.
cpu_ticks() {
    local pid total=0
    for pid in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
    done
    echo "$total"
}

# measure PORT through the proxy PID: "QPS LOST CPU_US_PER_QUERY", the proxy's own CPU time
# per answered query (it moves less with the shared machine's load than queries/s do).
measure_proxy() {
    local before qps lost answered
    before=$(cpu_ticks "$2")
    read -r qps lost answered < <(measure "$1")
    awk -v t="$(($(cpu_ticks "$2") - before))" -v hz="$(getconf CLK_TCK)" -v n="$answered" \
        -v q="$qps" -v l="$lost" 'BEGIN {printf "%s %s %.2f\n", q, l, (n > 0) ? t / hz * 1e6 / n : 0}'
}

echo "udp_qps: $CORES cores, $RUNS runs of ${SECONDS_EACH}s each, client: $CLIENT" >&2
read -r direct direct_lost _ < <(measure "$UNBOUND_PORT")
echo "  unbound direct: $direct q/s ($direct_lost lost)" >&2
weir_runs=()
nginx_runs=()
weir_cpu=()
nginx_cpu=()
for run in $(seq "$RUNS"); do
    read -r w w_lost w_cpu < <(measure_proxy "$WEIR_PORT" "$WEIR_PID")
    read -r n n_lost n_cpu < <(measure_proxy "$NGINX_PORT" "$NGINX_PID")
    echo "  run $run: weir $w q/s ($w_lost lost, $w_cpu µs CPU/query), nginx $n q/s ($n_lost lost, $n_cpu µs CPU/query)" >&2
    weir_runs+=("$w")
    nginx_runs+=("$n")
    weir_cpu+=("$w_cpu")
    nginx_cpu+=("$n_cpu")
done
weir_median=$(printf '%s\n' "${weir_runs[@]}" | median)
nginx_median=$(printf '%s\n' "${nginx_runs[@]}" | median)
weir_cpu_median=$(printf '%s\n' "${weir_cpu[@]}" | median)
nginx_cpu_median=$(printf '%s\n' "${nginx_cpu[@]}" | median)
ratio=$(awk -v w="$weir_median" -v n="$nginx_median" 'BEGIN { if (n > 0) printf "%.2f", w / n; else print "n/a" }')

echo "unbound direct: $direct queries/s"
echo "weir:           $weir_median queries/s (median of $RUNS)"
echo "nginx stream:   $nginx_median queries/s (median of $RUNS)"
echo "weir / nginx:   $ratio"
echo "weir cpu:       $weir_cpu_median µs/query"
echo "nginx cpu:      $nginx_cpu_median µs/query"
