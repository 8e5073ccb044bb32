"""Building the privileged input `p` from a data set of questions with reference solutions (spec, "Privileged
input"): the paper finds step-wise hints without execution help most and a bare final answer hurts.

`dopd hints` reads a data set (question, solution, answer columns), adds a `privileged_context` column in one
form and writes the data set back. Rule-based forms need no model: `answer`, `solution`, `stepwise` (the plan of
the worked solution with its computed values and final answer hidden), `stepwise-executed` (the steps with their
values, final answer removed), `summary` (the stepwise hints shortened to one line) and `boxes` (box annotations
in the Qwen-VL grounding format, for VLMs). The `generated` form asks a served model over the OpenAI-compatible
chat API for hints without execution, then checks every hint twice (a rule and a second request) and drops the
ones that fail. Its results are appended to a `.partial` file row by row, so that a crash loses no paid request
and a rerun continues where the last one stopped; the output itself is written once, complete, by a rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from .config import ConfigError, DataConfig

RULE_FORMS = ("answer", "solution", "stepwise", "stepwise-executed", "summary", "boxes")
FORMS = RULE_FORMS + ("generated",)
COORDINATE_SYSTEMS = ("pixel", "norm1000", "norm1")
# A label before the hints, so that a model reading "{prompt}\n\n{privileged_context}" can tell them apart
# from the problem. `--prefix ''` leaves the bare text.
DEFAULT_PREFIXES = {
    "answer": "Reference answer: ",
    "solution": "Reference solution:\n",
    "stepwise": "Hints (the plan of a solution; [r1], [r2], ... stand for values you compute):\n",
    "stepwise-executed": "Hints (the steps of a solution):\n",
    "summary": "Outline of a solution: ",
    "generated": "Hints:\n",
    "boxes": "Relevant objects in the image (bounding boxes x1, y1, x2, y2):\n",
}

# --------------------------------------------------------------------------------------------- text rules

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_TOKEN = re.compile(rf"(?<![\w.]){_NUM}(?![\w]|\.\d)")
# "= 24" whose 24 is not the start of a longer expression ("= 24 - 5" is not a result, "= 19" after it is).
_RESULT = re.compile(
    rf"(?<![<>!=:])=(?!=)\s*(?:\\\$|\$)?\s*-?(?P<num>{_NUM})(?![\w]|\.\d)"
    r"(?!\s*(?:[-+*/×÷^]|\\times|\\cdot|\\div))"
)
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_LINE = re.compile(r"^\s*####\s*(?P<answer>.*?)\s*$", re.MULTILINE)
_ANSWER_PHRASE = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\\$])")
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


def strip_calculator_annotations(text: str) -> str:
    """GSM8K's calculator annotations `<<48/2=24>>` removed (the text beside them already shows the step)."""
    return _CALCULATOR.sub("", text)


