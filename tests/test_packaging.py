"""`bentoml build` accepts bentofile.yaml, and the Bento's Dockerfile targets CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bento_builds_with_a_cuda_dockerfile(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("ai-server:")
    src = next((tmp_path / "bentoml" / "bentos" / "ai-server").glob("*/src"))
    for path in ("service.py", "settings.py", "runtime.py", "api/app.py", "runners/pool.py", "requirements.txt"):
        assert (src / path).is_file(), path
    assert not (src / "tests").exists() and not (src / ".venv").exists()
    requirements = (src.parent / "env" / "python" / "requirements.txt").read_text()
    assert "vllm==0.32.0" in requirements and "transformers>=" in requirements  # the engine, and ours

    dockerfile = tmp_path / "Dockerfile"
    export = ("import bentoml, sys; bentoml.container.get_containerfile(sys.argv[1], output_path=sys.argv[2])")
    subprocess.run([sys.executable, "-c", export, tag, str(dockerfile)], env=env, check=True, timeout=120)
    assert "FROM nvidia/cuda:12.8" in dockerfile.read_text()
