"""The image and the stack manifests: Dockerfile, compose file, Kubernetes (kustomize) base.

No Docker engine or Kubernetes cluster runs here, so these check what can be checked without
one: the Dockerfile's stages and user, the compose file through the compose client when one is
installed, the kustomize output as rendered by kubectl, and every router config in them through
``cache-router check-config``.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


# --- Dockerfile -------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            result.append([])
        assert result, "instruction before the first FROM"
        result[-1].append(ins)
    return result


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "multi-stage: a build stage and a runtime stage"
    for stage in all_stages:
        assert stage[0][1].split()[0] == "python:3.11-slim"
    build, runtime = all_stages[0], all_stages[-1]
    assert any(w == "RUN" and "pip install ." in a for w, a in build), "the README's install: pip install ."
    assert not any(w == "RUN" and "pip install" in a for w, a in runtime), "no build tools in the runtime stage"
    assert any(w == "COPY" and a.startswith("--from=") for w, a in runtime)
    users = [a for w, a in runtime if w == "USER"]
    assert users, "runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root user (runAsNonRoot can verify it)"


def test_dockerfile_health_check_config_and_entrypoint() -> None:
    runtime = dict((w, a) for w, a in stages()[-1])
    assert "/health" in runtime["HEALTHCHECK"]
    assert "CACHE_ROUTER_CONFIG=/etc/cache-router/config.yaml" in runtime["ENV"]
    entry = json.loads(runtime["ENTRYPOINT"])
    script = " ".join(entry)
    assert "exec cache-router serve" in script and '--config "$CACHE_ROUTER_CONFIG"' in script
    assert "8080" in runtime["EXPOSE"]


def test_dockerfile_copies_exist_and_are_not_ignored() -> None:
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for word, args in dockerfile_instructions():
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file"
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"COPY {src} is in .dockerignore"
    assert ".venv" in ignored and ".git" in ignored


# --- compose --------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_brings_up_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"router", "redis", "prometheus", "grafana"} <= set(services)
    engines = [n for n, s in services.items() if s.get("entrypoint", [])[:4] == ["python", "-m", "loadtest", "engine"]]
    assert len(engines) >= 3
    assert services["router"]["image"] == services[engines[0]]["image"], "engines run from the router's image"
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: mounts missing {src}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["router"]["volumes"]}
    config = DEPLOY / mounts["/etc/cache-router/config.yaml"]
    # Every backend in the router's config is a compose service, on the port that engine serves.
    backends = yaml.safe_load(config.read_text())["backends"]
    for b in backends:
        host, port = b["url"].removeprefix("http://").split(":")
        assert host in services and port in services[host]["command"]


def test_compose_router_config_passes_check_config() -> None:
    result = check_config(DEPLOY / "router.yaml")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("config", ["router.yaml", "k8s/router-config.yaml"])
def test_image_configs_point_at_the_installed_sim_tokenizer(config: str) -> None:
    # pip install . puts loadtest (with its package data) into the image's venv site-packages.
    tokenizer = yaml.safe_load((DEPLOY / config).read_text())["tokenizer"]
    prefix = "/opt/venv/lib/python3.11/site-packages/"
    assert tokenizer.startswith(prefix) and (ROOT / tokenizer.removeprefix(prefix) / "tokenizer.json").exists()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"loadtest" = ["models/*/*"]' in pyproject, "the sim tokenizer must ship as package data"


def test_compose_prometheus_scrapes_the_compose_services() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = compose()["services"]
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    for t in targets:
        assert t.split(":")[0] in services, f"scrape target {t} is not a compose service"
    assert any(job["job_name"] == "cache-router" for job in prom["scrape_configs"]), "alerts use job=cache-router"


def test_docker_compose_config_validates() -> None:
    exe = shutil.which("docker-compose")
    cmd = [exe] if exe else None
    if cmd is None and shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        cmd = ["docker", "compose"] if probe.returncode == 0 else None
    if cmd is None:
        pytest.skip("no compose client here (docker compose plugin or docker-compose)")
    result = subprocess.run([*cmd, "-f", str(DEPLOY / "compose.yaml"), "config"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert rendered["services"]["router"]["environment"]["CACHE_ROUTER_CONFIG"] == "/etc/cache-router/config.yaml"


# --- Kubernetes (kustomize) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian package kubectl)")
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_kustomize_renders_the_stack(k8s: list[dict[str, Any]]) -> None:
    for doc in k8s:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "cache-router"
    deployments = by_kind(k8s, "Deployment")
    assert {"cache-router", "redis", "sim-engine", "prometheus", "grafana"} <= set(deployments)
    services = by_kind(k8s, "Service")
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments.values()), f"Service {name} selects no pod"
    configmaps = set(by_kind(k8s, "ConfigMap"))
    for name, dep in deployments.items():
        for vol in dep["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps, f"{name} mounts a missing ConfigMap"


def test_kustomize_router_deployment_is_production_shaped(k8s: list[dict[str, Any]]) -> None:
    dep = by_kind(k8s, "Deployment")["cache-router"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["requests"]
    assert spec["terminationGracePeriodSeconds"] >= 30 and "preStop" in c["lifecycle"]
    sa = spec["serviceAccountName"]
    assert sa in by_kind(k8s, "ServiceAccount")
    role = by_kind(k8s, "Role")["cache-router-discovery"]
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in role["rules"])
    binding = by_kind(k8s, "RoleBinding")["cache-router-discovery"]
    assert binding["subjects"][0]["name"] == sa and binding["roleRef"]["name"] == "cache-router-discovery"


def test_kustomize_router_config_discovers_the_engine_pods(k8s: list[dict[str, Any]], tmp_path: Path) -> None:
    cm = next(d for n, d in by_kind(k8s, "ConfigMap").items() if n.startswith("cache-router-config"))
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    discovery = yaml.safe_load(cm["data"]["config.yaml"])["discovery"]
    engines = by_kind(k8s, "Deployment")["sim-engine"]["spec"]["template"]
    key, value = discovery["label_selector"].split("=")
    assert engines["metadata"]["labels"][key] == value
    ports = {p["containerPort"] for p in engines["spec"]["containers"][0]["ports"]}
    assert {discovery["port"], discovery["kv_events_port"], discovery["kv_replay_port"]} <= ports


def test_kustomize_copies_match_the_sources(k8s: list[dict[str, Any]]) -> None:
    cms = {n.rsplit("-", 1)[0]: d for n, d in by_kind(k8s, "ConfigMap").items()}
    assert cms["prometheus-config"]["data"]["alerts.yml"] == (DEPLOY / "prometheus" / "alerts.yml").read_text(), \
        "cp deploy/prometheus/alerts.yml deploy/k8s/prometheus/alerts.yml"
    assert cms["grafana-dashboards"]["data"]["cache-router.json"] == \
        (DEPLOY / "grafana" / "dashboards" / "cache-router.json").read_text(), "run deploy/grafana/dashboard.py"
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert cms["grafana-provisioning"]["data"]["datasources.yaml"] == \
        (provisioning / "datasources" / "prometheus.yaml").read_text()
    assert cms["grafana-provisioning"]["data"]["dashboards.yaml"] == \
        (provisioning / "dashboards" / "cache-router.yaml").read_text()
