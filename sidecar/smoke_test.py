"""Smoke test for the example Triton model repository, with the official tritonclient.

    python sidecar/smoke_test.py [--http 127.0.0.1:8000] [--grpc 127.0.0.1:8001]

Sends realistic images (scikit-image's astronaut, coffee, chelsea) as JPEG bytes to
people_detector and trivial_detector over HTTP (pure JSON with base64 images, binary input with JSON outputs, binary tensors
both ways) and gRPC, one image
and a batch of three, checks the three protocols agree, and prints results and latencies.
"""

import argparse
import base64
import io
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from skimage import data

OUTPUTS = ("BOXES", "SCORES", "CLASSES")


def jpeg(arr, quality=90):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def infer(client, mod, model, batch, binary):
    """binary: None (gRPC), "json" (base64 image in JSON, JSON outputs), "in" (binary input,
    JSON outputs), "all" (binary input and outputs)."""
    inp = mod.InferInput("IMAGE", [len(batch), 1], "BYTES")
    if binary == "json":
        batch = [base64.b64encode(b) for b in batch]
    arr = np.array([[b] for b in batch], dtype=np.object_)
    if mod is httpclient:
        inp.set_data_from_numpy(arr, binary_data=binary != "json")
        outs = [mod.InferRequestedOutput(n, binary_data=binary == "all") for n in OUTPUTS]
    else:
        inp.set_data_from_numpy(arr)
        outs = [mod.InferRequestedOutput(n) for n in OUTPUTS]
    t = time.perf_counter()
    res = client.infer(model, [inp], outputs=outs)
    dt = time.perf_counter() - t
    return {n: res.as_numpy(n) for n in OUTPUTS}, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", default="127.0.0.1:8000")
    ap.add_argument("--grpc", default="127.0.0.1:8001")
    args = ap.parse_args()
    images = [jpeg(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea")]
    http = httpclient.InferenceServerClient(args.http)
    grpc = grpcclient.InferenceServerClient(args.grpc)
    assert http.is_server_ready() and grpc.is_server_ready()
    for model in ("people_detector", "trivial_detector"):
        assert http.is_model_ready(model), model
        for batch in (images[:1], images):
            results = {}
            for label, client, mod, binary in (
                ("http-json", http, httpclient, "json"),
                ("http-bin-in", http, httpclient, "in"),
                ("http-binary", http, httpclient, "all"),
                ("grpc", grpc, grpcclient, None),
            ):
                infer(client, mod, model, batch, binary)  # warm-up
                out, dt = infer(client, mod, model, batch, binary)
                results[label] = out
                print(f"{model:17s} batch={len(batch)} {label:11s} {dt * 1e3:7.1f} ms  "
                      f"shapes={[out[n].shape for n in OUTPUTS]}")
            ref = results["grpc"]
            for label, out in results.items():
                for n in OUTPUTS:
                    np.testing.assert_allclose(out[n], ref[n], rtol=1e-6, err_msg=f"{label} {n}")
            for i in range(len(batch)):
                keep = ref["CLASSES"][i] >= 0
                print("   image", i, [
                    (int(c), round(float(s), 3), [round(float(v)) for v in b])
                    for b, s, c in zip(ref["BOXES"][i][keep], ref["SCORES"][i][keep], ref["CLASSES"][i][keep])
                ])
    print("OK")


if __name__ == "__main__":
    main()