def boxed_contents(text: str) -> list[str]:
    r"""The contents of every `\boxed{...}` (nested braces allowed), in order."""
    found, start = [], text.find("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for i in range(start + len("\\boxed"), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
        found.append(text[start + len("\\boxed{") : i])
        start = text.find("\\boxed{", i)
    return found


def final_answer_in(solution: str) -> str | None:
    r"""The final answer a solution states: its `#### X` line, else its last `\boxed{X}`, else None."""
    lines = _FINAL_LINE.findall(solution)
    if lines:
        return lines[-1]
    boxed = boxed_contents(solution)
    return boxed[-1] if boxed else None


def _states_final_answer(step: str) -> bool:
    return "\\boxed" in step or bool(_ANSWER_PHRASE.search(step)) or step.lstrip().startswith("####")


def split_steps(solution: str) -> list[str]:
    """The solution's steps: its non-empty lines, each split further into sentences (a period, `!` or `?`
    followed by a space and a capital, `(`, `$` or a backslash). Calculator annotations are removed first."""
    steps = []
    for line in strip_calculator_annotations(solution).splitlines():
        steps += [part.strip() for part in _SENTENCE_END.split(line.strip()) if part.strip()]
    return steps


def plan_steps(solution: str) -> list[str]:
    """The steps without those that state the final answer (a `####` line, a `\\boxed{}`, "the answer is")."""
    return [step for step in split_steps(solution) if not _states_final_answer(step)]


def _value(token: str) -> Decimal | None:
    try:
        return Decimal(token.replace(",", "")).normalize()
    except InvalidOperation:
        return None


def numeric_value(text: str | None) -> Decimal | None:
    """The number `text` is, once `$`, `\\boxed{}`, thousands separators and a trailing period are removed."""
    if text is None:
        return None
    inner = boxed_contents(text)
    cleaned = (inner[-1] if inner else str(text)).strip().strip("$").strip().rstrip(".").lstrip("\\$")
    return _value(cleaned) if re.fullmatch(rf"-?{_NUM}", cleaned) else None


def _numbers(text: str) -> set[Decimal]:
    return {v for v in (_value(m.group()) for m in _NUMBER_TOKEN.finditer(text)) if v is not None}


def hide_computed_values(steps: list[str], question: str = "", answer: str | None = None) -> list[str]:
    """The steps with every computed value replaced by a placeholder `[rK]` (K-th distinct value, in order).

    A number is a computed value where it is the result of an `=`: the number right after `=`, `= $` or `=-`
    that is not followed by an operator (`48/2 = 24 clips`: 24; `3 + 4 = 7`: 7; `x = 3 + 4`: none), unless the
    question states that number (`x + 3 = 7` restating the problem: 7 is given, not computed). Once a value has
    appeared as a result, its later occurrences get the same placeholder. The numeric reference answer is treated as a result from the
    start, so `She sold 72 clips.` hides 72 too. A non-numeric answer (e.g. `\\frac{1}{2}`) is replaced by
    `[answer]` where it appears verbatim. Other numbers (operands, constants such as the 2 of "half") stay.
    """
    given = _numbers(question)
    ids: dict[Decimal, str] = {}
    answer_value = numeric_value(answer)
    known = {answer_value} - given if answer_value is not None else set()
    text_answer = None if answer_value is not None or not answer or not answer.strip() else answer.strip()

    def placeholder(value: Decimal) -> str:
        return ids.setdefault(value, f"[r{len(ids) + 1}]")

    hidden = []
    for step in steps:
        results = {m.start("num") for m in _RESULT.finditer(step)}

        def replace(match: re.Match) -> str:
            value = _value(match.group())
            if match.start() in results and value not in given:
                known.add(value)
                return placeholder(value)
            return placeholder(value) if value in known and value not in given else match.group()

        step = _NUMBER_TOKEN.sub(replace, step)
        if text_answer and len(text_answer) > 1 and text_answer not in question:
            step = step.replace(text_answer, "[answer]")
        hidden.append(step)
    return hidden


def _numbered(steps: list[str]) -> str:
    return "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))


def stepwise_hints(solution: str, question: str = "", answer: str | None = None) -> str:
    """Step-wise hints without execution: `plan_steps`, then `hide_computed_values`, numbered one per line.

    The answer is the `answer` column's value, or else what the solution's `####` line or last `\\boxed{}`
    states. Example (GSM8K): "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\nNatalia sold 48+24 = <<48+24=72>>72
    clips altogether.\\n#### 72" becomes "1. Natalia sold 48/2 = [r1] clips in May.\\n2. Natalia sold 48+[r1] =
    [r2] clips altogether."
    """
    answer = answer if answer not in (None, "") else final_answer_in(solution)
    steps = [s for s in hide_computed_values(plan_steps(solution), question, answer) if re.search(r"\w", s)]
    return _numbered(steps)


def executed_hints(solution: str) -> str:
    """Step-wise hints with execution: the plan steps with their values, final-answer statements removed (the
    last step's value is often the answer itself: this form gives the student the execution)."""
    return _numbered([s for s in plan_steps(solution) if re.search(r"\w", s)])


def summary_hints(solution: str, question: str = "", answer: str | None = None, max_words: int = 10) -> str:
    """The stepwise hints on one line: each step cut to its first `max_words` words (`...` marks a cut),
    separated by `; `. The same values are hidden as in `stepwise_hints`."""
    answer = answer if answer not in (None, "") else final_answer_in(solution)
    steps = [s for s in hide_computed_values(plan_steps(solution), question, answer) if re.search(r"\w", s)]
    short = []
    for step in steps:
        words = step.split()
        short.append(" ".join(words[:max_words]) + (" ..." if len(words) > max_words else ""))
    return "; ".join(short)


def solution_hint(solution: str) -> str:
    """The full worked solution (final answer included), calculator annotations removed."""
    return strip_calculator_annotations(solution).strip()


def answer_hint(answer: str) -> str:
    return str(answer).strip()


def contains_answer(text: str, answer: str) -> bool:
    """Whether `text` states the reference answer: for a numeric answer, any number in `text` of the same value
    (`72`, `72.0`, `1,200` for 1200); otherwise the answer's text, ignoring case and runs of spaces, not inside a longer word."""
    value = numeric_value(answer)
    if value is not None:
        return value in _numbers(text)
    needle = re.sub(r"\s+", " ", str(answer)).strip().casefold()
    if not needle:
        return False
    haystack = re.sub(r"\s+", " ", text).casefold()
    return re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", haystack) is not None


def states_computed_value(text: str, question: str) -> bool:
    """Whether `text` executes a step: it has a result `= N` (as `hide_computed_values` reads it) whose N the
    question does not state."""
    given = _numbers(question)
    return any(_value(m.group("num")) not in given for m in _RESULT.finditer(text))


# ---------------------------------------------------------------------------------------------- box form


def image_size(image: Any) -> tuple[int, int] | None:
    """(width, height) of a PIL image, a `datasets` image dict ({"bytes", "path"}) or a path; None if absent."""
    if image is None:
        return None
    if hasattr(image, "size") and not isinstance(image, (dict, str)):
        return tuple(image.size)
    from PIL import Image

    if isinstance(image, dict):
        if image.get("bytes"):
            import io

            with Image.open(io.BytesIO(image["bytes"])) as opened:
                return opened.size
        image = image.get("path")
    if isinstance(image, str) and image:
        with Image.open(image) as opened:
            return opened.size
    return None


def _as_boxes(boxes: Any, labels: Any) -> list[tuple[list[float], str]]:
    """[(box, label)] from one box `[x1, y1, x2, y2]` or a list of boxes, with one label or a list of labels; or
    from a list of {"bbox"/"bbox_2d": box, "label": label} dicts."""
    if isinstance(boxes, dict):
        boxes = [boxes]
    if boxes and all(isinstance(item, dict) for item in boxes):
        pairs = [(item.get("bbox_2d", item.get("bbox")), item.get("label")) for item in boxes]
    else:
        if boxes and not isinstance(boxes[0], (list, tuple)):
            boxes = [boxes]
        labels = [labels] if isinstance(labels, str) or labels is None else list(labels)
        if len(labels) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels; give one label per box")
        pairs = list(zip(boxes, labels))
    for box, label in pairs:
        if box is None or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise ValueError(f"box {box!r} is not four numbers [x1, y1, x2, y2]")
        if not label or not str(label).strip():
            raise ValueError(f"box {list(box)} has an empty label")
    return [([float(v) for v in box], str(label).strip()) for box, label in pairs]


def _convert(box: list[float], size: tuple[int, int] | None, coords: str) -> list[float] | list[int]:
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise ValueError(f"box {box} needs 0 <= x1 < x2 and 0 <= y1 < y2 (pixel [x1, y1, x2, y2], not x, y, w, h)")
    if size is not None and (x2 > size[0] or y2 > size[1]):
        raise ValueError(f"box {box} reaches outside the {size[0]}x{size[1]} image")
    if coords == "pixel":
        return [round(v) for v in box]
    if size is None:
        raise ValueError(f"coordinates {coords} need the image size")
    scale, digits = (1000, 0) if coords == "norm1000" else (1, 3)
    values = [x1 / size[0], y1 / size[1], x2 / size[0], y2 / size[1]]
    return [int(round(v * scale)) if digits == 0 else round(v * scale, digits) for v in values]


def box_hint(boxes: Any, labels: Any = None, size: tuple[int, int] | None = None, coords: str = "pixel") -> str:
    """Boxes with labels in the Qwen-VL grounding format, one JSON list: `[{"bbox_2d": [x1, y1, x2, y2],
    "label": "cat"}]`. Input boxes are pixel `[x1, y1, x2, y2]`. `coords`: `pixel` (absolute pixels, as Qwen2.5-VL
    reads them), `norm1000` (integers in [0, 1000], as Qwen3-VL reads them), `norm1` (fractions in [0, 1], 3
    decimals). With `size` = (width, height), every box must lie inside the image."""
    if coords not in COORDINATE_SYSTEMS:
        raise ValueError(f"coordinates {coords!r} are unknown; use {', '.join(COORDINATE_SYSTEMS)}")
    items = [{"bbox_2d": _convert(box, size, coords), "label": label} for box, label in _as_boxes(boxes, labels)]
    if not items:
        raise ValueError("no boxes")
    return json.dumps(items, ensure_ascii=False)


# ------------------------------------------------------------------------------------- served model client


class ServerError(RuntimeError):
    """A request to the served model failed for good (after its retries, or a status that retrying cannot fix);
    `status` is the last HTTP status, None when no answer came."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


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
    stats: dict = field(default_factory=lambda: {"requests": 0, "retries": 0, "prompt_tokens": 0,
                                                 "completion_tokens": 0})

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
        last_error, last_status = "", None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base_url + path, data=data, headers=self._headers(),
                                             method="GET" if payload is None else "POST")
            self._count(requests=1, retries=int(attempt > 0))
            retry_after = None
            try:
                return self._open(request)
            except urllib.error.HTTPError as error:
                body = error.read().decode("utf-8", "replace")[:300]
                if error.code not in _RETRY_STATUS:
                    raise ServerError(f"{self.base_url + path} answered {error.code} {error.reason}: {body}",
                                      error.code) from None
                last_error, last_status = f"{error.code} {error.reason}: {body}", error.code
                retry_after = error.headers.get("Retry-After")
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError) as error:
                last_error, last_status = f"{type(error).__name__}: {getattr(error, 'reason', error)}", None
            if attempt < self.retries:
                self._wait(attempt, retry_after)
        raise ServerError(f"{self.base_url + path} failed {self.retries + 1} times; last: {last_error}", last_status)

    def chat(self, messages: list[dict]) -> tuple[str, bool]:
        """The reply's text (a `<think>` block removed) and whether it was cut by `max_tokens`."""
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        answer = self.request("/chat/completions", payload)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"unexpected answer from {self.base_url}/chat/completions: {str(answer)[:300]}") from None
        usage = answer.get("usage") or {}
        self._count(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0))
        return _THINK.sub("", text).strip(), choice.get("finish_reason") == "length"

    def check_reachable(self) -> None:
        """Stop with one clear message when the server cannot be reached, refuses the key or does not serve
        `model`; a server without a `/models` listing is accepted."""
        quick = ChatClient(self.base_url, self.model, self.api_key, timeout=min(self.timeout, 10.0), retries=1,
                           retry_wait=0.2)
        try:
            listing = quick.request("/models")
        except ServerError as error:
            self._count(requests=quick.stats["requests"], retries=quick.stats["retries"])
            if error.status in (401, 403):
                raise ConfigError(f"the server at {self.base_url} refused the API key ({error}); set --api-key or "
                                  "OPENAI_API_KEY") from None
            if error.status in (404, 405):
                return
            raise ConfigError(f"cannot reach the server at {self.base_url} ({error}); start it (e.g. `vllm serve "
                              f"{self.model}`) or set --base-url / OPENAI_BASE_URL") from None
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
        {"role": "user", "content": (
            f"Problem:\n{question}\n\n{reference}Final answer (for you only; never write it): {answer}\n\n"
            f"Write step-wise hints without execution: the plan of the solution, one step per hint, saying what to "
            f"compute or reason about but not the result. Numbers stated in the problem may appear; no number you "
            f"computed may. Write at most {max_hints} hints, one per line, numbered \"1.\", \"2.\", ..., and "
            f"nothing else."
        )},
    ]


