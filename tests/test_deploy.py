"""The deployment files in deploy/: the Kubernetes manifests, the Dockerfile and the nginx template agree with
the server (its CLI, its endpoints, its metrics) and with each other."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from nginx_helpers import NGINX_TEMPLATE, PLACEHOLDER, find_nginx, nginx_command, render_nginx_conf

from streaming.cli import build_parser
from streaming.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/k8s/*.yaml by kind (one of each)."""
    objects = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
               for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    by_kind = {doc["kind"]: doc for doc in objects}
    assert len(by_kind) == len(objects), [doc["kind"] for doc in objects]
    return by_kind


def container() -> dict[str, Any]:
    (server,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return server


def serve_args(argv: list[str]) -> Any:
    """``argv`` (after the ``whisper-stream`` entry point) parsed by the real CLI; must be ``serve``."""
    args = build_parser().parse_args(argv)
    assert args.command == "serve", argv
    return args


def test_k8s_manifests_parse_and_fit_together() -> None:
    objects = manifests()
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    deployment, service, hpa = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}


def test_deployment_probes_drain_and_resources() -> None:
    server = container()
    args = serve_args(server["args"])
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez"), ("startupProbe", "/livez")):
        get = server[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == args.port, probe
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = manifests()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + args.drain_seconds, (grace, pre_stop, args.drain_seconds)
    assert server["resources"]["requests"]["cpu"] == "2"


def test_hpa_scales_on_a_metric_the_server_exports() -> None:
    (metric,) = manifests()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "whisper_stream_streams_active"
    assert re.search(rf"^# TYPE {name} gauge$", Metrics().render(), re.MULTILINE)
    assert float(metric["pods"]["target"]["averageValue"]) < serve_args(container()["args"]).max_streams


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile() -> None:
    steps = dockerfile()
    get = {instruction: arguments for instruction, arguments in steps}
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [arguments for instruction, arguments in steps if instruction == "RUN"]
    torch = next(i for i, run in enumerate(runs) if "pip install torch==2.13.0" in run)
    package = next(i for i, run in enumerate(runs) if re.search(r"pip install \.(\s|$)", run))
    assert torch < package
    assert get["USER"] not in ("root", "0") and get["EXPOSE"] == "8765"
    assert "/livez" in get["HEALTHCHECK"]
    command = json.loads(get["ENTRYPOINT"]) + json.loads(get["CMD"])
    assert command[0] == "whisper-stream"
    args = serve_args(command[1:])
    assert (args.host, args.port) == ("0.0.0.0", 8765)


def test_nginx_test_renders_the_deployed_template(tmp_path: Path) -> None:
    assert NGINX_TEMPLATE == DEPLOY / "nginx.conf"
    conf = render_nginx_conf(8080, ["10.0.0.1:8765", "10.0.0.2:8765", "10.0.0.3:8765"], tmp_path)
    assert "${" not in conf
    assert re.search(r"^\s*least_conn;", conf, re.MULTILINE)
    assert re.search(r"^\s*proxy_next_upstream\s[^;]*\bhttp_503\b", conf, re.MULTILINE)
    assert "proxy_set_header Upgrade $http_upgrade;" in conf and "proxy_http_version 1.1;" in conf
    assert len(re.findall(r"^\s*server 10\.0\.0\.\d:8765 max_fails=\d+ fail_timeout=\d+s;", conf, re.MULTILINE)) == 3
    placeholders = set(PLACEHOLDER.findall(NGINX_TEMPLATE.read_text(encoding="utf-8")))
    assert placeholders == {"LISTEN_PORT", "NGINX_RUN_DIR", "REPLICA_1", "REPLICA_2", "REPLICA_3"}
    with pytest.raises(ValueError):
        render_nginx_conf(8080, ["a:1"], tmp_path)


def test_nginx_accepts_the_rendered_template(tmp_path: Path) -> None:
    nginx = find_nginx()
    (tmp_path / "nginx.conf").write_text(render_nginx_conf(8080, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
                                                           tmp_path), encoding="utf-8")
    checked = subprocess.run(nginx_command(nginx, tmp_path, "-t"), capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"{shlex.join(checked.args)}:\n{checked.stderr}"
