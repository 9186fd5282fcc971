"""The Helm chart, checked without helm (not installable here; if ``helm`` is on the PATH the
chart is also linted and rendered by it).

- values.yaml validates against values.schema.json, and bad values are rejected by it;
- every ``.Values.x.y`` a template reads exists in values.yaml;
- the ConfigMap template's ``toYaml .Values.config`` pattern, rendered here by a small renderer,
  gives a config that passes ``cache-router check-config``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cache-router"
TEMPLATES = CHART / "templates"


def values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return data


def schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return data


def errors(vals: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(vals)]


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "cache-router"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]) and chart["appVersion"]
    kinds = {f.name for f in TEMPLATES.glob("*.yaml")}
    assert {"deployment.yaml", "service.yaml", "configmap.yaml", "serviceaccount.yaml", "rbac.yaml",
            "hpa.yaml", "pdb.yaml", "servicemonitor.yaml"} <= kinds


def test_values_validate_against_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(schema())
    assert errors(values()) == []


@pytest.mark.parametrize(("path", "bad", "why"), [
    (("replicaCount",), 0, "at least one replica"),
    (("image", "pullPolicy"), "Sometimes", "not a pull policy"),
    (("config", "redis_url"), "redis://:secret@redis:6379", "the Redis URL belongs in the Secret"),
    (("config", "discovery", "kind"), "consul", "unknown discovery kind"),
    (("redis", "existingSecret"), "", "redis enabled without a Secret"),
    (("serviceMonitor", "interval"), "often", "not a duration"),
    (("unknownKey",), 1, "typo at the top level"),
])
def test_schema_rejects_bad_values(path: tuple[str, ...], bad: Any, why: str) -> None:
    vals = copy.deepcopy(values())
    node = vals
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    assert errors(vals), f"schema accepted: {why}"


VALUES_PATH = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def test_every_values_path_in_templates_exists() -> None:
    vals = values()
    used: set[str] = set()
    for tpl in TEMPLATES.iterdir():
        for match in VALUES_PATH.finditer(tpl.read_text()):
            used.add(match.group(1).lstrip("."))
    assert len(used) > 20, "the pattern found too few paths to be reading the templates"
    missing = []
    for dotted in sorted(used):
        node: Any = vals
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(dotted)
                break
            node = node[key]
    assert missing == [], f"templates read values that values.yaml does not define: {missing}"


# --- a renderer for the ConfigMap template (the subset it uses) -------------------------------
def render_configmap(vals: dict[str, Any], release: str = "rel") -> str:
    """Render templates/configmap.yaml: comments, include of the name/labels helpers, and
    ``toYaml .Values.config | nindent N``, with Go template whitespace trimming."""
    text = (TEMPLATES / "configmap.yaml").read_text()
    fullname = f"{release}-cache-router"
    labels = f"app.kubernetes.io/name: cache-router\napp.kubernetes.io/instance: {release}"

    def action(m: re.Match[str]) -> str:
        body = m.group(2).strip()
        if body.startswith("/*"):
            return ""
        if body == 'include "cache-router.fullname" .':
            return fullname
        if (inc := re.fullmatch(r'include "cache-router.labels" \. \| nindent (\d+)', body)):
            return "\n" + "\n".join(" " * int(inc.group(1)) + line for line in labels.splitlines())
        if (ty := re.fullmatch(r"toYaml \.Values\.config \| nindent (\d+)", body)):
            dumped = yaml.safe_dump(vals["config"], sort_keys=True).rstrip("\n")
            return "\n" + "\n".join(" " * int(ty.group(1)) + line for line in dumped.splitlines())
        raise AssertionError(f"the ConfigMap template grew an action this renderer does not know: {body!r}")

    # Go templates: "{{-" eats the whitespace before, "-}}" the whitespace after.
    text = re.sub(r"\s*(\{\{-)", r"\1", text)
    text = re.sub(r"(-\}\})\s*", r"\1", text)
    return re.sub(r"\{\{(-?)(.*?)-?\}\}", action, text, flags=re.S)


def test_configmap_renders_a_config_that_passes_check_config(tmp_path: Path) -> None:
    rendered = yaml.safe_load(render_configmap(values()))
    assert rendered["kind"] == "ConfigMap" and rendered["metadata"]["name"] == "rel-cache-router"
    config_text = rendered["data"]["config.yaml"]
    assert yaml.safe_load(config_text) == values()["config"]
    path = tmp_path / "config.yaml"
    path.write_text(config_text)
    result = subprocess.run([sys.executable, "-m", "router", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "0.0.0.0:8080" in result.stdout


def test_check_config_catches_a_bad_config_value(tmp_path: Path) -> None:
    """The same path fails on a config the router would refuse (so the test above can fail)."""
    vals = copy.deepcopy(values())
    vals["config"]["scheduling"] = {"weigths": {"prefix": 1.0}}  # typo: unknown keys are errors
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_load(render_configmap(vals))["data"]["config.yaml"])
    result = subprocess.run([sys.executable, "-m", "router", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0


def test_deployment_probes_drain_and_secret() -> None:
    vals = values()
    assert vals["livenessProbe"]["httpGet"]["path"] == "/health"
    assert vals["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert vals["podSecurityContext"]["runAsNonRoot"] is True
    assert vals["terminationGracePeriodSeconds"] > vals["preStopSleepSeconds"]
    assert vals["redis"]["enabled"] and vals["redis"]["existingSecret"], "external Redis from a Secret by default"
    dep = (TEMPLATES / "deployment.yaml").read_text()
    for needle in ("livenessProbe", "readinessProbe", "preStop", "terminationGracePeriodSeconds",
                   "secretKeyRef", "$(CACHE_ROUTER_REDIS_URL)", "securityContext", "resources"):
        assert needle in dep, needle
    # The container ports are the ones the router's config listens on, and the probes use them by
    # name: liveness on the helper process's port (fast under saturation), readiness on the main one.
    assert "containerPort: {{ .Values.config.port }}" in dep
    assert "containerPort: {{ .Values.config.health_port }}" in dep
    assert vals["livenessProbe"]["httpGet"]["port"] == "liveness" and vals["config"]["health_port"]
    assert vals["readinessProbe"]["httpGet"]["port"] == "http"


def test_helm_lint_and_template_when_helm_is_installed(tmp_path: Path) -> None:
    if shutil.which("helm") is None:
        pytest.skip("helm is not installed here (not in Debian); the checks above stand in for it")
    lint = subprocess.run(["helm", "lint", str(CHART)], capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = subprocess.run(["helm", "template", "rel", str(CHART), "--set", "serviceMonitor.enabled=true"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= set(docs)
    path = tmp_path / "config.yaml"
    path.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    check = subprocess.run([sys.executable, "-m", "router", "check-config", str(path)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert check.returncode == 0, check.stderr
