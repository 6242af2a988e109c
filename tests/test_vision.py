"""Vision models: images through the Ollama, OpenAI and native dialects, against a real
`bentoml serve` that pulls a tiny random-weight LLaVA (and a text-only llama) from a local hub.

The LLaVA's processor turns each image into 16 tokens (32x32 pixels in 8x8 patches), so the prompt
token counts the server reports grow by exactly 16 per image. Its weights are random: tests check
what the server does with images (accepted, counted, refused with the right 400), not what the
model says about them.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from PIL import Image

from runners.backend import VISION_OBSTACLE, choose_backend
from runners.quantization import Precision
from tests.support.hub_server import LocalHub
from tests.support.server_process import running_server
from tests.support.tiny_models import build_tiny_llava

LLAVA = "test-org/tiny-llava"
LLAMA = "test-org/tiny-llama"
TOKENS_PER_IMAGE = 16
GREEDY = {"temperature": 0, "num_predict": 4}


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def bomb_png(side: int = 60_000) -> bytes:
    """A PNG whose header claims side x side pixels (3.6 gigapixels) in a few hundred bytes of
    compressed zeros: decoding it would need gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    rows = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A local HTTP server with one PNG at /cat.png: what an allow-listed remote image fetch reaches."""
    body = png((10, 200, 10))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/cat.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_llava_dir: Path, tiny_llama_dir: Path, image_host: str
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("vision")
    with LocalHub(root / "hub") as hub:
        hub.add_repo(LLAVA, tiny_llava_dir)
        hub.add_repo(LLAMA, tiny_llama_dir)
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(root / "hf"),
            "DATA_DIR": str(root / "data"),
            "BENTOML_HOME": str(root / "bentoml"),
            "IMAGE_URL_ALLOWLIST": f"{image_host}/",
            "MAX_IMAGES_PER_REQUEST": "4",
            "MAX_IMAGE_PIXELS": "1000000",
        }
        with running_server(env, root / "server.log") as url:
            client = ollama.Client(host=url)
            assert client.pull(LLAVA).status == "success"
            assert client.pull(LLAMA).status == "success"
            yield url


@pytest.fixture(scope="module")
def client(server: str) -> ollama.Client:
    return ollama.Client(host=server)


@pytest.fixture(scope="module")
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _chat_count(client: ollama.Client, images: list[bytes | str | Path], text: str = "what is this?") -> int:
    reply = client.chat(LLAVA, messages=[{"role": "user", "content": text, "images": images}], options=GREEDY)
    assert reply.done and reply.eval_count >= 1
    return reply.prompt_eval_count


def test_show_lists_vision_only_for_the_vision_model(client: ollama.Client) -> None:
    assert "vision" in client.show(LLAVA).capabilities
    assert "vision" not in client.show(LLAMA).capabilities


def test_ollama_chat_counts_the_tokens_of_each_image(client: ollama.Client, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(png())
    none = _chat_count(client, [])
    one = _chat_count(client, [path])  # the client reads the file and sends it as base64
    two = _chat_count(client, [path, png((0, 0, 255), fmt="JPEG")])  # a path and raw bytes
    assert one - none == TOKENS_PER_IMAGE
    assert two - none == 2 * TOKENS_PER_IMAGE


def test_ollama_chat_with_images_in_several_messages_streams(client: ollama.Client) -> None:
    messages = [
        {"role": "user", "content": "first", "images": [png()]},
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": "and these?", "images": [png((0, 255, 0)), png((0, 0, 255), fmt="WEBP")]},
    ]
    chunks = list(client.chat(LLAVA, messages=messages, stream=True, options=GREEDY))
    assert chunks[-1].done and chunks[-1].eval_count >= 1
    text_only = client.chat(LLAVA, messages=[{**m, "images": None} for m in messages], options=GREEDY)
    assert chunks[-1].prompt_eval_count - text_only.prompt_eval_count == 3 * TOKENS_PER_IMAGE


def test_ollama_generate_takes_images(client: ollama.Client) -> None:
    plain = client.generate(LLAVA, prompt="describe", options=GREEDY)
    seen = client.generate(LLAVA, prompt="describe", images=[png(), png((9, 9, 9), fmt="GIF")], options=GREEDY)
    assert seen.done and seen.prompt_eval_count - plain.prompt_eval_count == 2 * TOKENS_PER_IMAGE


def test_same_image_same_answer_other_image_other_input(client: ollama.Client) -> None:
    """The pixels reach the model: the same image gives the same greedy answer; the prompt differs
    only in pixels, so a differing answer for another image can only come from the image."""
    options = {"temperature": 0, "num_predict": 8, "ignore_eos": True}
    answers = [
        client.generate(LLAVA, prompt="x", images=[png(color)], options=options).response
        for color in [(255, 0, 0), (255, 0, 0), (0, 0, 0), (255, 255, 255)]
    ]
    assert answers[0] == answers[1]
    assert len(set(answers[1:])) > 1


def test_answer_matches_transformers_generate_on_the_same_images(oai: openai.OpenAI, tiny_llava_dir: Path) -> None:
    """Greedy decoding through the server (template, processor, pixel inputs in the prefill, the
    batching scheduler's decode steps over its slot cache) gives the tokens transformers' own
    `generate` gives, with the same log-probabilities (the random model's greedy text soon repeats
    itself, so the tokens alone would miss a decode step that sees a slightly wrong cache)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    images = [png((250, 120, 0)), png((0, 90, 200), size=(30, 60), fmt="JPEG")]
    content = [
        {"type": "text", "text": "compare the two"},
        *({"type": "image_url", "image_url": {"url": data_url(i)}} for i in images),
    ]
    reply = oai.chat.completions.create(
        model=LLAVA, messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0, logprobs=True
    )

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    parts = [{"type": "text", "text": "compare the two"}, {"type": "image"}, {"type": "image"}]
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(
        text=text,
        images=[Image.open(io.BytesIO(i)).convert("RGB") for i in images],
        add_special_tokens=False,
        return_tensors="pt",
    )
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens, strict=True)]
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert reply.choices[0].message.content == expected
    served = [entry.logprob for entry in reply.choices[0].logprobs.content]
    assert len(served) == len(logprobs) and served == pytest.approx(logprobs, abs=1e-4)