def verification_messages(question: str, answer: str, hints: list[str]) -> list[dict]:
    listed = "\n".join(f"{i}. {hint}" for i, hint in enumerate(hints, start=1))
    return [
        {"role": "system", "content": VERIFY_SYSTEM},
        {"role": "user", "content": (
            f"Problem:\n{question}\n\nFinal answer: {answer}\n\nHints:\n{listed}\n\n"
            "For each hint, decide whether it reveals the final answer, or a value that must be computed (one the "
            "problem does not state), or is wrong for this problem. Reply with one line per hint, exactly "
            "\"<number>: PASS\" or \"<number>: FAIL <short reason>\", and nothing else."
        )},
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


def generate_hints(client: ChatClient, question: str, solution: str | None, answer: str, max_hints: int = 8,
                   verify: bool = True) -> HintResult:
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


# ------------------------------------------------------------------------------------------ data set pipeline


@dataclass
class HintsSpec:
    """Every setting of `dopd hints` (the command line's options, one field each)."""

    input: str
    out: str
    form: str
    split: str = "train"
    name: str | None = None
    max_rows: int | None = None
    question_column: str = "question"
    solution_column: str = "solution"
    answer_column: str = "answer"
    output_column: str = "privileged_context"
    prefix: str | None = None  # None: the form's DEFAULT_PREFIXES entry
    on_empty: str = "drop"  # drop | keep: rows whose privileged context comes out empty
    overwrite: bool = False
    summary_words: int = 10
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    retries: int = 5
    retry_wait: float = 1.0
    timeout: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 1024
    max_hints: int = 8
    verify: bool = True
    boxes_column: str = "boxes"
    labels_column: str = "labels"
    image_column: str = "image"
    width_column: str = "width"
    height_column: str = "height"
    coords: str = "pixel"
    progress: bool = True


@dataclass
class HintsSummary:
    form: str
    out: str
    rows_read: int
    rows_resumed: int
    rows_written: int
    rows_dropped: list[int]
    hints_kept: int
    rejections: dict[str, int]
    examples_rejected: list[tuple[int, str, str]]
    notes: list[str]
    stats: dict
    replaced_column: bool
    seconds: float


def resolve_server(spec: HintsSpec) -> None:
    """Fill the server settings of the generated form from the environment: `DOPD_HINTS_BASE_URL` or
    `OPENAI_BASE_URL`, `DOPD_HINTS_MODEL` or `OPENAI_MODEL`, `OPENAI_API_KEY`."""
    env = os.environ
    spec.base_url = spec.base_url or env.get("DOPD_HINTS_BASE_URL") or env.get("OPENAI_BASE_URL")
    spec.model = spec.model or env.get("DOPD_HINTS_MODEL") or env.get("OPENAI_MODEL")
    spec.api_key = spec.api_key or env.get("OPENAI_API_KEY")


def check_spec(spec: HintsSpec) -> None:
    """The settings alone (before the data set is read): one message naming the option and the fix."""
    if spec.form not in FORMS:
        raise ConfigError(f"--form {spec.form!r} is unknown; choose one of {', '.join(FORMS)}")
    if spec.on_empty not in ("drop", "keep"):
        raise ConfigError(f"--on-empty {spec.on_empty!r} is unknown; use drop or keep")
    if spec.coords not in COORDINATE_SYSTEMS:
        raise ConfigError(f"--coords {spec.coords!r} is unknown; use {', '.join(COORDINATE_SYSTEMS)}")
    for option, value in (("--summary-words", spec.summary_words), ("--concurrency", spec.concurrency),
                          ("--max-tokens", spec.max_tokens), ("--max-hints", spec.max_hints),
                          ("--timeout", spec.timeout)):
        if value <= 0:
            raise ConfigError(f"{option} = {value} must be positive")
    if spec.retries < 0 or spec.retry_wait < 0 or spec.temperature < 0:
        raise ConfigError("--retries, --retry-wait and --temperature must be >= 0")
    if spec.max_rows is not None and spec.max_rows <= 0:
        raise ConfigError(f"--max-rows = {spec.max_rows} must be positive")
    output_kind(spec.out)
    if os.path.exists(spec.out) and not spec.overwrite:
        raise ConfigError(f"--out {spec.out} already exists; choose another path or pass --overwrite")
    if spec.form == "generated":
        if not spec.base_url:
            raise ConfigError("--form generated needs the server: --base-url (or OPENAI_BASE_URL), e.g. "
                              "http://localhost:8000/v1 for `vllm serve`")
        if not spec.model:
            raise ConfigError("--form generated needs --model (or OPENAI_MODEL): the served model's name")
        if urllib.parse.urlparse(normalize_base_url(spec.base_url)).scheme not in ("http", "https"):
            raise ConfigError(f"--base-url {spec.base_url} must start with http:// or https://")


def check_local_path(path: str, option: str) -> None:
    """A path that names a file (a data extension) or starts with `.`, `/` or `~` must exist: otherwise `datasets`
    would take it for a hub name and spend half a minute retrying the network before failing."""
    looks_local = os.path.splitext(path)[1].lower() in (".jsonl", ".json", ".parquet", ".csv") or path.startswith(
        (".", "/", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"{option} {path} does not exist (a local file or directory, or a hub name such as org/name)")


def output_kind(out: str) -> str:
    """jsonl | parquet | disk (a `save_to_disk` directory: a path without an extension)."""
    extension = os.path.splitext(out.rstrip("/"))[1].lower()
    if extension in (".jsonl", ".json"):
        return "jsonl"
    if extension == ".parquet":
        return "parquet"
    if extension == "" or os.path.isdir(out):
        return "disk"
    raise ConfigError(f"--out {out} has extension {extension!r}; use .jsonl, .json, .parquet or a directory path")


def _needed_columns(spec: HintsSpec, columns: list[str], first_row: dict) -> list[tuple[str, str]]:
    """(option, column) pairs that must exist and be non-empty for the form."""
    need = {
        "answer": [("--answer-column", spec.answer_column)],
        "solution": [("--solution-column", spec.solution_column)],
        "stepwise": [("--solution-column", spec.solution_column)],
        "stepwise-executed": [("--solution-column", spec.solution_column)],
        "summary": [("--solution-column", spec.solution_column)],
        "generated": [("--question-column", spec.question_column), ("--answer-column", spec.answer_column)],
        "boxes": [("--boxes-column", spec.boxes_column)],
    }[spec.form]
    if spec.form == "boxes":
        boxes = first_row.get(spec.boxes_column)
        dicts = isinstance(boxes, dict) or (isinstance(boxes, list) and boxes and isinstance(boxes[0], dict))
        if not dicts:
            need.append(("--labels-column", spec.labels_column))
        if spec.coords != "pixel" and spec.image_column not in columns:
            need += [("--width-column", spec.width_column), ("--height-column", spec.height_column)]
    return need


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def check_columns(dataset, spec: HintsSpec) -> None:
    """Every column the form needs exists and no row leaves it empty."""
    if len(dataset) == 0:
        raise ConfigError(f"--input {spec.input} has no rows")
    for option, column in _needed_columns(spec, dataset.column_names, dataset[0]):
        if column not in dataset.column_names:
            size_help = (" (normalized --coords need the image size: an --image-column, or --width-column and "
                         "--height-column)" if option in ("--width-column", "--height-column") else "")
            raise ConfigError(f"{option} = {column!r} is not a column of {spec.input}; its columns are "
                              f"{', '.join(dataset.column_names)} (set {option}){size_help}")
        empty = [i for i, value in enumerate(dataset[column]) if _is_empty(value)]
        if empty:
            raise ConfigError(f"{len(empty)} of {len(dataset)} rows have an empty {column!r} ({option}), the first at "
                              f"row {empty[0]}; fill or drop them")


def _text(value: Any) -> str:
    """A question as text: a string, or the last user turn of chat messages."""
    if isinstance(value, list) and value and all(isinstance(message, dict) for message in value):
        content = ([m for m in value if m.get("role") == "user"] or value)[-1].get("content", "")
        if isinstance(content, list):
            return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return "" if value is None else str(value)


def row_builder(spec: HintsSpec, columns: list[str], client: ChatClient | None = None) -> Callable[[dict], HintResult]:
    """The function from a row to its `HintResult` for `spec.form`."""
    def get(row: dict, column: str) -> str:
        return _text(row.get(column)) if column in columns else ""

    def one(text: str) -> HintResult:
        return HintResult(text, int(bool(text.strip())))

    form = spec.form
    if form == "answer":
        return lambda row: one(answer_hint(get(row, spec.answer_column)))
    if form == "solution":
        return lambda row: one(solution_hint(get(row, spec.solution_column)))
    if form == "stepwise-executed":
        return lambda row: one(executed_hints(get(row, spec.solution_column)))
    if form == "stepwise":
        return lambda row: one(stepwise_hints(get(row, spec.solution_column), get(row, spec.question_column),
                                              get(row, spec.answer_column) or None))
    if form == "summary":
        return lambda row: one(summary_hints(get(row, spec.solution_column), get(row, spec.question_column),
                                             get(row, spec.answer_column) or None, spec.summary_words))
    if form == "boxes":
        return lambda row: one(box_hint(row.get(spec.boxes_column), row.get(spec.labels_column),
                                        _row_size(row, spec, columns), spec.coords))
    return lambda row: generate_hints(client, get(row, spec.question_column), get(row, spec.solution_column) or None,
                                      get(row, spec.answer_column), spec.max_hints, spec.verify)


def _row_size(row: dict, spec: HintsSpec, columns: list[str]) -> tuple[int, int] | None:
    if spec.image_column in columns and row.get(spec.image_column) is not None:
        return image_size(row[spec.image_column])
    if spec.width_column in columns and spec.height_column in columns:
        return int(row[spec.width_column]), int(row[spec.height_column])
    return None


def _with_prefix(result: HintResult, prefix: str) -> str:
    return prefix + result.context if result.context.strip() else ""


# ------------------------------------------------------------------------------------------ the partial file


class PartialLog:
    """`OUT.partial`: a header line with the run's settings, then one JSON line per finished row
    {"index", "context", "kept", "rejected"}, flushed as it comes. A rerun with the same settings and input reads
    the finished rows back; a torn last line (a kill in mid-write) is cut off."""

    def __init__(self, path: str, settings: dict):
        self.path, self.settings = path, settings
        self.done: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._handle = None

    def open(self) -> None:
        if os.path.exists(self.path):
            self._read()
        else:
            self.open_new()
        self._handle = open(self.path, "a", encoding="utf-8")

    def open_new(self) -> None:
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"dopd_hints_partial": 1, "settings": self.settings}) + "\n")

    def _read(self) -> None:
        with open(self.path, "rb") as handle:
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        lines = complete.decode("utf-8").splitlines()
        if not lines:  # killed before the header was written: nothing to keep
            os.remove(self.path)
            self.open_new()
            return
        try:
            header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        except json.JSONDecodeError as error:
            raise ConfigError(f"{self.path} is damaged ({error}); delete it to start over") from None
        if header.get("settings") != self.settings:
            raise ConfigError(
                f"{self.path} holds rows made with other settings or another input ({_difference(header, self.settings)}); "
                "rerun with the same options to continue it, or delete it to start over"
            )
        self.done = {record["index"]: record for record in records}

    def append(self, index: int, result: HintResult, context: str) -> None:
        record = {"index": index, "context": context, "kept": result.kept, "rejected": result.rejected}
        with self._lock:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._handle.flush()
            self.done[index] = record

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _difference(header: dict, settings: dict) -> str:
    old = header.get("settings") or {}
    keys = [key for key in settings if old.get(key) != settings.get(key)]
    return ", ".join(f"{key}: {old.get(key)!r} then, {settings.get(key)!r} now" for key in keys[:3]) or "no header"


