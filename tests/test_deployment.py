"""What an operator deploys: the Kubernetes manifests and BentoCloud config in deploy/, the service's
declared resources, readiness, and refusing to run on CPU when told DEVICE=cuda.

The manifests are checked against the Kubernetes schemas (kubernetes-validate bundles them; no
cluster exists here). Readiness is checked on the real service app against a real PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from settings import Settings
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.32.0"
SETTING_NAMES = {name.upper() for name in Settings.model_fields} | {"HF_TOKEN", "HF_HOME", "HF_ENDPOINT"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_are_valid(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_the_deployment_wires_probes_secret_cache_and_grace_period() -> None:
    from jobs.puller import STOP_WAIT

    (deployment,) = documents(ROOT / "deploy" / "kubernetes" / "deployment.yaml")
    (pvc,) = documents(ROOT / "deploy" / "kubernetes" / "pvc.yaml")
    (secret,) = documents(ROOT / "deploy" / "kubernetes" / "secret.example.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] >= 2
    assert pod["terminationGracePeriodSeconds"] > STOP_WAIT  # time to hand running pulls back
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert "DATABASE_URL" in secret["stringData"]
    assert secret["stringData"]["DATABASE_URL"].startswith("postgresql+psycopg://")
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica reads and pulls into it
    hf_home = next(e["value"] for e in container["env"] if e["name"] == "HF_HOME")
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": hf_home}]
    for env in container["env"]:
        assert env["name"] in SETTING_NAMES, env


def test_bentocloud_config_sets_only_known_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "bentocloud.yaml").read_text())
    assert config["scaling"]["min_replicas"] >= 2
    assert {e["name"] for e in config["envs"]} <= SETTING_NAMES
    from service import _image_envs

    assert _image_envs(Settings()) == []  # a local `bentoml serve` gets no image defaults (DEVICE stays auto)
    monkeypatch.setenv("AI_SERVER_IMAGE_BUILD", "1")
    declared = {e["name"]: e.get("value") for e in _image_envs(Settings())}
    assert set(declared) <= SETTING_NAMES
    assert declared["DEVICE"] == "cuda"
    assert declared["DATABASE_URL"] is None  # BentoCloud requires it: from the deployment's secret


def test_service_resources_follow_the_settings() -> None:
    from service import _resources

    assert _resources(Settings()) == {"gpu": 1}
    assert _resources(Settings(tensor_parallel_size=4, gpu_type="nvidia-a100-80gb")) == {
        "gpu": 4,
        "gpu_type": "nvidia-a100-80gb",
    }
    assert _resources(Settings(gpu_count=0)) == {"cpu": "4"}


def test_tensor_parallel_size_reaches_vllm(tiny_llama_dir: Path, install_model) -> None:
    from runners.local_cache import find_local
    from runners.names import parse_model_name
    from runners.quantization import Precision
    from runners.vllm import engine_args

    install_model(tiny_llama_dir, "test-org/tp")
    local = find_local(parse_model_name("test-org/tp"))
    assert local is not None
    precision = Precision(mode="bf16", reason="test")
    assert engine_args(local, precision, "cuda", False, Settings(tensor_parallel_size=2)).tensor_parallel_size == 2
    assert engine_args(local, precision, "cpu", False, Settings(tensor_parallel_size=2)).tensor_parallel_size == 1


def test_ready_only_while_the_database_answers(serve, postgres: PostgresServer) -> None:
    url = postgres.new_database()
    client = serve(DATABASE_URL=url)
    assert client.get("/readyz").status_code == 200
    postgres.drop_database(url)  # the database goes away under a running server
    assert client.get("/readyz").status_code == 503
    assert client.get("/livez").status_code == 200  # alive: Kubernetes must not restart it for this


def test_device_cuda_without_cuda_fails_at_startup_with_a_clear_message(serve) -> None:
    import torch

    assert not torch.cuda.is_available()  # this machine has no GPU: what a misconfigured host looks like
    with pytest.raises(Exception, match="DEVICE=cuda, but CUDA is not available"):
        serve(DEVICE="cuda")


def test_the_bento_image_installs_the_cuda_13_line_locked_without_audio_packages(tmp_path: Path) -> None:
    """`make bento`'s script, run for real: BentoML builds the Bento (locking the requirements
    against the package index) and exports the Containerfile `bentoml containerize` would use."""
    out = tmp_path / "bento"
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run(
        [sys.executable, "scripts/build_bento.py", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    containerfile = (out / "Containerfile").read_text()
    locked = dict(
        line.split("==", 1)
        for line in (out / "requirements.lock.txt").read_text().splitlines()
        if "==" in line and not line.startswith(("#", "-"))
    )
    assert "FROM python:3.11-slim" in containerfile  # no nvidia/cuda base, no deadsnakes Python
    assert "nvidia/cuda" not in containerfile
    assert "uv pip uninstall torchaudio torchcodec" in containerfile
    assert locked["torch"] == "2.13.0" and locked["vllm"] == "0.32.0"
    assert locked["nvidia-cuda-runtime"].startswith("13.")  # torch's and vLLM's CUDA line
    assert "bitsandbytes" in locked and "psycopg-binary" in locked
    assert "ARG DEVICE=cuda" in containerfile and "ENV DEVICE=$DEVICE" in containerfile
    assert "ARG HF_HOME=/home/bentoml/hf" in containerfile
    assert "ENV DATABASE_URL=$DATABASE_URL" in containerfile
    assert 'exec python -m cli "$@"' in containerfile and "/usr/local/bin/ai-server" in containerfile
    src = next((tmp_path / "bentoml" / "bentos" / "ai-server").glob("*/src"))
    for path in (
        "service.py",
        "settings.py",
        "supervision.py",
        "api/app.py",
        "runners/prepare.py",
        "cli/main.py",
        "requirements.txt",
    ):
        assert (src / path).is_file(), path  # the product ships whole
    assert not (src / "tests").exists() and not (src / ".venv").exists()
