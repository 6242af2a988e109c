"""ai-server as a BentoML service: one process owns the models; the HTTP API is a mounted app.

`bentoml serve` (or `make serve`) starts it. Heavy imports (torch, transformers) happen in
`__init__`, inside the serving worker, so the supervisor process stays small.
"""

from __future__ import annotations

import os

# huggingface_hub reads this at import and otherwise phones huggingface.co on first use; a server
# that only touches the network for explicit pulls must not. Operators can still set it to 0.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import bentoml  # noqa: E402

from api.app import create_app  # noqa: E402
from api.request_id import install_log_filter  # noqa: E402
from runtime import Runtime  # noqa: E402
from settings import load_settings  # noqa: E402

app = create_app()


@bentoml.service(
    name="ai-server",
    workers=1,  # one process owns the GPU and the model pool; concurrency comes from asyncio + batching
    traffic={"timeout": 3600},  # long generations and streamed pulls
    http={"port": 8005},
)
@bentoml.asgi_app(app, path="/")
class AIServer:
    def __init__(self) -> None:
        install_log_filter()  # BentoML has configured the worker's logging by now
        self.runtime = Runtime(load_settings())
        app.state.runtime = self.runtime

    @bentoml.on_startup
    async def start_background_work(self) -> None:
        await self.runtime.start()

    @bentoml.on_shutdown
    async def stop_background_work(self) -> None:
        await self.runtime.stop()
