"""The `generated` form of `dopd hints`: a client of a served model over the OpenAI-compatible chat API, the
generation and check prompts, and `generate_hints`, which keeps only the hints that pass the rule and the check."""

from __future__ import annotations

import json
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from ..config import ConfigError
from .rules import _THINK, _numbered, contains_answer, states_computed_value

# ------------------------------------------------------------------------------------- served model client


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
        return _THINK.sub("", text).strip(), choice.get("finish_reason") == "length"

    def check_reachable(self) -> None:
        """Stop with one clear message when the server cannot be reached, refuses the key or does not serve
        `model`; a server without a `/models` listing is accepted."""
        quick = ChatClient(
            self.base_url, self.model, self.api_key, timeout=min(self.timeout, 10.0), retries=1, retry_wait=0.2
        )
        try:
            listing = quick.request("/models")
        except ServerError as error:
            self._count(requests=quick.stats["requests"], retries=quick.stats["retries"])
            if error.status in (401, 403):
                raise ConfigError(
                    f"the server at {self.base_url} refused the API key ({error}); set --api-key or OPENAI_API_KEY"
                ) from None
            if error.status in (404, 405):
                return
            raise ConfigError(
                f"cannot reach the server at {self.base_url} ({error}); start it (e.g. `vllm serve "
                f"{self.model}`) or set --base-url / OPENAI_BASE_URL"
            ) from None
        self._count(requests=quick.stats["requests"], retries=quick.stats["retries"])
        served = [item.get("id") for item in listing.get("data", []) if isinstance(item, dict)]
        if served and self.model not in served:
            raise ConfigError(f"--model {self.model} is not served at {self.base_url}; it serves: {', '.join(served)}")


def normalize_base_url(url: str) -> str:
    """`http://host:8000/v1` from what a user may paste (a trailing slash or `/chat/completions`)."""
    url = url.strip().rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


GENERATION_SYSTEM = (
    "You write hints for a student who must solve a problem alone. A hint names what to do in one step of a "
    "solution, not its result: never a computed value, an intermediate result or the final answer."
)
VERIFY_SYSTEM = "You check hints written for a student. Reply only with the verdict lines asked for."


def generation_messages(question: str, solution: str | None, answer: str, max_hints: int) -> list[dict]:
    reference = f"Reference solution (for you only):\n{solution}\n\n" if solution else ""
    return [
        {"role": "system", "content": GENERATION_SYSTEM},
        {
            "role": "user",
            "content": (
                f"Problem:\n{question}\n\n{reference}Final answer (for you only; never write it): {answer}\n\n"
                f"Write step-wise hints without execution: the plan of the solution, one step per hint, saying what to "
                f"compute or reason about but not the result. Numbers stated in the problem may appear; no number you "
                f'computed may. Write at most {max_hints} hints, one per line, numbered "1.", "2.", ..., and '
                f"nothing else."
            ),
        },
    ]


def verification_messages(question: str, answer: str, hints: list[str]) -> list[dict]:
    listed = "\n".join(f"{i}. {hint}" for i, hint in enumerate(hints, start=1))
    return [
        {"role": "system", "content": VERIFY_SYSTEM},
        {
            "role": "user",
            "content": (
                f"Problem:\n{question}\n\nFinal answer: {answer}\n\nHints:\n{listed}\n\n"
                "For each hint, decide whether it reveals the final answer, or a value that must be computed (one the "
                "problem does not state), or is wrong for this problem. Reply with one line per hint, exactly "
                '"<number>: PASS" or "<number>: FAIL <short reason>", and nothing else.'
            ),
        },
    ]


_LIST_MARK = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s*")
_VERDICT = re.compile(r"^\s*(?:hint\s*)?(\d+)\s*[:.)\-]\s*(PASS|FAIL)\b[\s:,-]*(.*)$", re.IGNORECASE)


def parse_hint_lines(text: str) -> list[str]:
    """One hint per non-empty line, list markers (`1.`, `2)`, `-`) removed."""
    return [_LIST_MARK.sub("", line).strip() for line in text.splitlines() if _LIST_MARK.sub("", line).strip()]


def parse_verdicts(text: str, count: int) -> list[tuple[bool, str]]:
    """(passed, reason) for hints 1..count from `k: PASS` / `k: FAIL reason` lines; a hint without a verdict
    fails ("no verdict"), so that an unreadable check never lets a hint through."""
    verdicts: dict[int, tuple[bool, str]] = {}
    for line in text.splitlines():
        match = _VERDICT.match(line)
        if match and 1 <= int(match.group(1)) <= count and int(match.group(1)) not in verdicts:
            passed = match.group(2).upper() == "PASS"
            verdicts[int(match.group(1))] = (passed, "" if passed else (match.group(3).strip() or "failed the check"))
    return [verdicts.get(i, (False, "no verdict in the check reply")) for i in range(1, count + 1)]


@dataclass
class HintResult:
    """One row's privileged context, how many hints it kept and the rejected ones as (hint, reason)."""

    context: str
    kept: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)


def generate_hints(
    client: ChatClient, question: str, solution: str | None, answer: str, max_hints: int = 8, verify: bool = True
) -> HintResult:
    """Ask for hints, drop a last hint cut by `max_tokens`, reject by rule the hints that contain the answer or
    state a computed value, then (with `verify`) ask again about the rest and drop those that fail."""
    text, cut = client.chat(generation_messages(question, solution, answer, max_hints))
    hints = parse_hint_lines(text)
    rejected = []
    if cut and hints:
        rejected.append((hints.pop(), "cut off by max_tokens"))
    if len(hints) > max_hints:
        rejected += [(hint, f"beyond the first {max_hints} hints") for hint in hints[max_hints:]]
        hints = hints[:max_hints]
    kept = []
    for hint in hints:
        if contains_answer(hint, answer):
            rejected.append((hint, "contains the answer"))
        elif states_computed_value(hint, question):
            rejected.append((hint, "states a computed value"))
        else:
            kept.append(hint)
    if verify and kept:
        reply, _ = client.chat(verification_messages(question, answer, kept))
        verdicts = parse_verdicts(reply, len(kept))
        rejected += [(hint, f"check request: {reason}") for hint, (ok, reason) in zip(kept, verdicts) if not ok]
        kept = [hint for hint, (ok, _) in zip(kept, verdicts) if ok]
    return HintResult(_numbered(kept), len(kept), rejected)
