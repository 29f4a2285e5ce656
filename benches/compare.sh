#!/usr/bin/env bash
# weir side by side with HAProxy and NGINX, on loopback. See docs/performance.md.
#
# Four setups — direct (no proxy), haproxy, nginx, weir — measured interleaved: every
# round measures each figure for every setup back to back (setup order rotates between
# rounds), and each reported figure is the median over the rounds. All traffic stays on
# 127.0.0.1; every load is bounded by a request count or a duration and by `timeout`.
#
# Knobs (environment): ROUNDS [5], DURATION iperf3 seconds [3], CONN_REQUESTS [20000],
# RR_REQUESTS [200000], IDLE_CONNS [10000], SETUPS ["direct haproxy nginx weir"],
# FIGURES [all but rr_counts conn_counts: system calls per request, see figure_counts],
# NO_INSTALL=1 skips apt-get, NO_BUILD=1 uses the existing target/release/weir.
# For experiments, a setup weir:VAR=VALUE runs weir with that environment variable set;
# weir:WEIR_BIN=PATH runs another build of weir (A/B in one run); weir:WEIR_ACCESS_LOG=1 turns
# on the redis listener's access_log (lines to the log file).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-3}
CONN_REQUESTS=${CONN_REQUESTS:-20000}
RR_REQUESTS=${RR_REQUESTS:-200000}
IDLE_CONNS=${IDLE_CONNS:-10000} # lowered to fit the open-file limit, see main
SETUPS=${SETUPS:-"direct haproxy nginx weir"}
FIGURES=${FIGURES:-"idle_memory throughput_1 throughput_8 conn_rate rr_latency udp_qps"}

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/weir-compare.XXXXXX)
RESULTS=$WORK/results.tsv
STARTED=$SECONDS
declare -A PID=()    # setup or backend name → pid of the process we started
declare -A PORT=()   # "SETUP redis" / "SETUP iperf" → port clients connect to

log() { echo "[$((SECONDS - STARTED))s] $*" >&2; }

