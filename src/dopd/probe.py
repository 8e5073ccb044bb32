"""The trainer's one hook for measuring it: `Trainer(config, probe=...)`.

Benchmarks (`benchmarks/step_overhead.py`) and the GPU check (`scripts/gpu_check.py`) time the pieces of a step and
share one loaded teacher between the trainers they compare, through a subclass of `Probe`, instead of replacing
names inside `dopd.train`. The base class measures nothing and loads the teacher as every run does.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from .loading import load_model

# The pieces of a step `Probe.section` wraps, in the order a step runs them (per micro-batch): the privileged
# student's no-gradient pass (inside the swap of its weights) and its scores of the sampled tokens, the same for the
# teacher, then the student's pass with gradient and the objective.
SECTIONS = ("self_pass", "self_score_target", "teacher_pass", "teacher_score_target", "student_pass", "loss")


class Probe:
    def section(self, name: str) -> AbstractContextManager:
        """A context around one piece of the step (`name` in `SECTIONS`)."""
        return nullcontext()

    def load_teacher(self, path: str, config):
        """The frozen local teacher of a run (a subclass may hand several trainers the same module)."""
        return load_model(path, config, "teacher")
