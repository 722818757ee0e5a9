"""The Triton sidecar: HTTP/REST and gRPC proxies that observe KServe v2 inference calls."""
