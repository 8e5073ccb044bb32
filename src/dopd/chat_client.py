"""A client of a model served over the OpenAI-compatible HTTP API (`vllm serve`, SGLang, most providers): JSON
requests with retries, used by `dopd hints --form generated` (chat completions) and by the served teacher
(`served_teacher.py`: log-probs from `/v1/completions`, `/tokenize`)."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from .answers import strip_thinking


class ServerError(RuntimeError):
    """A request to the served model failed for good (after its retries, or a status that retrying cannot fix);
    `status` is the last HTTP status, None when no answer came; `body` the last answer's text, if any."""

    def __init__(self, message: str, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status, self.body = status, body


_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class ChatClient:
    """A client of an OpenAI-compatible `/chat/completions` endpoint (`vllm serve`, SGLang, most providers),
    with retries (exponential backoff with jitter, `Retry-After` honoured) on connection errors, timeouts, 429
    and 5xx. Thread-safe: each call opens its own connection. Counts requests, retries and tokens."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 5
    retry_wait: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 1024
    stats: dict = field(
        default_factory=lambda: {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
    )

    def __post_init__(self):
        self.base_url = normalize_base_url(self.base_url)
        host = urllib.parse.urlparse(self.base_url).hostname or ""
        # A proxy from the environment must not catch a server on this machine.
        proxies = {} if host in ("127.0.0.1", "localhost", "::1") else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
        self._lock = threading.Lock()

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self.stats[key] += amount

    def _open(self, request: urllib.request.Request) -> dict:
        with self._opener.open(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        try:
            seconds = float(retry_after) if retry_after else None
        except ValueError:
            seconds = None
        if seconds is None:
            seconds = self.retry_wait * 2**attempt * (0.5 + random.random())
        time.sleep(min(seconds, 60.0))

    def request(self, path: str, payload: dict | None = None) -> dict:
        """POST `payload` (GET without one) to `base_url + path`; the decoded JSON answer."""
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        last_error, last_status, last_body = "", None, None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                self.base_url + path, data=data, headers=self._headers(), method="GET" if payload is None else "POST"
            )
            self._count(requests=1, retries=int(attempt > 0))
            retry_after = None
            try:
                return self._open(request)
            except urllib.error.HTTPError as error:
                last_body = error.read().decode("utf-8", "replace")
                body = last_body[:300]
                if error.code not in _RETRY_STATUS:
                    raise ServerError(
                        f"{self.base_url + path} answered {error.code} {error.reason}: {body}", error.code, last_body
                    ) from None
                last_error, last_status = f"{error.code} {error.reason}: {body}", error.code
                retry_after = error.headers.get("Retry-After")
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError) as error:
                last_error, last_status = f"{type(error).__name__}: {getattr(error, 'reason', error)}", None
                last_body = None
            if attempt < self.retries:
                self._wait(attempt, retry_after)
        raise ServerError(
            f"{self.base_url + path} failed {self.retries + 1} times; last: {last_error}", last_status, last_body
        )

    def chat(self, messages: list[dict]) -> tuple[str, bool]:
        """The reply's text (a `<think>` block removed) and whether it was cut by `max_tokens`."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        answer = self.request("/chat/completions", payload)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"unexpected answer from {self.base_url}/chat/completions: {str(answer)[:300]}") from None
        usage = answer.get("usage") or {}
        self._count(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        return strip_thinking(text), choice.get("finish_reason") == "length"


def normalize_base_url(url: str) -> str:
    """`http://host:8000/v1` from what a user may paste (a trailing slash or `/chat/completions`)."""
    url = url.strip().rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url