def test_image_requests_decoding_beside_others_get_what_they_get_alone(client: ollama.Client, server: str) -> None:
    """Image prompts prefill alone with their pixels, then join the running batch (the scheduler's
    shared slot cache, runners/batching.py) beside a text stream and each other: batching changes
    none of the outputs, greedy or seeded."""
    options = {"temperature": 0, "num_predict": 24, "ignore_eos": True}
    stream = {"prompt": "tell me more", "options": {**options, "num_predict": 300}}
    specs = [
        stream,
        {"prompt": "x", "images": [png((255, 0, 0))], "options": options},
        {"prompt": "what is it", "images": [png((0, 0, 255)), png((9, 9, 9))], "options": options},
        {
            "prompt": "and now",
            "images": [png((0, 200, 0))],
            "options": {"temperature": 1.0, "seed": 5, "num_predict": 24},
        },
    ]

    def ask(spec: dict) -> str:
        return client.generate(LLAVA, **spec).response

    def running() -> int:
        return sum(m["running_requests"] for m in httpx.get(f"{server}/status", timeout=60).json()["loaded_models"])

    alone = [ask(spec) for spec in specs]
    with ThreadPoolExecutor(len(specs)) as pool:
        first = pool.submit(ask, stream)
        deadline = time.monotonic() + 60
        while running() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        rest = list(pool.map(ask, specs[1:]))
        together = [first.result(), *rest]
    assert together == alone


def test_ollama_fits_a_long_chat_by_dropping_old_messages_with_their_images(client: ollama.Client) -> None:
    last = {"role": "user", "content": "and now?", "images": [png((0, 0, 255))]}
    history = [
        {"role": "user", "content": "look at these", "images": [png(), png((0, 255, 0)), png((1, 1, 1))]},
        {"role": "assistant", "content": "three squares"},
        last,
    ]
    options = {**GREEDY, "num_ctx": 60}
    full = client.chat(LLAVA, messages=history, options={**GREEDY})
    fitted = client.chat(LLAVA, messages=history, options=options)
    kept = client.chat(LLAVA, messages=history[1:], options=options)  # the fewest dropped that fit
    assert full.prompt_eval_count > 60 and fitted.prompt_eval_count == kept.prompt_eval_count < 60


def test_langchain_chat_ollama_with_an_image_message(server: str) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model=LLAVA, base_url=server, temperature=0, num_predict=3)
    image = {"type": "image_url", "image_url": data_url(png())}
    text = {"type": "text", "text": "what is it?"}
    seen = chat.invoke([HumanMessage(content=[text, image])])
    plain = chat.invoke([HumanMessage(content=[text])])
    assert seen.usage_metadata["input_tokens"] - plain.usage_metadata["input_tokens"] == TOKENS_PER_IMAGE