def _settings(spec: HintsSpec, dataset) -> dict:
    """What the partial file must agree on with a rerun: the form's settings and a hash of the input rows."""
    keys = ["form", "question_column", "solution_column", "answer_column", "prefix", "model", "temperature",
            "max_tokens", "max_hints", "verify"]
    settings = {key: getattr(spec, key) for key in keys}
    settings["prefix"] = DEFAULT_PREFIXES[spec.form] if spec.prefix is None else spec.prefix
    used = [c for c in (spec.question_column, spec.solution_column, spec.answer_column) if c in dataset.column_names]
    digest = hashlib.sha256()
    for column in used:
        digest.update(json.dumps(dataset[column], default=str, ensure_ascii=False).encode("utf-8"))
    settings.update(rows=len(dataset), input_sha256=digest.hexdigest())
    return settings


# --------------------------------------------------------------------------------------------- the run


@contextlib.contextmanager
def datasets_progress(enabled: bool):
    """`datasets`' own progress bars (reading, converting) off while `enabled` is false, restored after."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if not enabled:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets_logging.enable_progress_bar()


def _progress(total: int, initial: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="row", dynamic_ncols=True)


def _rule_results(dataset, build: Callable[[dict], HintResult], progress) -> dict[int, HintResult]:
    """Every row at once in memory: a bad row stops the run before anything is written."""
    results = {}
    for index, row in enumerate(dataset):
        try:
            results[index] = build(row)
        except ValueError as error:
            raise ConfigError(f"row {index}: {error}") from None
        progress.update(1)
    return results


def _served_results(dataset, build, log: PartialLog, concurrency: int, prefix: str, progress) -> None:
    """Requests for the rows not yet in `log`, `concurrency` at a time, each appended to `log` when it returns.
    At most 2 x concurrency rows are queued. When a row fails for good, no new row starts, the rows in flight
    are finished and saved (they are paid for), then the error is raised."""
    pending = (i for i in range(len(dataset)) if i not in log.done)
    running: dict[Future, int] = {}
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        while True:
            while failure is None and len(running) < 2 * concurrency:
                index = next(pending, None)
                if index is None:
                    break
                running[pool.submit(build, dataset[index])] = index
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                index = running.pop(future)
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    error = future.exception()
                    if isinstance(error, ServerError):
                        error = ServerError(f"row {index}: {error}", error.status)
                    failure = failure or error
                    for queued in running:
                        queued.cancel()
                    continue
                log.append(index, future.result(), _with_prefix(future.result(), prefix))
                progress.update(1)
    except BaseException:  # Ctrl-C: keep the rows that have returned, leave the rest for the rerun
        for future, index in running.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                log.append(index, future.result(), _with_prefix(future.result(), prefix))
        raise
    finally:
        pool.shutdown(wait=failure is not None, cancel_futures=True)
    if failure is not None:
        raise failure


def run_hints(spec: HintsSpec) -> HintsSummary:
    """Read, check, build every row's privileged context and write the output (see the module docstring)."""
    with datasets_progress(spec.progress):
        return _run_hints(spec)


