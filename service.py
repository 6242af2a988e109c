"""ai-server as a BentoML service: one process owns the models; the HTTP API is a mounted app.

`bentoml serve` (or `make serve`) starts it. Heavy imports (torch, transformers) happen in
`__init__`, inside the serving worker, so the supervisor process stays small.
"""

from __future__ import annotations

import os

# huggingface_hub reads this at import and otherwise phones huggingface.co on first use; a server
# that only touches the network for explicit pulls must not. Operators can still set it to 0.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import bentoml

from api.app import create_app
from api.request_id import install_log_filter
from runtime import Runtime
from settings import Settings, load_settings
from supervision import exit_with_parent

app = create_app()

# The container image (`make bento`), the way BentoML 1.4 builds GPU services: a slim Python base
# and PyPI's CUDA builds, whose wheels bring the CUDA 13 user-space libraries (torch 2.13, vLLM 0.32
# and bitsandbytes all follow that line); the host needs only an NVIDIA driver for CUDA 13 (>= 580).
# Versions are locked at build time. torchaudio and torchcodec, which vLLM pulls in, serve no text or
# image model and go (torchvision stays: vLLM's vision models import it).
IMAGE = (
    bentoml.images.Image(python_version="3.11", lock_python_packages=True)
    .requirements_file("requirements.txt")
    .python_packages("vllm==0.32.0")
    .run("uv pip uninstall torchaudio torchcodec")
    # The `ai-server` command (cli/) on the image's PATH: the Bento's code is not pip-installed there.
    .run(
        """printf '#!/bin/sh\\nPYTHONPATH="$BENTO_PATH/src" exec python -m cli "$@"\\n' > /usr/local/bin/ai-server"""
        " && chmod +x /usr/local/bin/ai-server"
    )
)

# Service options read the environment when the module is imported (at build and at serve time).
_settings: Settings = load_settings()


def _resources(settings: Settings) -> dict[str, object]:
    """What BentoCloud allocates: GPU_COUNT GPUs (TENSOR_PARALLEL_SIZE by default), of GPU_TYPE."""
    gpus = settings.gpu_count if settings.gpu_count is not None else settings.tensor_parallel_size
    resources: dict[str, object] = {"gpu": gpus} if gpus else {"cpu": "4"}
    if gpus and settings.gpu_type:
        resources["gpu_type"] = settings.gpu_type
    return resources


def _image_envs(settings: Settings) -> list[dict[str, str]]:
    """The environment the image declares: BentoML bakes these into the Containerfile and BentoCloud
    asks for the ones without a value (DATABASE_URL: replicas share pull jobs through it).

    BentoML also hands a declared default to every `bentoml serve`, so they are declared only when
    building the image (scripts/build_bento.py sets AI_SERVER_IMAGE_BUILD=1) and inside it
    (BENTOML_CONTAINERIZED): a local serve keeps DEVICE=auto and needs no database.
    """
    if not (os.environ.get("AI_SERVER_IMAGE_BUILD") == "1" or os.environ.get("BENTOML_CONTAINERIZED") == "true"):
        return []
    return [
        {"name": "DATABASE_URL"},  # required on BentoCloud; empty in a plain `docker run` (SQLite)
        {"name": "DEVICE", "value": "cuda"},  # fail loudly on a host without a working GPU
        {"name": "HF_HOME", "value": "/home/bentoml/hf"},  # mount the shared model cache here
        {"name": "DATA_DIR", "value": "/home/bentoml/data"},
        {"name": "MAX_BATCH_SIZE", "value": str(settings.max_batch_size)},
        {"name": "TENSOR_PARALLEL_SIZE", "value": str(settings.tensor_parallel_size)},
    ]


@bentoml.service(
    name="ai-server",
    workers=1,  # one process owns the GPU and the model pool; concurrency comes from asyncio + batching
    image=IMAGE,
    resources=_resources(_settings),
    traffic={
        "timeout": 3600,  # long generations and streamed pulls
        # The batch one model decodes at once: BentoCloud scales out past it. Requests beyond it
        # wait in the model's own queue (MAX_QUEUE), so none are refused before the server says so.
        "concurrency": _settings.max_batch_size,
    },
    envs=_image_envs(_settings),
    http={"port": 8005},
)
@bentoml.asgi_app(app, path="/")
class AIServer:
    def __init__(self) -> None:
        exit_with_parent()  # BentoML's worker has a session of its own: a killed supervisor leaves it
        install_log_filter()  # BentoML has configured the worker's logging by now
        self.runtime = Runtime(load_settings())
        app.state.runtime = self.runtime

    @bentoml.on_startup
    async def start_background_work(self) -> None:
        await self.runtime.start()

    @bentoml.on_shutdown
    async def stop_background_work(self) -> None:
        await self.runtime.stop()

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz: the job database answers, PRELOAD_MODELS are loaded (or failed) and,
        with DEVICE=cuda, CUDA works."""
        return await self.runtime.ready()
