#!/usr/bin/env bash
# Issue 18 lever 2: redis-benchmark PING (keep-alive, -P 1) through direct, haproxy, weir and the
# sockmap relay (with and without its byte counter), interleaved, ROUNDS rounds; prints one TSV
# line per run and the medians. Per run: req/s, proxy CPU s per 100k requests (utime+stime of the
# proxy process, all threads), machine CPU s per 100k requests (/proc/stat busy jiffies, both
# cores), machine context switches per request (/proc/stat ctxt). All loads bounded (-n, timeout).
# Knobs: ROUNDS [3], N [200000], C [50], KEEPALIVE [1] (0: a new connection per request),
# SETUPS ["direct haproxy weir sockmap sockmap-count"], WEIR [../../target/release/weir].
set -euo pipefail
ROUNDS=${ROUNDS:-3}; N=${N:-200000}; C=${C:-50}; KEEPALIVE=${KEEPALIVE:-1}
SETUPS=${SETUPS:-"direct haproxy weir sockmap sockmap-count"}
HERE=$(cd "$(dirname "$0")" && pwd)
WEIR=${WEIR:-$HERE/../../target/release/weir}
RELAY=$HERE/target/release/sockmap-relay
WORK=$(mktemp -d /tmp/sockmap-measure.XXXXXX)
read -r PR PH PW PS PC < <(python3 -c '
import socket; s=[socket.socket() for _ in range(5)]
[x.bind(("127.0.0.1",0)) for x in s]; print(*[x.getsockname()[1] for x in s])')
declare -A PORT=([direct]=$PR [haproxy]=$PH [weir]=$PW [sockmap]=$PS [sockmap-count]=$PC)
declare -A PID=()
cleanup() { for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

redis-server --port "$PR" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
PID[direct]=$!
cat >"$WORK/haproxy.cfg" <<CFG
global
    nbthread 2
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen redis
    bind 127.0.0.1:$PH
    server redis 127.0.0.1:$PR
CFG
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PID[haproxy]=$!
cat >"$WORK/weir.yaml" <<CFG
shutdown_timeout: 1s
listeners:
  redis:
    bind: 127.0.0.1:$PW
    pool: redis
pools:
  redis:
    backends:
      - address: 127.0.0.1:$PR
CFG
RUST_LOG=warn "$WEIR" run -c "$WORK/weir.yaml" >"$WORK/weir.log" 2>&1 &
PID[weir]=$!
"$RELAY" "127.0.0.1:$PS" "127.0.0.1:$PR" >"$WORK/sockmap.log" 2>&1 &
PID[sockmap]=$!
"$RELAY" "127.0.0.1:$PC" "127.0.0.1:$PR" --count >"$WORK/sockmap-count.log" 2>&1 &
PID[sockmap-count]=$!
for s in $SETUPS; do # wait (bounded) until each answers
    for _ in $(seq 50); do timeout 2 redis-cli -p "${PORT[$s]}" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
done

proc_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
machine() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9} /^ctxt/{print $2}' /proc/stat | paste -sd' '; }
HZ=$(getconf CLK_TCK)
run() {
    local s=$1 p0 p1 m0 c0 m1 c1 out rps
    p0=$( [[ $s == direct ]] && echo 0 || proc_ticks "${PID[$s]}")
    read -r m0 c0 < <(machine)
    out=$(timeout 120 redis-benchmark -p "${PORT[$s]}" -t ping_mbulk -P 1 -c "$C" -n "$N" -k "$KEEPALIVE" -q --csv)
    read -r m1 c1 < <(machine)
    p1=$( [[ $s == direct ]] && echo 0 || proc_ticks "${PID[$s]}")
    rps=$(echo "$out" | awk -F, '/PING/{gsub(/"/,"",$2); print $2; exit}')
    awk -v s="$s" -v r="$rps" -v p=$((p1 - p0)) -v m=$((m1 - m0)) -v c=$((c1 - c0)) -v n="$N" -v hz="$HZ" \
        'BEGIN{printf "%s\t%.0f\t%.3f\t%.3f\t%.2f\n", s, r, p/hz*1e5/n, m/hz*1e5/n, c/n}'
}
echo -e "setup\treq/s\tproxy_cpu_s_per_100k\tmachine_cpu_s_per_100k\tctxt_per_req" | tee "$WORK/runs.tsv"
set -- $SETUPS
for r in $(seq "$ROUNDS"); do
    for s in "$@"; do run "$s" | tee -a "$WORK/runs.tsv"; done
    set -- "${@:2}" "$1" # rotate the order between rounds
done
echo "--- medians over $ROUNDS rounds (N=$N C=$C keepalive=$KEEPALIVE), raw in $WORK/runs.tsv"
med() { sort -g | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; } # median of a column
for s in $SETUPS; do
    rows=$(grep "^$s	" "$WORK/runs.tsv")
    printf '%s' "$s"
    for k in 2 3 4 5; do printf '\t%s' "$(cut -f$k <<<"$rows" | med)"; done
    printf '\t(req/s %s-%s)\n' "$(cut -f2 <<<"$rows" | sort -g | head -1)" "$(cut -f2 <<<"$rows" | sort -g | tail -1)"
done
