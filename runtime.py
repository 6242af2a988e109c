"""The server's long-lived state: settings, the model pool, the pull jobs and stored responses.

service.py creates one Runtime per process and hands it to the API through `app.state`, so the
API modules never import BentoML and tests can drive the same objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import metrics
from jobs.presets import PresetStore
from jobs.puller import Puller
from jobs.responses_store import ResponseStore
from jobs.store import JobStore
from runners.pool import ModelPool
from runners.presets import resolve
from settings import Settings

log = logging.getLogger(__name__)
_GAUGE_INTERVAL_SECONDS = 1.0


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = ModelPool(settings)
        job_store = JobStore(settings.resolved_database_url)
        self.jobs = Puller(job_store, self.pool, settings)
        self.responses = ResponseStore(job_store.engine, settings.responses_retention)  # one engine for all
        self.presets = PresetStore(job_store.engine)
        self.started_at = time.time()
        self._gauges: asyncio.Task[None] | None = None
        self._preload: asyncio.Task[None] | None = None
        self.preloaded: list[str] = []
        self.preload_failures: dict[str, str] = {}  # PRELOAD_MODELS that did not load, and why

    async def start(self) -> None:
        self.pool.start()
        await asyncio.to_thread(self.responses.create_schema)
        await asyncio.to_thread(self.presets.create_schema)
        await self.jobs.start()
        self._gauges = asyncio.create_task(self._sample_gauges(), name="metrics-gauges")
        self._preload = asyncio.create_task(self._preload_models(), name="preload-models")

    async def ready(self) -> bool:
        """Ready to serve: the job database answers, PRELOAD_MODELS have been loaded (or failed:
        /status says why) and, where models run on CUDA, CUDA works."""
        if self._preload is not None and not self._preload.done():
            return False
        if not await self.jobs.ready():
            return False
        if self.pool.device == "cuda":
            return await asyncio.to_thread(_cuda_works)
        return True

    def preload_status(self) -> dict[str, object]:
        """PRELOAD_MODELS as /status reports them."""
        return {
            "models": self.settings.preload_models,
            "finished": self._preload is not None and self._preload.done(),
            "loaded": self.preloaded,
            "failed": self.preload_failures,
        }

    async def _preload_models(self) -> None:
        """Load each of PRELOAD_MODELS in turn, as a request would (presets resolve to their model);
        one that fails is recorded and logged, and the server serves anyway."""
        for name in self.settings.preload_models:
            try:
                served = await resolve(self.presets, name)
                lease = await self.pool.acquire(served.name, quantize=served.quantize, files=served.files)
                await lease.release()
                self.preloaded.append(name)
                log.info("preloaded %s", name)
            except Exception as exc:
                self.preload_failures[name] = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                log.warning("preloading %s failed: %s", name, self.preload_failures[name])

    async def stop(self) -> None:
        for task in (self._gauges, self._preload):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.jobs.stop()
        await self.pool.close()

    async def _sample_gauges(self) -> None:
        """Batch sizes and queue depths change every step: sampled here, not in the decode loop."""
        sampled: set[str] = set()
        while True:
            sampled = metrics.sample_pool(self.pool.snapshot(), sampled)
            await asyncio.sleep(_GAUGE_INTERVAL_SECONDS)


def _cuda_works() -> bool:
    """A real allocation on the GPU: `is_available()` stays true after the device fails (Xid errors)."""
    import torch

    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:
        return False
