"""The HTTP client the commands share: where the server is, the API key, and errors as sentences."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

DEFAULT_HOST = "http://localhost:8005"
DEFAULT_PORT = 8005
# Loading a model on the first request can take a while; reading a stream waits for each token.
TIMEOUT = httpx.Timeout(10.0, read=600.0)


class CliError(Exception):
    """A failure to tell the user in one sentence; the command exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def normalize_host(raw: str | None) -> str:
    """`AI_SERVER_HOST`/`OLLAMA_HOST` read as Ollama reads OLLAMA_HOST: `host`, `host:port`, `:port` or a
    URL. Without a scheme the port defaults to 8005; with one, to the scheme's own (80, 443)."""
    text = (raw or "").strip().rstrip("/")
    if not text:
        return DEFAULT_HOST
    explicit_scheme = "://" in text
    parts = urlsplit(text if explicit_scheme else f"http://{text}")
    host = parts.hostname or "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = parts.port or (None if explicit_scheme else DEFAULT_PORT)
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def not_pulled(model: str) -> str:
    return f"model '{model}' is not pulled. Pull it first with: ai-server pull {model}"


class Server:
    """A running ai-server, reached over HTTP."""

    def __init__(self, host: str | None, api_key: str | None) -> None:
        self.url = normalize_host(host)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)

    def close(self) -> None:
        self.http.close()

    # -- requests ------------------------------------------------------------------------------------
    def get(self, path: str, model: str | None = None) -> Any:
        return self._json(self._send("GET", path), model)

    def post(self, path: str, body: dict[str, Any], model: str | None = None) -> Any:
        return self._json(self._send("POST", path, json=body), model)

    def delete(self, path: str, body: dict[str, Any], model: str | None = None) -> None:
        self._json(self._send("DELETE", path, json=body), model)

    @contextmanager
    def stream_lines(self, path: str, body: dict[str, Any], model: str | None = None) -> Iterator[Iterator[dict]]:
        """POST and yield the NDJSON answer line by line; an in-band `{"error"}` line raises CliError."""
        with self._connect(), self.http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response, model)
            yield self._ndjson(response)

    @staticmethod
    def _ndjson(response: httpx.Response) -> Iterator[dict]:
        with _connection_errors_as_sentences(response.request.url):
            for line in response.iter_lines():
                if not line.strip():
                    continue
                payload = json.loads(line)
                if "error" in payload:
                    raise CliError(f"the server stopped the answer: {payload['error']}")
                yield payload

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._connect():
            return self.http.request(method, path, **kwargs)

    @contextmanager
    def _connect(self) -> Iterator[None]:
        with _connection_errors_as_sentences(self.url):
            yield

    def _json(self, response: httpx.Response, model: str | None) -> Any:
        if response.status_code < 400:
            return response.json() if response.content else None
        try:
            detail = response.json().get("error")
        except (ValueError, AttributeError):
            detail = None
        detail = detail if isinstance(detail, str) else response.text.strip() or response.reason_phrase
        if response.status_code == 401:
            raise CliError(f"the server needs an API key: pass --api-key KEY or set AI_SERVER_API_KEY ({detail})")
        if response.status_code == 404 and model is not None and "model" in detail:
            raise CliError(not_pulled(model))
        raise CliError(f"{detail} (HTTP {response.status_code})")


@contextmanager
def _connection_errors_as_sentences(url: object) -> Iterator[None]:
    try:
        yield
    except httpx.ConnectError:
        raise CliError(
            f"could not connect to ai-server at {url}. Is it running? Start it with `ai-server serve` "
            "(or `make serve`), or point AI_SERVER_HOST at the server."
        ) from None
    except httpx.TimeoutException:
        raise CliError(f"ai-server at {url} did not answer in time.") from None
    except httpx.RemoteProtocolError as exc:
        raise CliError(f"the connection to ai-server at {url} broke off: {exc}") from None