cleanup() {
    local name
    for name in "${!PID[@]}"; do
        kill "${PID[$name]}" 2>/dev/null || true
    done
    for name in "${!PID[@]}"; do
        wait "${PID[$name]}" 2>/dev/null || true
    done
    log "stopped everything; logs and raw results in $WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- preparation

install_tools() {
    [[ ${NO_INSTALL:-0} == 1 ]] && return
    local missing=()
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v nginx >/dev/null || missing+=(nginx)
    [[ -e /usr/share/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
    command -v iperf3 >/dev/null || missing+=(iperf3)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-benchmark >/dev/null || missing+=(redis-tools)
    command -v jq >/dev/null || missing+=(jq)
    command -v unbound >/dev/null || missing+=(unbound)    # udp_qps.sh
    command -v dnsperf >/dev/null || missing+=(dnsperf)    # udp_qps.sh
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
}

build_weir() {
    [[ ${NO_BUILD:-0} == 1 ]] && return
    log "building weir (release)"
    (cd "$REPO" && cargo build --release --quiet)
}

# Free ports: bind port 0 a few times and keep what the kernel gave.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_listening() {
    local port=$1 deadline=$((SECONDS + 10))
    until ss -Hltn "sport = :$port" | grep -q .; do
        ((SECONDS < deadline)) || { log "nothing listens on $port"; return 1; }
        sleep 0.05
    done
}

# ---------------------------------------------------------------- backends

start_backends() {
    local ports
    read -r -a ports <<<"$(free_ports 2)"
    PORT[direct redis]=${ports[0]}
    PORT[direct iperf]=${ports[1]}
    redis-server --port "${ports[0]}" --bind 127.0.0.1 --save '' --appendonly no \
        --maxclients $((IDLE_CONNS + 1000)) --protected-mode no --daemonize no \
        >"$WORK/redis.log" 2>&1 &
    PID[redis]=$!
    iperf3 -s -p "${ports[1]}" --idle-timeout 30 >"$WORK/iperf3-server.log" 2>&1 &
    PID[iperf3]=$!
    wait_listening "${ports[0]}"
    wait_listening "${ports[1]}"
}

# ---------------------------------------------------------------- proxy setups

start_direct() { :; }

start_haproxy() {
    local cfg=$WORK/haproxy.cfg
    cat >"$cfg" <<EOF
global
    nbthread 2
    # Sized for idle_memory; HAProxy needs 2 descriptors per connection and 2 per pipe
    # (maxpipes defaults to maxconn/4, which would not fit a 20,000 open-file limit).
    maxconn $((IDLE_CONNS + 200))
    maxpipes 256
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen redis
    bind 127.0.0.1:${PORT[haproxy redis]}
    server redis 127.0.0.1:${PORT[direct redis]}
listen iperf
    bind 127.0.0.1:${PORT[haproxy iperf]}
    server iperf 127.0.0.1:${PORT[direct iperf]}
EOF
    haproxy -db -f "$cfg" >>"$WORK/haproxy.log" 2>&1 &
    PID[haproxy]=$!
}

start_nginx() {
    local cfg=$WORK/nginx.conf
    cat >"$cfg" <<EOF
load_module /usr/share/nginx/modules/ngx_stream_module.so;
worker_processes 2;
worker_rlimit_nofile $((IDLE_CONNS * 2 + 500));
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections $((IDLE_CONNS * 2 + 200)); }
stream {
    server {
        listen 127.0.0.1:${PORT[nginx redis]};
        proxy_pass 127.0.0.1:${PORT[direct redis]};
    }
    server {
        listen 127.0.0.1:${PORT[nginx iperf]};
        proxy_pass 127.0.0.1:${PORT[direct iperf]};
    }
}
EOF
    nginx -c "$cfg" -g 'daemon off;' >>"$WORK/nginx.log" 2>&1 &
    PID[nginx]=$!
}

# weir, or weir:VAR=VALUE for weir with an environment variable set (experiments).
start_weir() {
    local setup=$1 cfg=$WORK/${1//[^a-zA-Z0-9]/_}.yaml env=()
    [[ $setup == *:* ]] && env=("${setup#*:}")
    # weir:WEIR_ACCESS_LOG=1: the redis listener with access_log, its lines into weir.log.
    local access=false log=warn
    if [[ ${env[0]:-} == WEIR_ACCESS_LOG=1 ]]; then
        access=true
        log=warn,weir::access=info
    fi
    cat >"$cfg" <<EOF
shutdown_timeout: 1s
listeners:
  redis:
    bind: 127.0.0.1:${PORT[$setup redis]}
    pool: redis
    access_log: $access
  iperf:
    bind: 127.0.0.1:${PORT[$setup iperf]}
    pool: iperf
pools:
  redis:
    backends:
      - address: 127.0.0.1:${PORT[direct redis]}
  iperf:
    backends:
      - address: 127.0.0.1:${PORT[direct iperf]}
EOF
    local bin=$REPO/target/release/weir
    [[ ${env[0]:-} == WEIR_BIN=* ]] && bin=${env[0]#WEIR_BIN=} # A/B against another build
    env RUST_LOG=$log "${env[@]}" "$bin" run -c "$cfg" >>"$WORK/weir.log" 2>&1 &
    PID[$setup]=$!
}

start_setup() {
    local setup=$1
    [[ $setup == direct ]] && return
    if [[ -z ${PORT[$setup redis]:-} ]]; then
        local ports
        read -r -a ports <<<"$(free_ports 2)"
        PORT[$setup redis]=${ports[0]}
        PORT[$setup iperf]=${ports[1]}
    fi
    case $setup in
        haproxy) start_haproxy ;;
        nginx) start_nginx ;;
        weir | weir:*) start_weir "$setup" ;;
        *) log "unknown setup $setup"; exit 2 ;;
    esac
    if ! wait_listening "${PORT[$setup redis]}" || ! wait_listening "${PORT[$setup iperf]}"; then
        tail -n 5 "$WORK"/*.log >&2
        exit 1
    fi
}

stop_setup() {
    local setup=$1
    [[ -n ${PID[$setup]:-} ]] || return 0
    kill "${PID[$setup]}" 2>/dev/null || true
    wait "${PID[$setup]}" 2>/dev/null || true
    unset "PID[$setup]"
}

# Every process of a setup: NGINX's master and workers; one process for the others.
setup_pids() {
    local pid=${PID[$1]}
    # shellcheck disable=SC2046 # one pid per word, on purpose
    echo "$pid" $(pgrep -P "$pid" || true)
}

# ---------------------------------------------------------------- figures
# Each prints one number (several, space-separated, for rr_latency) or fails.

figure_throughput() {
    local setup=$1 streams=$2
    timeout $((DURATION + 20)) iperf3 -c 127.0.0.1 -p "${PORT[$setup iperf]}" \
        -t "$DURATION" -P "$streams" -J >"$WORK/iperf3.json" 2>&1 || return 1
    jq -e '.end.sum_received.bits_per_second / 1e9 * 100 | round / 100' "$WORK/iperf3.json"
}
figure_throughput_1() { figure_throughput "$1" 1; }
figure_throughput_8() { figure_throughput "$1" 8; }

# A new TCP connection per request (-k 0): accept + backend connect + one round trip.
figure_conn_rate() {
    timeout 120 redis-benchmark -h 127.0.0.1 -p "${PORT[$1 redis]}" -t ping_mbulk \
        -n "$CONN_REQUESTS" -c 50 -k 0 --csv 2>/dev/null |
        awk -F'"' '/PING_MBULK/ { print $4 }' | grep .
}

# Keep-alive request/response: requests/s, p50 ms, p99 ms.
figure_rr_latency() {
    timeout 120 redis-benchmark -h 127.0.0.1 -p "${PORT[$1 redis]}" -t ping_mbulk \
        -n "$RR_REQUESTS" -c 50 --csv 2>/dev/null |
        awk -F'"' '/PING_MBULK/ { print $4, $10, $14 }' | grep .
}

# System calls and context switches per request of the proxy's processes, counted by
# `perf stat` (tracepoints) attached during a conn_rate or rr_latency load: epoll_wait,
# futex, context switches, all system calls. A figure of its own (not in the default
# FIGURES: counting slows every system call a little, so it never shares a run with the
# CPU rows it would skew).
figure_counts() { # SETUP LOAD REQUESTS
    local setup=$1 load=$2 requests=$3 out=$WORK/perf-$$.csv perf_pid pids
    [[ $setup == direct ]] && { echo nan nan nan nan; return; }
    pids=$(setup_pids "$setup" | tr ' ' ',')
    perf stat -x, -o "$out" -p "$pids" -e 'syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_futex,context-switches,raw_syscalls:sys_enter' &
    perf_pid=$!
    sleep 0.3 # perf attaches
    "figure_$load" "$setup" >/dev/null || { kill -INT "$perf_pid"; wait "$perf_pid" || true; return 1; }
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    awk -F, -v n="$requests" '
        $3 ~ /epoll_wait|epoll_pwait/ { epoll += $1 }
        $3 ~ /sys_enter_futex/ { futex += $1 }
        $3 == "context-switches" { cs += $1 }
        $3 == "raw_syscalls:sys_enter" { all += $1 }
        END { printf "%.3f %.3f %.3f %.2f\n", epoll / n, futex / n, cs / n, all / n }' "$out"
}
figure_rr_counts() { figure_counts "$1" rr_latency "$RR_REQUESTS"; }
figure_conn_counts() { figure_counts "$1" conn_rate "$CONN_REQUESTS"; }

# Bytes of proxy RSS per idle connection (after one PING round trip on each).
figure_idle_memory() {
    [[ $1 == direct ]] && { echo nan; return; }
    # shellcheck disable=SC2046
    timeout 180 python3 "$REPO/benches/idle_conns.py" "${PORT[$1 redis]}" "$IDLE_CONNS" $(setup_pids "$1")
}

# UDP queries/s comes from benches/udp_qps.sh (DNS through weir and NGINX to one unbound;
# HAProxy has no UDP proxy). It runs once, after the TCP rounds, and its summary lines
# fill the udp_qps row. Without it (or its tools), the row says n/a.
figure_udp_qps() {
    if [[ ! -f $REPO/benches/udp_qps.sh ]]; then
        log "udp_qps: n/a (benches/udp_qps.sh not present)"
        return
    fi
    local out
    if ! out=$(timeout 300 bash "$REPO/benches/udp_qps.sh" 2>"$WORK/udp_qps.log"); then
        log "udp_qps: failed, see $WORK/udp_qps.log"
        return
    fi
    echo "$out" >"$WORK/udp_qps.out"
    awk '/^unbound direct:/ {print "udp_qps direct", $3} /^weir:/ {print "udp_qps weir", $2}
         /^nginx stream:/ {print "udp_qps nginx", $3}
         /^weir cpu:/ {print "udp_qps_cpu weir", $3} /^nginx cpu:/ {print "udp_qps_cpu nginx", $3}' \
        <<<"$out" | while read -r figure setup value; do
        printf '%s\t%s\t%s\t%s\n' "$figure" "$setup" 1 "$value" >>"$RESULTS"
        log "$figure $setup: $value"
    done
}

record() { # FIGURE SETUP ROUND VALUE...
    local figure=$1 setup=$2 round=$3
    shift 3
    local names=("$figure") i=0 value
    [[ $figure == rr_latency ]] && names=(rr_rps rr_p50_ms rr_p99_ms)
    [[ $figure == rr_counts ]] && names=(rr_epoll_wait rr_futex rr_cswitch rr_syscalls)
    [[ $figure == conn_counts ]] && names=(conn_epoll_wait conn_futex conn_cswitch conn_syscalls)
    for value in "$@"; do
        printf '%s\t%s\t%s\t%s\n' "${names[i]}" "$setup" "$round" "$value" >>"$RESULTS"
        i=$((i + 1))
    done
}

# CPU time (user + system, clock ticks) of every process of a setup, so far.
cpu_ticks() {
    local pid total=0
    for pid in $(setup_pids "$1"); do
        # Fields 14 and 15 of /proc/PID/stat; the command name (field 2) may hold spaces,
        # so count from after its closing parenthesis.
        total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
    done
    echo "$total"
}

# What the proxy's own CPU time bought during a figure: µs per request for conn_rate and
# rr_latency, ms per GB carried for throughput. Throughput and latency move with whatever
# else the shared machine runs; CPU per unit of work moves much less.
record_cpu() { # FIGURE SETUP ROUND TICKS FIRST_VALUE
    local figure=$1 setup=$2 round=$3 ticks=$4 value=$5 per
    local seconds
    seconds=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {print t / hz}')
    case $figure in
        conn_rate) per=$(awk -v s="$seconds" -v n="$CONN_REQUESTS" 'BEGIN {print s * 1e6 / n}') ;;
        rr_latency) per=$(awk -v s="$seconds" -v n="$RR_REQUESTS" 'BEGIN {print s * 1e6 / n}') ;;
        throughput_*) per=$(awk -v s="$seconds" -v g="$value" -v d="$DURATION" \
            'BEGIN {print (g > 0) ? s * 1e3 / (g * d / 8) : "nan"}') ;;
        *) return 0 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "${figure%_latency}_cpu" "$setup" "$round" "$per" >>"$RESULTS"
}

measure() { # FIGURE SETUP ROUND
    local out before=0
    [[ $2 != direct ]] && before=$(cpu_ticks "$2")
    if out=$("figure_$1" "$2"); then
        # shellcheck disable=SC2086
        record "$1" "$2" "$3" $out
        [[ $2 != direct ]] && record_cpu "$1" "$2" "$3" $(($(cpu_ticks "$2") - before)) "${out%% *}"
        log "round $3 $1 $2: $out"
    else
        record "$1" "$2" "$3" nan nan nan
        log "round $3 $1 $2: FAILED"
    fi
}

# ---------------------------------------------------------------- report

summarize() {
    python3 - "$RESULTS" "$SETUPS" <<'EOF'
import statistics, sys
from collections import defaultdict

path, setups = sys.argv[1], sys.argv[2].split()
values = defaultdict(list)
for line in open(path):
    figure, setup, _round, value = line.rstrip("\n").split("\t")
    if value != "nan":
        values[figure, setup].append(float(value))

rows = [
    ("throughput_1", "Gbit/s", True),
    ("throughput_8", "Gbit/s", True),
    ("conn_rate", "req/s", True),
    ("rr_rps", "req/s", True),
    ("rr_p50_ms", "ms", False),
    ("rr_p99_ms", "ms", False),
    ("idle_memory", "bytes/conn", False),
    ("udp_qps", "queries/s", True),
    ("throughput_1_cpu", "proxy CPU ms/GB", False),
    ("throughput_8_cpu", "proxy CPU ms/GB", False),
    ("conn_rate_cpu", "proxy CPU µs/req", False),
    ("rr_cpu", "proxy CPU µs/req", False),
    ("udp_qps_cpu", "proxy CPU µs/query", False),
    ("rr_epoll_wait", "per keep-alive req", False),
    ("rr_futex", "per keep-alive req", False),
    ("rr_cswitch", "per keep-alive req", False),
    ("rr_syscalls", "per keep-alive req", False),
    ("conn_epoll_wait", "per new conn", False),
    ("conn_futex", "per new conn", False),
    ("conn_cswitch", "per new conn", False),
    ("conn_syscalls", "per new conn", False),
]
# The count rows only when counted (FIGURES with rr_counts or conn_counts).
counted = lambda f: any(f == g for g, _ in values)
count_rows = {f"{load}_{what}" for load in ("rr", "conn") for what in ("epoll_wait", "futex", "cswitch", "syscalls")}
rows = [r for r in rows if counted(r[0]) or r[0] not in count_rows]

def median(figure, setup):
    v = values.get((figure, setup))
    return statistics.median(v) if v else None

def fmt(x):
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"

def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"

n = max((len(v) for v in values.values()), default=0)
print(f"\nMedians of {n} interleaved rounds (higher is better for Gbit/s and req/s, lower for ms and bytes):\n")
print("| figure | unit | " + " | ".join(setups) + " |")
print("|---|---|" + "---|" * len(setups))
for figure, unit, _ in rows:
    print(f"| {figure} | {unit} | " + " | ".join(fmt(median(figure, s)) for s in setups) + " |")

proxies = [s for s in setups if s != "direct"]
print("\nRatios (same run): each proxy to direct, and to HAProxy:\n")
heads = [f"{p} ÷ direct" for p in proxies] + [f"{p} ÷ haproxy" for p in proxies if p != "haproxy"]
print("| figure | " + " | ".join(heads) + " |")
print("|---|" + "---|" * len(heads))
for figure, _, _ in rows:
    cells = [ratio(median(figure, p), median(figure, "direct")) for p in proxies]
    cells += [ratio(median(figure, p), median(figure, "haproxy")) for p in proxies if p != "haproxy"]
    print(f"| {figure} | " + " | ".join(cells) + " |")
print("\nudp_qps: DNS queries/s to one unbound, the median of benches/udp_qps.sh's own runs;"
      " HAProxy 2.6 has no UDP proxying, so weir is compared with NGINX:")
print(f"udp_qps weir ÷ nginx: {ratio(median('udp_qps', 'weir'), median('udp_qps', 'nginx'))} (queries/s),"
      f" {ratio(median('udp_qps_cpu', 'weir'), median('udp_qps_cpu', 'nginx'))} (proxy CPU per query)")
EOF
}

# ---------------------------------------------------------------- main

main() {
    # A proxy holds 2 descriptors per connection. Where the hard open-file limit can't be
    # raised (a sandbox), idle_memory holds as many connections as fit under it.
    local want=$((IDLE_CONNS * 2 + 1000))
    ulimit -n "$want" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    if (($(ulimit -n) < want)); then
        IDLE_CONNS=$((($(ulimit -n) - 1000) / 2 / 1000 * 1000))
        log "open-file limit $(ulimit -n): idle_memory holds $IDLE_CONNS connections"
    fi
    install_tools
    build_weir
    start_backends
    local setups order round figure setup
    read -r -a setups <<<"$SETUPS"
    for ((round = 1; round <= ROUNDS; round++)); do
        # Rotate who goes first, so no setup always follows the same neighbour.
        order=("${setups[@]:round % ${#setups[@]}}" "${setups[@]:0:round % ${#setups[@]}}")
        # Fresh proxies each round: idle_memory must not see memory kept from an earlier round.
        for setup in "${order[@]}"; do start_setup "$setup"; done
        for figure in $FIGURES; do
            [[ $figure == udp_qps ]] && continue # once, after the rounds
            for setup in "${order[@]}"; do measure "$figure" "$setup" "$round"; done
        done
        for setup in "${order[@]}"; do stop_setup "$setup"; done
    done
    [[ " $FIGURES " == *" udp_qps "* ]] && figure_udp_qps
    summarize
    echo
    echo "$(date -u +%F), $(nproc) cores, $(uname -r); haproxy $(haproxy -v | awk 'NR==1{print $3}')," \
        "nginx $(nginx -v 2>&1 | sed 's|.*/||'), weir $(git -C "$REPO" rev-parse --short HEAD)," \
        "iperf3 -t $DURATION, conn_rate -n $CONN_REQUESTS, rr -n $RR_REQUESTS, idle $IDLE_CONNS conns;" \
        "took $((SECONDS - STARTED))s"
}

main "$@"
