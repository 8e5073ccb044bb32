"""The properties a lab pair must have, measured on held-out prompts: a teacher well above the student without
privileged input (MIN_TEACHER_GAP), and privileged input that raises both (MIN_PRIVILEGE_GAIN, for the hints and
the worked solution); the choice of the student among the teacher's checkpoints; the one line a weak pair stops
with.
"""

from __future__ import annotations

from typing import Any

from dopd.lab.evaluation import evaluate
from dopd.lab.pretraining import EVAL_SEED
from dopd.lab.tasks import PRIVILEGED_KINDS, Task, get_task

# Property thresholds: (a) teacher - student without privileged input; (b) gain from privilege.
MIN_TEACHER_GAP = 0.25
MIN_PRIVILEGE_GAIN = 0.10
REQUIRED_PRIVILEGE_KINDS = ("hints", "solution")


def measure_accuracy(
    model: Any, tokenizer: Any, task: Task, examples: list, batch_size: int = 150
) -> dict[str, dict[str, float]]:
    """One model's answer accuracy and full match without and with each privileged kind."""
    accuracy = {}
    for kind in PRIVILEGED_KINDS:
        result = evaluate(model, tokenizer, task, examples, kind=kind, batch_size=batch_size)
        accuracy[kind] = {"answer_accuracy": result["answer_accuracy"], "full_match": result["full_match"]}
    return accuracy


def measure_properties(
    pair, task: Task | str | None = None, n_eval: int = 300, seed: int = EVAL_SEED, batch_size: int = 150
) -> dict[str, Any]:
    """Teacher and student accuracy without and with each privileged kind on validation-split prompts (never seen
    in pretraining), and the checks.

    checks["a_teacher_gap"]: teacher answer accuracy without privileged input >= student's + MIN_TEACHER_GAP.
    checks["b_privilege_helps"]: for "hints" and "solution", both models gain >= MIN_PRIVILEGE_GAIN.
    """
    task = get_task(task if task is not None else pair.config.task)
    examples = task.examples(n_eval, seed, split="validation")
    accuracy = {
        role: measure_accuracy(model, pair.tokenizer, task, examples, batch_size)
        for role, model in (("teacher", pair.teacher), ("student", pair.student))
    }
    return properties_record(task.name, n_eval, seed, accuracy)


def properties_record(task: str, n_eval: int, seed: int, accuracy: dict) -> dict[str, Any]:
    """What a pair stores of its properties: where they were measured, the accuracy tables and the checks."""
    return {
        "task": task,
        "n_eval": n_eval,
        "eval_seed": seed,
        "eval_split": "validation",
        "accuracy": accuracy,
        "checks": check_properties(accuracy),
    }


def check_properties(accuracy: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    def acc(role: str, kind: str) -> float:
        return accuracy[role][kind]["answer_accuracy"]

    gap = acc("teacher", "none") - acc("student", "none")
    gains = {
        f"{role}_{kind}_gain": round(acc(role, kind) - acc(role, "none"), 4)
        for role in ("teacher", "student")
        for kind in PRIVILEGED_KINDS[1:]
    }
    helps = all(
        gains[f"{role}_{kind}_gain"] >= MIN_PRIVILEGE_GAIN
        for role in ("teacher", "student")
        for kind in REQUIRED_PRIVILEGE_KINDS
    )
    return {
        "teacher_minus_student": round(gap, 4),
        "a_teacher_gap": gap >= MIN_TEACHER_GAP,
        "b_privilege_helps": helps,
        **gains,
        "thresholds": {"min_teacher_gap": MIN_TEACHER_GAP, "min_privilege_gain": MIN_PRIVILEGE_GAIN},
    }


def properties_hold(checks: dict[str, Any]) -> bool:
    """Both properties hold, by the checks of `check_properties` (False for a pair never measured)."""
    return bool(checks.get("a_teacher_gap") and checks.get("b_privilege_helps"))


def _shortfall(checks: dict[str, Any]) -> float:
    """How far a candidate is from meeting both properties (0 when it meets them): the larger of the missing
    points of the gap and of the smallest required gain."""
    gains = [checks[f"{r}_{k}_gain"] for r in ("teacher", "student") for k in REQUIRED_PRIVILEGE_KINDS]
    return max(0.0, MIN_TEACHER_GAP - checks["teacher_minus_student"], MIN_PRIVILEGE_GAIN - min(gains))


def choose_student(teacher: dict, candidates: dict[int, dict]) -> tuple[int, dict[int, dict]]:
    """The candidate student to keep: the latest checkpoint that meets both properties against `teacher` (the most
    trained student that still leaves the gap and reads the privileged input), else the one nearest to meeting
    them. `teacher` and each candidate: `measure_accuracy` tables. Returns the step and each candidate's checks."""
    checks = {step: check_properties({"teacher": teacher, "student": acc}) for step, acc in candidates.items()}
    meeting = [step for step, c in checks.items() if properties_hold(c)]
    if meeting:
        return max(meeting), checks
    return min(checks, key=lambda step: (_shortfall(checks[step]), -step)), checks


def describe_weakness(properties: dict[str, Any], task: str) -> str:
    """One line: which property the pair fails, with its figures, and the ways on."""
    checks, accuracy = properties["checks"], properties["accuracy"]
    failed = []
    if not checks["a_teacher_gap"]:
        failed.append(
            f"(a) teacher - student gap {100 * checks['teacher_minus_student']:+.1f} points < "
            f"+{100 * MIN_TEACHER_GAP:.0f} (teacher {accuracy['teacher']['none']['answer_accuracy']:.3f}, student "
            f"{accuracy['student']['none']['answer_accuracy']:.3f} without privileged input)"
        )
    if not checks["b_privilege_helps"]:
        low = [
            f"{role} {kind} {100 * checks[f'{role}_{kind}_gain']:+.1f}"
            for role in ("teacher", "student")
            for kind in REQUIRED_PRIVILEGE_KINDS
            if checks[f"{role}_{kind}_gain"] < MIN_PRIVILEGE_GAIN
        ]
        failed.append(f"(b) privileged input raises {', '.join(low)} points < +{100 * MIN_PRIVILEGE_GAIN:.0f}")
    return (
        f"the lab pair of task {task!r} fails {' and '.join(failed)}; pass --allow-weak-pair to compare methods "
        "on it anyway (the results say so), or change its pretraining with --pair KEY=VALUE"
    )
