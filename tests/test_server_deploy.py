"""Deployment artefacts agree with the service: JSORC config, Kubernetes manifest, Dockerfile."""

from __future__ import annotations

from pathlib import Path

import yaml

from llm_module.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def test_jsorc_loads_our_action_config():
    from jaseci.jsorc.live_actions import action_configs, load_action_config

    assert load_action_config("llm_module.config", "llm") is True
    config = action_configs["llm"]
    assert config["module"] == "llm_module.llm"
    remote = config["remote"]
    assert set(remote) == {"Service", "ConfigMap", "Deployment"}
    container = remote["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    port = container["ports"][0]["containerPort"]
    assert remote["Service"]["spec"]["ports"][0]["targetPort"] == port
    assert f"--port {port}" in remote["ConfigMap"]["data"]["prod_up"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_k8s_manifest_probes_and_volume():
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "deploy" / "k8s.yaml").read_text())}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}
    env = {e["name"]: e for e in container["env"]}
    assert env["LLM_MODULE_DATA_ROOT"]["value"] == "/data"
    assert "secretKeyRef" in env["LLM_MODULE_TOKEN"]["valueFrom"]
    for name in env:  # every env var the manifest sets is a real setting (or the home/cache paths)
        assert name.removeprefix("LLM_MODULE_").lower() in Settings.__fields__ | {"home": None}, name
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_dockerfile_serves_with_env_settings():
    text = (REPO / "Dockerfile").read_text()
    assert 'CMD ["llm-module", "serve"]' in text
    for setting in ("LLM_MODULE_DATA_ROOT=/data", "LLM_MODULE_HOST=0.0.0.0", "LLM_MODULE_PORT=8000"):
        assert setting in text