def test_openai_data_urls_in_content_parts(oai: openai.OpenAI) -> None:
    def usage(*urls: str) -> int:
        content = [
            {"type": "text", "text": "compare"},
            *({"type": "image_url", "image_url": {"url": url}} for url in urls),
        ]
        reply = oai.chat.completions.create(
            model=LLAVA, messages=[{"role": "user", "content": content}], max_tokens=3, temperature=0
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        return reply.usage.prompt_tokens

    base = usage()
    assert usage(data_url(png())) - base == TOKENS_PER_IMAGE
    assert usage(data_url(png()), data_url(png((1, 2, 3), fmt="JPEG"), "image/jpeg")) - base == 2 * TOKENS_PER_IMAGE


def test_openai_streams_with_images_in_two_messages(oai: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(png()), "detail": "low"}}
    messages = [
        {"role": "user", "content": [image, {"type": "text", "text": "one"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "two"}, image]},
    ]
    stream = oai.chat.completions.create(
        model=LLAVA, messages=messages, max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 2 * TOKENS_PER_IMAGE


def test_openai_remote_urls_only_from_the_allow_list(oai: openai.OpenAI, image_host: str) -> None:
    def ask(url: str) -> openai.types.chat.ChatCompletion:
        return oai.chat.completions.create(
            model=LLAVA,
            max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        )

    assert ask(f"{image_host}/cat.png").usage.prompt_tokens > TOKENS_PER_IMAGE
    for refused in [
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/cat.png",
        f"{image_host}.evil.example/cat.png",
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(refused)
        assert caught.value.param == "messages[0].content[0]"
        assert "IMAGE_URL_ALLOWLIST" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        ask(f"{image_host}/missing.png")


def test_native_chat_takes_images(server: str) -> None:
    body = {
        "model": LLAVA,
        "max_tokens": 3,
        "temperature": 0,
        "messages": [{"role": "user", "content": "look", "images": [base64.b64encode(png()).decode()]}],
    }
    seen = httpx.post(f"{server}/chat", json=body, timeout=60).json()
    plain = httpx.post(
        f"{server}/chat", json={**body, "messages": [{"role": "user", "content": "look"}]}, timeout=60
    ).json()
    assert seen["done"] and seen["prompt_eval_count"] - plain["prompt_eval_count"] == TOKENS_PER_IMAGE
    with httpx.stream("POST", f"{server}/chat", json={**body, "stream": True}, timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1]["done"] and events[-1]["prompt_eval_count"] == seen["prompt_eval_count"]


def test_vision_model_runs_on_transformers_and_says_why(client: ollama.Client, server: str) -> None:
    client.generate(LLAVA, prompt="hi", options=GREEDY)
    [entry] = [m for m in httpx.get(f"{server}/models").json()["models"] if m["model"].split(":")[0] == LLAVA]
    assert entry["backend"] == "transformers" and "vision model" in entry["backend_reason"]
    llava_config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": {"hidden_size": 32},
        "text_config": {"hidden_size": 64},
    }
    choice = choose_backend("auto", device="cpu", config=llava_config, precision=Precision("fp32", "test"))
    assert choice.name == "transformers" and VISION_OBSTACLE in choice.reason


def test_text_only_model_says_it_cannot_see(client: ollama.Client, oai: openai.OpenAI) -> None:
    with pytest.raises(ollama.ResponseError, match="cannot see images") as caught:
        client.chat(LLAMA, messages=[{"role": "user", "content": "hi", "images": [png()]}])
    assert caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="cannot see images"):
        oai.chat.completions.create(
            model=LLAMA,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}]}],
        )


def _truncated() -> bytes:
    data = png(size=(64, 64))
    return data[: len(data) // 2]


def _tiff() -> bytes:
    return png(fmt="TIFF")


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (b"this is plain text, not a picture", "not an image"),
        (_truncated(), "could not be decoded"),
        (bomb_png(), "pixel"),
        (png(size=(1200, 1000)), "MAX_IMAGE_PIXELS"),  # 1.2 MP, over this server's 1 MP setting
        (_tiff(), "unsupported image format TIFF"),
    ],
    ids=["not-an-image", "truncated", "bomb", "too-many-pixels", "tiff"],
)
def test_bad_images_are_400s_naming_message_and_part(server: str, image: bytes, reason: str) -> None:
    encoded = base64.b64encode(image).decode()
    ollama_body = {
        "model": LLAVA,
        "stream": False,
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c", "images": [base64.b64encode(png()).decode(), encoded]},
        ],
    }
    answer = httpx.post(f"{server}/api/chat", json=ollama_body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert "messages[2].images[1]" in answer.json()["error"] and reason in answer.json()["error"]

    openai_body = {
        "model": LLAVA,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "x"},
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                ],
            }
        ],
    }
    answer = httpx.post(f"{server}/v1/chat/completions", json=openai_body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages[0].content[1]" and reason in error["message"]


def test_malformed_image_fields_and_limits_are_400s(server: str) -> None:
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server}{path}", json={"model": LLAVA, "stream": False, **body}, timeout=60)

    not_base64 = post("/api/generate", {"prompt": "x", "images": ["%%% not base64 %%%"]})
    assert not_base64.status_code == 400 and "images[0]" in not_base64.json()["error"]
    too_many = post("/api/generate", {"prompt": "x", "images": [base64.b64encode(png()).decode()] * 5})
    assert too_many.status_code == 400 and "MAX_IMAGES_PER_REQUEST" in too_many.json()["error"]
    raw = post("/api/generate", {"prompt": "x", "raw": True, "images": [base64.b64encode(png()).decode()]})
    assert raw.status_code == 400
    for url in ["data:image/png,notbase64", "ftp://host/cat.png", "cat.png"]:
        answer = post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]},
        )
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", url
    unknown = post("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})
    assert unknown.status_code == 400
