"""Device check for vision models on the transformers engine: run by hand on a GPU machine (not a test).

    python scripts/vision_device_check.py cuda bf16,fp32

Builds the tests' tiny random-weight LLaVA (tests/support/tiny_models.build_tiny_llava), loads it with
the real TransformersRunner.load on the device, decodes images with runners/images.py, prepares the
prompts with runners/prepare.py and decodes several image requests (and a text-only one) concurrently
through the batching scheduler: same image, same greedy answer; 16 prompt tokens per image.
Needs the project's runtime packages (pydantic-settings, Pillow) beside torch and transformers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from PIL import Image

from runners.base import GenerationRequest, SamplingOptions
from runners.images import decode_request_images, image_part
from runners.local_cache import LocalModel
from runners.names import ModelRef
from runners.prepare import prepare_prompt
from runners.quantization import Precision
from runners.transformers import TransformersRunner
from settings import Settings


def b64png(color):
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request(colors):
    parts = [image_part(b64png(c), f"images[{i}]") for i, c in enumerate(colors)]
    content = [*parts, {"type": "text", "text": "what is it?"}] if parts else "what is it?"
    return GenerationRequest(
        messages=[{"role": "user", "content": content}],
        options=SamplingOptions(max_tokens=8, temperature=0, ignore_eos=True),
    )


async def run(runner, requests):
    async def one(r):
        prepared = prepare_prompt(
            runner.tokenizer, decode_request_images(r, Settings()), runner.context_length, runner.processor
        )
        text, last = "", None
        async for chunk in runner.generate(prepared):
            text += chunk.text
            last = chunk
        return text, last.prompt_tokens, last.completion_tokens

    return await asyncio.gather(*(one(r) for r in requests))


def main(device, modes):
    from tests.support.tiny_models import build_tiny_llava

    with tempfile.TemporaryDirectory(prefix="tiny-llava-") as folder:
        model = LocalModel(ModelRef("test-org/tiny-llava"), "0" * 40, build_tiny_llava(Path(folder)), 0, 0, 0.0)
        check(model, device, modes)


def check(model, device, modes):
    colors = [[(255, 0, 0)], [(255, 0, 0)], [(0, 0, 0)], [(255, 255, 255), (0, 0, 255)], []]
    results = {}
    for mode in modes:
        started = time.perf_counter()
        runner = TransformersRunner.load(model, Precision(mode, "device check"), device, False, max_batch_size=8)
        print(
            device,
            mode,
            "loaded",
            type(runner._hf_model).__name__,
            runner._hf_model.dtype,
            runner._hf_model.device,
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )
        outs = asyncio.run(run(runner, [request(c) for c in colors]))
        for c, o in zip(colors, outs, strict=True):
            print(f"  images={c} -> prompt_tokens={o[1]} completion_tokens={o[2]} text={o[0]!r}")
        assert outs[0][0] == outs[1][0], "same image, same greedy answer"
        assert [o[1] for o in outs] == [outs[4][1] + 16 * len(c) for c in colors], "16 tokens per image"
        results[mode] = [o[0] for o in outs]
        runner.unload()
    print("RESULT", device, {m: len(set(r[:4])) for m, r in results.items()}, "distinct answers over 4 image requests")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda", (sys.argv[2] if len(sys.argv) > 2 else "bf16,fp32").split(","))
