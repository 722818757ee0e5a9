#!/usr/bin/env bash
# Triton + the edgecatch sidecar on this machine, as they would run side by side in a pod:
#
#   Triton    127.0.0.1:8000 (HTTP)  :8001 (gRPC)  :8002 (Triton's metrics)
#   sidecar   127.0.0.1:8010 (HTTP)  :8011 (gRPC)  :8012 (admin: /metrics, /edgecatch/healthz, /edgecatch/feedback)
#
# Clients call the sidecar's ports instead of Triton's; selected samples land in var/sidecar/dataset.
#
#   sidecar/run_demo.sh            start both, send the smoke test through the sidecar, keep running (Ctrl-C stops)
#   sidecar/run_demo.sh --check    the same, then stop (exit status: the smoke test's)
#
# Env: VENV [<repo>/.venv], EDGECATCH_CONFIG [sidecar/edgecatch.yaml], and start_triton.sh's TRITON_* ports
# (the sidecar config names 8000/8001: change both together).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
CONFIG="${EDGECATCH_CONFIG:-$REPO/sidecar/edgecatch.yaml}"
PY="$VENV/bin/python"
LOGS="$REPO/var/sidecar"
mkdir -p "$LOGS"

"$REPO/sidecar/install_triton.sh" "$VENV" >/dev/null 2>&1 || "$REPO/sidecar/install_triton.sh" "$VENV"

pids=()
stop() {
    # Each server runs in its own process group (setsid): Triton's Python-backend stubs go with it.
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
}
trap stop EXIT
trap 'exit 130' INT TERM

wait_for() {  # URL, what, pid
    for _ in $(seq 600); do
        if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
        kill -0 "$3" 2>/dev/null || { echo "$2 exited; see its log in $LOGS" >&2; return 1; }
        sleep 0.1
    done
    echo "$2 not ready after 60 s" >&2
    return 1
}

echo "starting Triton (log: $LOGS/triton.log)"
setsid env VENV="$VENV" "$REPO/sidecar/start_triton.sh" >"$LOGS/triton.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:${TRITON_HTTP_PORT:-8000}/v2/health/ready" Triton "${pids[-1]}"

echo "starting the edgecatch sidecar with $CONFIG (log: $LOGS/sidecar.log)"
setsid "$PY" -m edgecatch sidecar --config "$CONFIG" >"$LOGS/sidecar.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:8012/edgecatch/healthz" "the sidecar" "${pids[-1]}"

echo "smoke test through the sidecar (HTTP JSON, HTTP binary tensors, gRPC; 1 image and a batch of 3):"
status=0
"$PY" "$REPO/sidecar/smoke_test.py" --http 127.0.0.1:8010 --grpc 127.0.0.1:8011 || status=$?
echo
# One request with a real image (one of the shipped test images), whose id a verdict can name.
"$PY" -c 'import base64, json, sys; sys.path.insert(0, sys.argv[1])
from bento_service.sample_images import sample_jpegs
image = base64.b64encode(sample_jpegs(include_sklearn=False)["chelsea"]).decode()
print(json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [image]}]}))' \
    "$REPO" > "$LOGS/demo_request.json"
curl -fsS -D - -o /dev/null -H 'Content-Type: application/json' -d @"$LOGS/demo_request.json" \
    http://127.0.0.1:8010/v2/models/trivial_detector/infer | grep -i '^x-edgecatch-inference-id' || true
echo "health:  $(curl -sS http://127.0.0.1:8012/edgecatch/healthz)"
echo "metrics: $(curl -sS http://127.0.0.1:8012/metrics | grep -c '^edgecatch_') edgecatch series on http://127.0.0.1:8012/metrics"
echo "samples: $REPO/var/sidecar/dataset (manifest.jsonl, images/, labels/)"

if [[ "${1:-}" == "--check" ]]; then
    exit "$status"
fi
echo
echo "Triton on 8000/8001, sidecar on 8010/8011 (admin 8012). Ctrl-C stops both."
echo "A verdict on the prediction above (its id): curl -d '{\"inference_id\": \"<id>\", \"verdict\": \"incorrect\"}' -H 'Content-Type: application/json' http://127.0.0.1:8010/edgecatch/feedback"
wait "${pids[@]}"
