#!/usr/bin/env bash
# Set up everything the test suite needs on a new machine, then run it (README's test command; CI runs it).
#   bash scripts/test.sh [pytest arguments]      default: -m "not bench and not slow"; with CI=true: -m "not bench"
# Python side: .venv with torch 2.13.0 (the CPU build, installed first), the test, base and wyoming extras and
# the speaker encoder's weights (resemblyzer, without its dependencies).
# System side: Debian's chromium (browser test) and nginx (load-balancer test), installed with apt-get when
# run as root; otherwise the missing ones are named with the command. Audio formats need no system ffmpeg (PyAV).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in chromium nginx; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} with apt-get" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  else
    echo "warning: ${missing[*]} not installed and not root; the tests that need them will skip" \
         "(outside CI) or fail (CI=true). Install with: sudo apt-get install ${missing[*]}" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q torch==2.13.0   # first: the CPU build on this machine's disk, not a CUDA download
.venv/bin/pip install -q -e '.[test,base,wyoming,bench]'
.venv/bin/pip install -q --no-deps resemblyzer==0.1.4   # the speaker encoder's weights; its own deps are not needed

if [ "$#" -eq 0 ]; then
  if [ "${CI:-}" = true ]; then
    set -- -m "not bench"            # CI also runs the slow tests (soak, nginx drain, minute-long streams)
  else
    set -- -m "not bench and not slow"
  fi
fi
exec .venv/bin/python -m pytest -q -rs "$@"
