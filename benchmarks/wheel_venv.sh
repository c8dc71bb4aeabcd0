#!/bin/sh
# Make a virtualenv with pymirror installed from a wheel of this checkout, as
# `pip install pymirror` would give it, for bench_copy.py's whole commands:
#   benchmarks/wheel_venv.sh /var/tmp/pm-wheel-venv
#   PM_BENCH_VENV=/var/tmp/pm-wheel-venv pytest benchmarks/bench_copy.py --benchmark-only -s
# The virtualenv does not see the system's site-packages (their .pth files,
# which some environments use to run code at every interpreter start).
set -eu
venv=${1:?usage: wheel_venv.sh VENV_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
whl=$(mktemp -d)
"$python" -m pip wheel --no-deps --no-build-isolation -q -w "$whl" "$here"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q "$whl"/pymirror-*.whl
rm -rf "$whl"
(cd / && "$venv/bin/python" -c "import pymirror; print(pymirror.__file__)")
