#!/usr/bin/env bash
# Build one gemmguard image locally, tagged exactly as the chart pulls it by default:
#   REGISTRY/gemmguard-TARGET:APPVERSION   (REGISTRY defaults to ghcr.io/gemmguard, the chart's;
#                                          APPVERSION is helm/gemmguard/Chart.yaml's appVersion)
# with docker, or podman when docker is missing (CONTAINER_ENGINE=podman picks it explicitly).
# The release workflow (.github/workflows/release.yml) builds the same names on a tag.
# Usage: scripts/build-image.sh [--dry-run] TARGET [REGISTRY]   (make image TARGET=... runs it)
#   --dry-run   print the build command instead of running it
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
target=${1:-}
registry=${2:-ghcr.io/gemmguard}

targets=()
for dockerfile in "$repo"/images/*/Dockerfile; do
    dir=${dockerfile%/Dockerfile}
    targets+=("${dir##*/}")
done

fail() {
    printf 'build-image: %s\n' "$*" >&2
    exit 2
}

if [ -z "$target" ]; then
    fail "no TARGET given. Build one of: ${targets[*]} (e.g. make image TARGET=cpu)."
fi
if [ ! -f "$repo/images/$target/Dockerfile" ]; then
    fail "unknown TARGET '$target': there is no images/$target/Dockerfile. Build one of: ${targets[*]}."
fi

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
    for candidate in docker podman; do
        if command -v "$candidate" >/dev/null; then
            engine=$candidate
            break
        fi
    done
fi
if [ -z "$engine" ] || ! command -v "$engine" >/dev/null; then
    printf 'build-image: building images needs docker or podman, and %s. Install one of them (https://docs.docker.com/engine/install/ or https://podman.io/docs/installation), or set CONTAINER_ENGINE to its path.\n' \
        "${engine:+CONTAINER_ENGINE=$engine is not on PATH}${engine:-neither is on PATH}" >&2
    exit 1
fi

version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$repo/helm/gemmguard/Chart.yaml")
[ -n "$version" ] || fail "no appVersion in helm/gemmguard/Chart.yaml."
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
image="$registry/gemmguard-$target:$version"

# The repository root is the build context; .dockerignore lets only what the images copy in.
cmd=("$engine" build -f "images/$target/Dockerfile" -t "$image" --build-arg "VCS_REF=$revision" .)
if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
cd "$repo"
"${cmd[@]}"
printf '\nbuild-image: built %s\n  push it:  %s push %s\n  use it:   helm install ... --set image.repository=%s\n' \
    "$image" "$engine" "$image" "$registry/gemmguard-$target"
