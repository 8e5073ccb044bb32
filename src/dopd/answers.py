"""Checking answers and scoring samples for `dopd eval`: the final answer of a completion, three checkers (`math`:
equivalence by math-verify, `exact`: the normalized final answer, `lab:TASK`: a lab task's own checker), the
unbiased pass@k of Chen et al. (2021) and the gap recovery the paper reports (docs/hints-and-eval.md).
"""

from __future__ import annotations

import re
from typing import Any

from .config import ConfigError

CHECKERS = ("math", "exact", "lab:<task>")

# ------------------------------------------------------------------------------------------- answer checking

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The completion without a `<think>...</think>` block (Qwen3's thinking mode)."""
    return _THINK.sub("", text).strip()


def _boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i]
    return None


_ANSWER_MARK = re.compile(r"(?i)(?:final\s+)?answer\s*(?:is\s*:?|:)\s*")


def final_answer_text(completion: str) -> str:
    """What a completion gives as its final answer: the last `\\boxed{}`, else the text after the last "answer
    is" / "answer:" on its line, else the last non-empty line."""
    text = strip_thinking(completion)
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        rest = text[marks[-1].end() :].strip()
        return rest.splitlines()[0] if rest else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize_exact(text: str) -> str:
    """Case-folded, spaces collapsed, surrounding `$`, quotes and a trailing period removed."""
    text = re.sub(r"\s+", " ", str(text)).strip().strip("$").strip().strip("\"'").rstrip(".").strip()
    return text.casefold()


class ExactChecker:
    """Normalized string equality of the completion's final answer (`final_answer_text`) and the reference."""

    name = "exact"

    def prepare(self, answers: list[Any], prompts: list[Any], rows: list[dict]) -> None:
        self.golds = [normalize_exact(_boxed(str(a)) or str(a)) for a in answers]

    def score(self, index: int, completion: str) -> bool:
        return normalize_exact(final_answer_text(completion)) == self.golds[index]


_LATEX_COMMAND = re.compile(r"\\text\{[^{}]*\}|\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{4,}")


class MathChecker:
    """Mathematical equivalence by math-verify: the reference is parsed once (as written, else as LaTeX inside
    `$...$`), the completion's last `\\boxed{}` or last expression is parsed and compared with sympy, so `1/2`,
    `0.5`, `\\frac{1}{2}` and `50\\%`-style forms match their equals. A reference that math-verify cannot read
    stops the run before any model loads."""

    name = "math"

    def __init__(self):
        try:
            import math_verify
        except ImportError:
            raise ConfigError(
                "--checker math needs the math-verify package: pip install 'math-verify>=0.7' (or use --checker exact)"
            ) from None
        self._parse, self._verify = math_verify.parse, math_verify.verify

    def parse_reference(self, answer: Any) -> list:
        text = str(answer).strip()
        parsed = self._parse(text) if text else []
        if parsed or not text:
            return parsed
        if _WORD.search(_LATEX_COMMAND.sub("", text)):  # words, not mathematics ("hello world" is not h*e*l*l*o)
            return []
        return self._parse(f"${text}$")

    def prepare(self, answers: list[Any], prompts: list[Any], rows: list[dict]) -> None:
        self.golds = [self.parse_reference(answer) for answer in answers]
        bad = [i for i, gold in enumerate(self.golds) if not gold]
        if bad:
            raise ConfigError(
                f"{len(bad)} of {len(answers)} reference answers cannot be read as mathematics by math-verify (row "
                f"{bad[0]}: {str(answers[bad[0]])[:60]!r}); fix or drop those rows, or use --checker exact"
            )

    def score(self, index: int, completion: str) -> bool:
        try:
            predicted = self._parse(strip_thinking(completion))
            return bool(predicted) and bool(self._verify(self.golds[index], predicted))
        except Exception:  # sympy can fail on odd expressions: a completion that cannot be compared is wrong
            return False


class LabChecker:
    """A lab task's own checker (`dopd.lab.tasks`): the text after `A:` equals the reference answer."""

    def __init__(self, task_name: str):
        from .lab.tasks import get_task

        try:
            self.task = get_task(task_name)
        except ValueError as error:
            raise ConfigError(f"--checker lab:{task_name}: {error}") from None
        self.name = f"lab:{self.task.name}"

    def prepare(self, answers: list[Any], prompts: list[Any], rows: list[dict]) -> None:
        from .lab.tasks import Example

        self.examples = [
            Example(prompt=str(p), answer=str(a), completion=str(r.get("completion") or ""))
            for p, a, r in zip(prompts, answers, rows)
        ]

    def score(self, index: int, completion: str) -> bool:
        return self.task.check(self.examples[index], completion).answer_correct


def make_checker(name: str):
    if name == "math":
        return MathChecker()
    if name == "exact":
        return ExactChecker()
    if name.startswith("lab:") and len(name) > 4:
        return LabChecker(name[4:])
    raise ConfigError(f"--checker {name!r} is unknown; use math, exact or lab:TASK (e.g. lab:arith)")


# ----------------------------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021) from n samples with c correct:
    1 - C(n-c, k) / C(n, k), computed as a product to stay exact for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def default_ks(samples: int) -> list[int]:
    """1, the powers of two below `samples`, and `samples`."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def summarize(correct: list[list[bool]], ks: list[int]) -> dict[str, Any]:
    """Mean accuracy over all samples (each prompt weighted equally) and the mean pass@k over prompts."""
    if not correct:
        raise ValueError("no prompts to summarize")
    accuracy = sum(sum(row) / len(row) for row in correct) / len(correct)
    pass_k = {str(k): sum(pass_at_k(len(row), sum(row), k) for row in correct) / len(correct) for k in ks}
    return {"accuracy": accuracy, "pass_at_k": pass_k}


def gap_recovery(method: float, student: float, teacher: float) -> float | None:
    """The share of the teacher-student gap that `method` closes, `(method - student) / (teacher - student)`; None
    when the teacher does not score above the student (no gap to recover). `dopd eval` and the lab both use it."""
    if teacher <= student:
        return None
    return (method - student) / (teacher - student)
