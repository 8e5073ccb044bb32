"""The `generated` form of `dopd hints`: the check that the served model is there, the generation and check
prompts, and `generate_hints`, which keeps only the hints that pass the rule and the check. The client itself
(`ChatClient`) is `dopd.chat_client`, shared with the served teacher."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..chat_client import ChatClient, ServerError
from ..config import ConfigError
from .rules import _numbered, contains_answer, states_computed_value


def check_reachable(client: ChatClient) -> None:
    """Stop with one clear message when the server cannot be reached, refuses the key or does not serve
    `client.model`; a server without a `/models` listing is accepted. The requests count in `client.stats`."""
    # One quick try; `replace` hands the copy the same stats dict, so its requests and retries are counted.
    quick = dataclasses.replace(client, timeout=min(client.timeout, 10.0), retries=1, retry_wait=0.2)
    try:
        listing = quick.request("/models")
    except ServerError as error:
        if error.status in (401, 403):
            raise ConfigError(
                f"the server at {client.base_url} refused the API key ({error}); set --api-key or OPENAI_API_KEY"
            ) from None
        if error.status in (404, 405):
            return
        raise ConfigError(
            f"cannot reach the server at {client.base_url} ({error}); start it (e.g. `vllm serve "
            f"{client.model}`) or set --base-url / OPENAI_BASE_URL"
        ) from None
    served = [item.get("id") for item in listing.get("data", []) if isinstance(item, dict)]
    if served and client.model not in served:
        raise ConfigError(f"--model {client.model} is not served at {client.base_url}; it serves: {', '.join(served)}")


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