def _run_hints(spec: HintsSpec) -> HintsSummary:
    from .data import load_rows

    start = time.time()
    if spec.form == "generated":
        resolve_server(spec)
    check_spec(spec)
    check_local_path(spec.input, "--input")
    try:
        dataset = load_rows(DataConfig(path=spec.input, name=spec.name, split=spec.split, max_samples=spec.max_rows))
    except ConfigError as error:  # data.py names its config keys; here they are options
        raise ConfigError(str(error).replace("data.path", "--input").replace("data.split", "--split")) from None
    check_columns(dataset, spec)
    check_writable(dataset, spec)
    prefix = DEFAULT_PREFIXES[spec.form] if spec.prefix is None else spec.prefix
    notes = _notes(spec, dataset.column_names)
    client = None
    if spec.form == "generated":
        client = ChatClient(spec.base_url, spec.model, spec.api_key, spec.timeout, spec.retries, spec.retry_wait,
                            spec.temperature, spec.max_tokens)
        client.check_reachable()
    build = row_builder(spec, dataset.column_names, client)
    records, resumed = _build_all(spec, dataset, build, prefix)
    contexts = [records[i]["context"] for i in range(len(dataset))]
    dropped = [i for i, text in enumerate(contexts) if not text.strip()] if spec.on_empty == "drop" else []
    replaced = spec.output_column in dataset.column_names
    if replaced:
        dataset = dataset.remove_columns(spec.output_column)
    dataset = dataset.add_column(spec.output_column, contexts)
    if dropped:
        keep = sorted(set(range(len(dataset))) - set(dropped))
        dataset = dataset.select(keep)
    write_dataset(dataset, spec.out)
    if spec.form == "generated" and os.path.exists(spec.out + ".partial"):
        os.remove(spec.out + ".partial")
    return _summary(spec, records, resumed, dropped, len(dataset), notes, client, replaced, time.time() - start)


