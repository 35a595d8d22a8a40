#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then the project in
# .venv with its dev extra. The README's test command runs it before pytest:
#   bash tests/setup.sh && .venv/bin/python -m pytest
# The tests start their own throwaway servers from these Debian packages; they never
# touch a server they did not start. Run it as root (or with sudo available) the first
# time; afterwards it installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
packages=(redis-server:redis-server etcd:etcd-server nginx:nginx-light haproxy:haproxy wrk:wrk
    chromium:chromium openssl:openssl)
need=()
for pair in "${packages[@]}"; do
    tool=${pair%%:*}
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need+=("${pair#*:}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)

if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${need[*]}"
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "tests/setup.sh: run as root, or install: apt-get install ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== installing statescale with its dev extra in .venv"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev]'
# This machine's Python may be told not to write bytecode (PYTHONDONTWRITEBYTECODE):
# compile the checkout once, or every process the tests start compiles it again.
.venv/bin/python -m compileall -q statescale benchmarks demo_app >/dev/null
