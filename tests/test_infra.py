"""infra/ checked without a Docker engine or a cluster: the compose file renders and validates with the
compose client, the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate,
offline) and KubeRay's ray.io/v1 kinds against infra/k8s/schemas, and both agree with the code
(Ray version, settings keys, the image's entry point)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.31"


def _compose_cmd() -> list[str] | None:
    """`docker compose` (v2 plugin) when present, else Debian's docker-compose (the client alone renders/validates)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _compose(args: list[str], env_file: Path) -> subprocess.CompletedProcess:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("no compose client: `apt-get install docker-compose` (CI installs it in .ci/run)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MINIO_", "RAY_WORKER", "BIND_"))}
    return subprocess.run([*cmd, "-f", str(INFRA / "compose.yaml"), "--env-file", str(env_file), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def _env_file(tmp_path: Path, **values) -> Path:
    example = (INFRA / ".env.example").read_text()
    lines = []
    for line in example.splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={values[key]}" if key in values else line)
    path = tmp_path / "test.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compose_renders_with_credentials_and_binds_localhost(tmp_path):
    env = _env_file(tmp_path, POSTGRES_PASSWORD="pg-secret", MINIO_ROOT_PASSWORD="minio-secret")
    r = _compose(["config"], env)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    services = cfg["services"]
    assert {"postgres", "minio", "minio-init", "prefect-server", "prefect-worker", "mlflow", "ray-head",
            "ray-worker"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            text = json.dumps(port)
            assert "127.0.0.1" in text, f"{name} publishes {port} beyond localhost"
    assert all("healthcheck" in services[s] for s in ("postgres", "minio", "prefect-server", "mlflow", "ray-head"))
    assert set(cfg["volumes"]) >= {"pgdata", "miniodata", "work"}
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["GANFORGE__RUNTIME__RAY_STORAGE"].startswith("s3://")
    assert worker_env["AWS_SECRET_ACCESS_KEY"] == "minio-secret"
    assert "pg-secret" in " ".join(services["mlflow"]["command"])
    # the settings the services pass are real params keys
    from ganforge.tasks.params import load_params

    for k in worker_env:
        if k.startswith("GANFORGE__"):
            os.environ[k] = str(worker_env[k])
    try:
        p = load_params(None)
    finally:
        for k in list(os.environ):
            if k.startswith("GANFORGE__"):
                del os.environ[k]
    assert p.runtime.ray_address == "ray-head:6379" and p.runtime.s3_endpoint_url == "http://minio:9000"


def test_compose_refuses_to_start_without_credentials(tmp_path):
    r = _compose(["config"], INFRA / ".env.example")  # the example ships with empty passwords
    assert r.returncode != 0
    assert "POSTGRES_PASSWORD" in r.stderr or "MINIO_ROOT_PASSWORD" in r.stderr


def test_env_example_holds_no_credentials_and_env_is_ignored():
    for line in (INFRA / ".env.example").read_text().splitlines():
        if "PASSWORD" in line and not line.startswith("#"):
            assert line.split("=", 1)[1] == "", line
    assert "infra/.env" in (ROOT / ".gitignore").read_text().splitlines()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_manifests() -> list[tuple[str, dict]]:
    out = []
    for f in sorted((INFRA / "k8s").glob("*.yaml")):
        if f.name != "kustomization.yaml":
            out += [(f.name, d) for d in _docs(f)]
    return out


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]] + (_pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
                                                 if "rayClusterSpec" in spec else [])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def test_kubernetes_manifests_validate_against_their_schemas():
    import jsonschema
    import kubernetes_validate

    schema = json.loads((INFRA / "k8s" / "schemas" / "kuberay-v1.schema.json").read_text())
    kinds = []
    for name, doc in _all_manifests():
        kinds.append(doc["kind"])
        if doc["apiVersion"] == "ray.io/v1":
            jsonschema.validate(doc, schema)
            for tpl in _pod_templates(doc):  # every pod template against the real PodTemplateSpec schema
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl}
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"RayCluster", "RayJob", "Deployment", "Service", "ConfigMap"} <= set(kinds)


def test_kuberay_schema_catches_mistakes():
    import jsonschema

    schema = json.loads((INFRA / "k8s" / "schemas" / "kuberay-v1.schema.json").read_text())
    doc = next(d for _, d in _all_manifests() if d["kind"] == "RayCluster")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(doc))
    del bad["spec"]["headGroupSpec"]["template"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_manifests_agree_with_the_code():
    import ray

    from ganforge.tasks.params import RuntimeParams

    docs = dict((d["kind"], d) for _, d in _all_manifests())
    cluster = docs["RayCluster"]
    assert cluster["spec"]["rayVersion"] == ray.__version__, "RayCluster.rayVersion must match the image's ray"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert docs["RayJob"]["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert docs["RayJob"]["spec"]["entrypoint"].startswith("ganforge train --stage ")
    cm = docs["ConfigMap"]["data"]
    runtime_keys = set(RuntimeParams.model_fields)
    for k in cm:
        if k.startswith("GANFORGE__RUNTIME__"):
            assert k.removeprefix("GANFORGE__RUNTIME__").lower() in runtime_keys, k
    kust = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert all((INFRA / "k8s" / r).exists() for r in kust["resources"])


def test_kustomize_renders_when_kubectl_is_present():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")
    r = subprocess.run(["kubectl", "kustomize", str(INFRA / "k8s")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout) if d]
    assert kinds.count("Deployment") == 3 and "RayCluster" in kinds


def test_dockerfile_copies_what_exists_and_installs_the_extras():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src.rstrip("/")).exists(), f"Dockerfile copies missing {src}"
    assert "'.[s3,server]'" in text
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"s3", "server"} <= set(extras)
