"""The server's long-lived state: settings, the model pool, the pull jobs and stored responses.

service.py creates one Runtime per process and hands it to the API through `app.state`, so the
API modules never import BentoML and tests can drive the same objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import metrics
from jobs.puller import Puller
from jobs.responses_store import ResponseStore
from jobs.store import JobStore
from runners.pool import ModelPool
from settings import Settings

_GAUGE_INTERVAL_SECONDS = 1.0


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = ModelPool(settings)
        job_store = JobStore(settings.resolved_database_url)
        self.jobs = Puller(job_store, self.pool, settings)
        self.responses = ResponseStore(job_store.engine, settings.responses_retention)  # one engine for both
        self.started_at = time.time()
        self._gauges: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.pool.start()
        await asyncio.to_thread(self.responses.create_schema)
        await self.jobs.start()
        self._gauges = asyncio.create_task(self._sample_gauges(), name="metrics-gauges")

    async def ready(self) -> bool:
        """Ready to serve: the job database answers and, where models run on CUDA, CUDA works."""
        if not await self.jobs.ready():
            return False
        if self.pool.device == "cuda":
            return await asyncio.to_thread(_cuda_works)
        return True

    async def stop(self) -> None:
        if self._gauges:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
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