def _build_all(spec: HintsSpec, dataset, build, prefix: str) -> tuple[dict[int, dict], int]:
    """{index: record} for every row, and how many rows a previous run had already finished."""
    if spec.form != "generated":
        with _progress(len(dataset), 0, spec.progress, f"hints ({spec.form})") as progress:
            results = _rule_results(dataset, build, progress)
        return {i: {"context": _with_prefix(r, prefix), "kept": r.kept, "rejected": r.rejected}
                for i, r in results.items()}, 0
    log = PartialLog(spec.out + ".partial", _settings(spec, dataset))
    log.open()
    resumed = len(log.done)
    try:
        with _progress(len(dataset), resumed, spec.progress, "hints (generated)") as progress:
            _served_results(dataset, build, log, spec.concurrency, prefix, progress)
    except ServerError as error:
        raise ConfigError(f"{error}. {len(log.done)} of {len(dataset)} rows are done and saved in {log.path}; run "
                          "the same command again to continue") from None
    finally:
        log.close()
    return log.done, resumed


def check_writable(dataset, spec: HintsSpec) -> None:
    """Image columns cannot go to JSON lines; the output's directory must exist or be creatable."""
    kind = output_kind(spec.out)
    features = getattr(dataset, "features", {}) or {}
    images = [name for name, feature in features.items() if type(feature).__name__ == "Image"]
    if kind == "jsonl" and images:
        raise ConfigError(f"--out {spec.out}: the data set has image columns ({', '.join(images)}), which JSON lines "
                          "cannot hold; write .parquet or a directory (save_to_disk) instead")
    parent = os.path.dirname(os.path.abspath(spec.out.rstrip("/")))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {spec.out}: cannot create its directory ({error})") from None


