"""The example deployment files are consistent: configs validate, and the ports are wired as documented."""

from __future__ import annotations

from pathlib import Path

import yaml

from edgecatch.integrations.triton.sidecar import SidecarConfig, load_sidecar_config
from edgecatch.policies.load import load_policy_file

REPO = Path(__file__).resolve().parents[2]


def test_example_sidecar_config_validates():
    config, _ = load_sidecar_config(REPO / "sidecar" / "edgecatch.yaml")
    assert config.sidecar.triton.http == "127.0.0.1:8000" and config.sidecar.triton.grpc == "127.0.0.1:8001"
    assert set(config.sidecar.models) == {"people_detector", "trivial_detector"}
    assert config.policies.exists()


def test_k8s_pod_wires_clients_to_the_sidecar_and_the_sidecar_to_triton(tmp_path):
    documents = {d["kind"]: d for d in yaml.safe_load_all((REPO / "sidecar" / "k8s-pod.yaml").read_text())}
    data = documents["ConfigMap"]["data"]
    (tmp_path / "edgecatch.yaml").write_text(data["edgecatch.yaml"])
    (tmp_path / "policies.yaml").write_text(data["policies.yaml"])
    config = SidecarConfig.model_validate(yaml.safe_load(data["edgecatch.yaml"]))
    load_policy_file(tmp_path / "policies.yaml")

    containers = {c["name"]: c for c in documents["Pod"]["spec"]["containers"]}
    triton_args = containers["triton"]["args"]
    assert "--http-address=127.0.0.1" in triton_args and "--grpc-address=127.0.0.1" in triton_args
    assert config.sidecar.triton.http == "127.0.0.1:" + _arg(triton_args, "--http-port")
    assert config.sidecar.triton.grpc == "127.0.0.1:" + _arg(triton_args, "--grpc-port")

    ports = {p["name"]: p["containerPort"] for p in containers["edgecatch"]["ports"]}
    listen = config.sidecar.listen
    assert (listen.http, listen.grpc, listen.admin) == (
        f"0.0.0.0:{ports['http']}", f"0.0.0.0:{ports['grpc']}", f"0.0.0.0:{ports['admin']}")
    assert (ports["http"], ports["grpc"], ports["admin"]) == (8010, 8011, 8012)
    service_ports = {p["targetPort"] for p in documents["Service"]["spec"]["ports"]}
    assert service_ports == {"http", "grpc"}  # the admin port is not offered to clients
    mounts = {m["mountPath"] for m in containers["edgecatch"]["volumeMounts"]}
    assert str(config.delivery.spool_dir).startswith(tuple(mounts))
    assert containers["edgecatch"]["args"][-1].startswith("/etc/edgecatch/")


def _arg(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))
