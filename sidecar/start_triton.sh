#!/usr/bin/env bash
# Start tritonserver from the nvidia-pytriton wheel on this (CPU-only) machine, on 127.0.0.1.
# Run sidecar/install_triton.sh first.  The script execs tritonserver, so its PID is the server's;
# extra arguments are passed to tritonserver (e.g. --log-verbose 1).
#
#   sidecar/start_triton.sh [tritonserver args...]
#
# Env (defaults in brackets):
#   VENV                     venv with nvidia-pytriton, numpy, opencv, pillow [<repo>/.venv]
#   EDGECATCH_VAR            where install_triton.sh put backends/ [<repo>/var]
#   TRITON_MODEL_REPOSITORY  [<repo>/sidecar/model_repository]
#   TRITON_ADDRESS           listen address for all three ports [127.0.0.1]
#   TRITON_HTTP_PORT [8000]  TRITON_GRPC_PORT [8001]  TRITON_METRICS_PORT [8002]
#
# Three details make it work here (see sidecar/README.md):
#  1. the backend folder holds libtriton_python.so *and* triton_python_backend_stub together;
#  2. LD_LIBRARY_PATH starts with this Python's own LIBDIR (its libpython3.11.so), then the
#     wheel's nvidia_pytriton.libs: otherwise the stub loads the system's libpython and fails.
# 3. the stub's embedded interpreter ignores PYTHONPATH (it starts isolated) and finds its
#    prefix by looking up "python3" on PATH: the venv's bin/ first on PATH makes it the venv's
#    interpreter (its pyvenv.cfg, its site-packages), so model.py can import numpy, cv2 and PIL.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
VAR="${EDGECATCH_VAR:-$REPO/var}"
MODELS="${TRITON_MODEL_REPOSITORY:-$REPO/sidecar/model_repository}"
ADDR="${TRITON_ADDRESS:-127.0.0.1}"
HTTP_PORT="${TRITON_HTTP_PORT:-8000}"
GRPC_PORT="${TRITON_GRPC_PORT:-8001}"
METRICS_PORT="${TRITON_METRICS_PORT:-8002}"

PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "no venv at $VENV (run sidecar/install_triton.sh $VENV)" >&2; exit 1; }
BACKENDS="$VAR/triton/backends"
[[ -x "$BACKENDS/python/triton_python_backend_stub" ]] || {
    echo "no Python backend in $BACKENDS (run sidecar/install_triton.sh $VENV)" >&2; exit 1; }

read -r LIBDIR SITE < <("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"), sysconfig.get_paths()["purelib"])')
TS_BIN="$SITE/pytriton/tritonserver/bin/tritonserver"
WHEEL_LIBS="$SITE/nvidia_pytriton.libs"

export LD_LIBRARY_PATH="$LIBDIR:$WHEEL_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$VENV/bin:$PATH"
# keep OpenCV/BLAS from oversubscribing the cores when several model instances run
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$TS_BIN" \
    --model-repository "$MODELS" \
    --backend-directory "$BACKENDS" \
    --http-address "$ADDR" --http-port "$HTTP_PORT" \
    --grpc-address "$ADDR" --grpc-port "$GRPC_PORT" \
    --metrics-address "$ADDR" --metrics-port "$METRICS_PORT" \
    --allow-gpu-metrics false \
    --exit-on-error true \
    --strict-readiness true \
    "$@"