def write_dataset(dataset, out: str) -> None:
    """Write to a temporary name beside `out`, then rename: `out` is either absent or complete."""
    kind = output_kind(out)
    out = out.rstrip("/")
    temporary = f"{out}.tmp-{os.getpid()}"
    try:
        if kind == "jsonl":
            with open(temporary, "w", encoding="utf-8") as handle:
                for row in dataset:
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        elif kind == "parquet":
            dataset.to_parquet(temporary)
        else:
            dataset.save_to_disk(temporary)
        if kind == "disk" and os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(temporary, out)
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.exists(temporary):
            os.remove(temporary)


def _notes(spec: HintsSpec, columns: list[str]) -> list[str]:
    notes = []
    if spec.form in ("stepwise", "summary"):
        if spec.question_column not in columns:
            notes.append(f"no {spec.question_column!r} column: numbers the question states could not be told apart "
                         "from computed ones (set --question-column)")
        if spec.answer_column not in columns:
            notes.append(f"no {spec.answer_column!r} column: the answer was taken from each solution's #### line or "
                         "\\boxed{} (set --answer-column)")
    if spec.form == "generated" and spec.solution_column not in columns:
        notes.append(f"no {spec.solution_column!r} column: the model wrote hints from the question and answer alone")
    return notes


def _summary(spec, records, resumed, dropped, written, notes, client, replaced, seconds) -> HintsSummary:
    rejections: dict[str, int] = {}
    examples = []
    for index in sorted(records):
        for hint, reason in records[index]["rejected"]:
            kind = reason.split(":")[0]
            rejections[kind] = rejections.get(kind, 0) + 1
            if len(examples) < 3:
                examples.append((index, hint, reason))
    return HintsSummary(
        form=spec.form, out=spec.out, rows_read=len(records), rows_resumed=resumed, rows_written=written,
        rows_dropped=dropped, hints_kept=sum(r["kept"] for r in records.values()), rejections=rejections,
        examples_rejected=examples, notes=notes, stats=dict(client.stats) if client else {}, replaced_column=replaced,
        seconds=seconds,
    )


