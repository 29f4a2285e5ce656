#!/usr/bin/env bash
# The soak: weir in front of three echo backends for N minutes (default 10) at a bounded
# connection rate, random sizes, random client resets, a backend restarted every 15 s.
# Samples weir's RSS, fds and threads every 2 s; fails if any grows more than 5 % after
# warm-up, or a byte comes back wrong. Draws the samples into an SVG.
#
#   benches/soak.sh [MINUTES] [SVG]        # default: 10, target/soak.svg
#
# The work is tests/soak.rs (a release build of it); .ci/run runs it for 60 s.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
export WEIR_SOAK_SECS=$((minutes * 60))
export WEIR_SOAK_SVG=${2:-$PWD/target/soak.svg}
cargo test --release --test soak -- --nocapture
echo "plot: $WEIR_SOAK_SVG"
