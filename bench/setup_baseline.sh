#!/usr/bin/env bash
# Create (idempotently) the reference virtualenv holding the original pure-Python
# aqueduct 1.15.0 from PyPI, against which aqueduct-rs is benchmarked.
#
#   bash bench/setup_baseline.sh            # uses python3 from PATH
#   PYTHON=/usr/bin/python3.11 bash bench/setup_baseline.sh
#
# The venv lives in bench/.venv-aqueduct115 (ignored by git). Re-running the script
# is cheap: it only installs when the pinned packages are not importable yet.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${BENCH_DIR}/.venv-aqueduct115"
PYTHON="${PYTHON:-python3}"

# Packages of the baseline environment. numpy is needed by the payload scenarios
# (and by aqueduct's share_value for arrays), psutil by the CPU / memory scenarios,
# aiohttp and gunicorn by the HTTP comparison (bench/http_compare.py).
# Their versions are taken from bench/requirements.txt, so that both implementations
# are measured with the same helper libraries.
mapfile -t HELPER_PINS < <(grep -E '^(numpy|psutil|aiohttp|gunicorn)==' "${BENCH_DIR}/requirements.txt" || true)
if [[ ${#HELPER_PINS[@]} -ne 4 ]]; then
    HELPER_PINS=("numpy" "psutil" "aiohttp" "gunicorn")
fi
BASELINE_PKGS=("aqueduct==1.15.0" "${HELPER_PINS[@]}")

# A tiny probe: succeeds only if the exact aqueduct version and helpers are there.
probe() {
    "${VENV}/bin/python" - "${HELPER_PINS[@]}" <<'EOF' 2>/dev/null
import importlib.metadata as md
import sys
import numpy, psutil, aiohttp, gunicorn  # noqa: F401
assert md.version("aqueduct") == "1.15.0"
for pin in sys.argv[1:]:
    name, _, version = pin.partition("==")
    assert not version or md.version(name) == version, pin
EOF
}

if [[ -x "${VENV}/bin/python" ]] && probe; then
    echo "baseline venv ready: ${VENV}"
    exit 0
fi

if [[ ! -x "${VENV}/bin/python" ]]; then
    echo "creating baseline venv ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
fi

"${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check "${BASELINE_PKGS[@]}"

if ! probe; then
    echo "baseline venv ${VENV} is still incomplete after install" >&2
    exit 1
fi
echo "baseline venv ready: ${VENV}"