def describe(summary: HintsSummary, output_column: str) -> list[str]:
    """The lines `dopd hints` prints."""
    kind = "served model" if summary.form == "generated" else "rule-based"
    rejected = sum(summary.rejections.values())
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary.rejections.items(), key=lambda kv: -kv[1]))
    lines = [
        f"form:      {summary.form} ({kind})",
        f"rows:      {summary.rows_read} read, {summary.rows_resumed} already done by an earlier run, "
        f"{summary.rows_written} written, {len(summary.rows_dropped)} dropped for an empty privileged context"
        + (f" (rows {', '.join(map(str, summary.rows_dropped[:10]))}{', ...' if len(summary.rows_dropped) > 10 else ''})"
           if summary.rows_dropped else ""),
        f"hints:     {summary.hints_kept} kept, {rejected} rejected" + (f" ({reasons})" if rejected else ""),
    ]
    for index, hint, reason in summary.examples_rejected:
        lines.append(f"           row {index}: {hint[:70]!r}: {reason}")
    if summary.stats:
        s = summary.stats
        lines.append(f"requests:  {s['requests']} ({s['retries']} retries), tokens {s['prompt_tokens']} prompt / "
                     f"{s['completion_tokens']} completion")
    lines.append(f"output:    {summary.out} (column {output_column}{', replaced' if summary.replaced_column else ''})")
    lines += [f"note:      {note}" for note in summary.notes]
    lines.append(f"wall time: {summary.seconds:.1f} s")
    return lines


__all__ = [
    "FORMS", "RULE_FORMS", "COORDINATE_SYSTEMS", "DEFAULT_PREFIXES", "ChatClient", "HintResult", "HintsSpec",
    "HintsSummary", "ServerError", "answer_hint", "box_hint", "contains_answer", "describe", "executed_hints",
    "final_answer_in", "generate_hints", "hide_computed_values", "parse_hint_lines", "parse_verdicts", "plan_steps",
    "run_hints", "solution_hint", "split_steps", "states_computed_value", "stepwise_hints", "summary_hints",
    "write_dataset",
]
