#!/usr/bin/env bash
# Install Triton Inference Server from the nvidia-pytriton wheel (CPU is enough) and assemble
# the Python backend folder that tritonserver needs.  Idempotent: run it as often as you like.
#
#   sidecar/install_triton.sh [VENV]          (default VENV: .venv at the repo root)
#
# Env: EDGECATCH_VAR   where the backend folder goes (default: <repo>/var)
#      PYTHON          interpreter used to create VENV if it does not exist (default: python3.11)
#      PYTRITON_SPEC   pip requirement for the wheel (default: nvidia-pytriton==0.7.0)
#
# Result: $EDGECATCH_VAR/triton/backends/python/{libtriton_python.so,
#         triton_python_backend_utils.py, triton_python_backend_stub}
# (the wheel keeps the stub in python_backend_stubs/<py>/, apart from the backend library;
#  tritonserver looks for both in the one folder given by --backend-directory/python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VENV:-$REPO/.venv}}"
VAR="${EDGECATCH_VAR:-$REPO/var}"
PYTHON="${PYTHON:-python3.11}"
PYTRITON_SPEC="${PYTRITON_SPEC:-nvidia-pytriton==0.7.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating venv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

want_version="${PYTRITON_SPEC##*==}"
have_version="$("$PY" -c 'import importlib.metadata as m; print(m.version("nvidia-pytriton"))' 2>/dev/null || true)"
if [[ "$PYTRITON_SPEC" == *"=="* && "$have_version" == "$want_version" ]]; then
    echo "nvidia-pytriton $have_version already installed in $VENV" >&2
else
    echo "installing $PYTRITON_SPEC into $VENV" >&2
    "$PY" -m pip install --quiet "$PYTRITON_SPEC"
fi

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
TS="$SITE/pytriton/tritonserver"
STUB="$TS/python_backend_stubs/$PYVER/triton_python_backend_stub"
[[ -x "$TS/bin/tritonserver" ]] || { echo "tritonserver not found in $TS/bin" >&2; exit 1; }
[[ -x "$STUB" ]] || { echo "no Python backend stub for Python $PYVER in $TS/python_backend_stubs" >&2; exit 1; }

BACKEND="$VAR/triton/backends/python"
mkdir -p "$BACKEND"
# cp -u: only copies what is newer, so repeated runs are cheap; __pycache__ is not needed.
find "$TS/backends/python" -maxdepth 1 -type f -exec cp -u {} "$BACKEND/" \;
cp -u "$STUB" "$BACKEND/triton_python_backend_stub"
chmod +x "$BACKEND/triton_python_backend_stub"

echo "tritonserver: $TS/bin/tritonserver" >&2
echo "python backend: $BACKEND" >&2
ls "$BACKEND" >&2
