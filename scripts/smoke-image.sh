#!/usr/bin/env bash
# Smoke test of a gemmguard image or server: it serves the demo model (one chat completion) and
# /gemmguard/ready answers 200. The release workflow runs it on the CPU image before pushing;
# tests/test_e2e_prometheus.py runs the same checks (--url) against a real demo server.
# Usage:
#   scripts/smoke-image.sh IMAGE        run IMAGE (docker, or podman; CONTAINER_ENGINE overrides) on
#                                       127.0.0.1:$SMOKE_PORT (default 8000), check it, remove it
#   scripts/smoke-image.sh --url URL    check a server already running at URL
# SMOKE_TIMEOUT: seconds start-up may take (default 900: a CPU runner loads the demo in minutes).
set -euo pipefail

timeout=${SMOKE_TIMEOUT:-900}
log() { printf 'smoke-image: %s\n' "$*" >&2; }

# Exit non-zero unless the JSON on stdin satisfies the Python expression in $1 (bound to `body`).
expect() {
    python3 -c 'import json, sys
body = json.load(sys.stdin)
if not eval(sys.argv[1]):
    sys.exit(f"smoke-image: expected {sys.argv[1]}, got {json.dumps(body)[:2000]}")' "$1"
}

check() {
    local url=$1 deadline=$((SECONDS + timeout))
    until curl -fsS -o /dev/null --max-time 5 "$url/gemmguard/ready" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$url/gemmguard/ready did not answer 200 within ${timeout}s"
            return 1
        fi
        if [ -n "${container:-}" ] && [ "$("$engine" inspect -f '{{.State.Running}}' "$container" 2>/dev/null)" != true ]; then
            log "the container stopped before it was ready"
            return 1
        fi
        sleep 5
    done
    local model
    model=$(curl -fsS --max-time 30 "$url/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
    log "ready; serving '$model'"
    # ignore_eos (a vLLM sampling option) makes the demo's random weights produce all 8 tokens.
    curl -fsS --max-time 300 "$url/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 8, \"ignore_eos\": true}" \
        | expect 'body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] == 8'
    log "one chat completion: 8 tokens"
    curl -fsS --max-time 30 "$url/gemmguard/ready" | expect 'body["ready"] is True'
    log "/gemmguard/ready: 200"
}

if [ "${1:-}" = "--url" ]; then
    check "${2:?usage: scripts/smoke-image.sh --url URL}"
    exit
fi

image=${1:?usage: scripts/smoke-image.sh IMAGE | --url URL}
engine=${CONTAINER_ENGINE:-$(command -v docker || command -v podman || true)}
if [ -z "$engine" ]; then
    log "running an image needs docker or podman on PATH (or CONTAINER_ENGINE); neither was found."
    exit 1
fi
port=${SMOKE_PORT:-8000}
container=gemmguard-smoke-$$
cleanup() {
    local status=$?
    if [ "$status" != 0 ]; then
        log "failed; the container's log:"
        "$engine" logs "$container" 2>&1 | tail -n 200 >&2 || true
    fi
    "$engine" rm -f "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# The image's default command serves the embedded demo on 0.0.0.0:8000.
"$engine" run -d --name "$container" --shm-size 2g -p "127.0.0.1:$port:8000" "$image" >/dev/null
check "http://127.0.0.1:$port"
log "$image passed"
