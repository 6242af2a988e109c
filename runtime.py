"""The server's long-lived state: settings, the model pool and the pull jobs.

service.py creates one Runtime per process and hands it to the API through `app.state`, so the
API modules never import BentoML and tests can drive the same objects.
"""

from __future__ import annotations

import time

from jobs.puller import Puller
from jobs.store import JobStore
from runners.pool import ModelPool
from settings import Settings


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = ModelPool(settings)
        self.jobs = Puller(JobStore(settings.resolved_database_url), self.pool, settings)
        self.started_at = time.time()

    async def start(self) -> None:
        self.pool.start()
        await self.jobs.start()

    async def stop(self) -> None:
        await self.jobs.stop()
        await self.pool.close()
