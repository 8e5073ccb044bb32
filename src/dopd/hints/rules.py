"""The rule-based forms of `dopd hints` (no model needed): the text rules (`answer`, `solution`, `stepwise`,
`stepwise-executed`, `summary`) and the box form (`boxes`, the Qwen-VL grounding format), with their names and
coordinate systems."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

RULE_FORMS = ("answer", "solution", "stepwise", "stepwise-executed", "summary", "boxes")
COORDINATE_SYSTEMS = ("pixel", "norm1000", "norm1")

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
    appeared as a result, its later occurrences get the same placeholder. The numeric reference answer is treated as
    a result from the start, so `She sold 72 clips.` hides 72 too. A non-numeric answer (e.g. `\\frac{1}{2}`) is
    replaced by `[answer]` where it appears verbatim. Other numbers (operands, constants such as the 2 of "half") stay.
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

        def replace(match: re.Match, results: set[int] = results) -> str:
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
    (`72`, `72.0`, `1,200` for 1200); otherwise the answer's text, ignoring case and runs of spaces, not inside a
    longer word."""
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
