"""The privilege-illusion lab: small tasks with privileged input, a tiny teacher/student pair, and evaluation.

The names below are imported on first use (`from dopd.lab import get_task` works as usual), so that reading the
lab's settings (`dopd.lab.config`, from which `dopd lab --help` is made) does not load transformers.
"""

import importlib

_HOMES = {
    "evaluate": "evaluation",
    "render_lab_prompt": "evaluation",
    "LabPair": "models",
    "LabPairConfig": "models",
    "ModelSize": "models",
    "default_pair_config": "models",
    "load_or_build_pair": "models",
    "measure_properties": "properties",
    "LAB_PRIVILEGED_TEMPLATE": "tasks",
    "PRIVILEGED_KINDS": "tasks",
    "TASKS": "tasks",
    "CheckResult": "tasks",
    "Example": "tasks",
    "Task": "tasks",
    "get_task": "tasks",
    "privileged_context": "tasks",
    "build_tokenizer": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'dopd.lab' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dopd.lab.{_HOMES[name]}"), name)
