"""The privilege-illusion lab: small tasks with privileged input, a tiny teacher/student pair, and evaluation."""

from dopd.lab.evaluation import evaluate, render_lab_prompt
from dopd.lab.models import (
    LabPair,
    LabPairConfig,
    ModelSize,
    default_pair_config,
    load_or_build_pair,
)
from dopd.lab.properties import measure_properties
from dopd.lab.tasks import (
    LAB_PRIVILEGED_TEMPLATE,
    PRIVILEGED_KINDS,
    TASKS,
    CheckResult,
    Example,
    Task,
    get_task,
    privileged_context,
)
from dopd.lab.tokenizer import build_tokenizer

__all__ = [
    "LAB_PRIVILEGED_TEMPLATE",
    "PRIVILEGED_KINDS",
    "TASKS",
    "CheckResult",
    "Example",
    "LabPair",
    "LabPairConfig",
    "ModelSize",
    "Task",
    "build_tokenizer",
    "default_pair_config",
    "evaluate",
    "get_task",
    "load_or_build_pair",
    "measure_properties",
    "privileged_context",
    "render_lab_prompt",
]
