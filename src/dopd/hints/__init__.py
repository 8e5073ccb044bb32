"""Building the privileged input `p` from a data set of questions with reference solutions (docs/method.md, "Privileged
input"): the paper finds step-wise hints without execution help most and a bare final answer hurts.

`dopd hints` reads a data set (question, solution, answer columns), adds a `privileged_context` column in one
form and writes the data set back. Rule-based forms need no model: `answer`, `solution`, `stepwise` (the plan of
the worked solution with its computed values and final answer hidden), `stepwise-executed` (the steps with their
values, final answer removed), `summary` (the stepwise hints shortened to one line) and `boxes` (box annotations
in the Qwen-VL grounding format, for VLMs). The `generated` form asks a served model over the OpenAI-compatible
chat API for hints without execution, then checks every hint twice (a rule and a second request) and drops the
ones that fail. Its results are appended to a `.partial` file row by row, so that a crash loses no paid request
and a rerun continues where the last one stopped; the output itself is written once, complete, by a rename.

The parts: `rules` holds the rule-based forms (the text rules and the box form, `RULE_FORMS`); `client` the
generated form (the server check, the generation and check prompts and `generate_hints`; the HTTP client itself is
`dopd.chat_client`); `spec` the options (`FORMS`, the default
prefixes, `HintsSpec`) and their checks; `partial` the `.partial` file; `pipeline` the data set side: `run_hints`,
writing the output and the printed summary. Every public name is re-exported here, so `from dopd.hints import X`
works for each of them.
"""

from ..loading import datasets_progress
from .client import (
    GENERATION_SYSTEM,
    VERIFY_SYSTEM,
    HintResult,
    check_reachable,
    generate_hints,
    generation_messages,
    parse_hint_lines,
    parse_verdicts,
    verification_messages,
)
from .partial import PartialLog
from .pipeline import check_writable, describe, row_builder, run_hints, write_dataset
from .rules import (
    COORDINATE_SYSTEMS,
    RULE_FORMS,
    answer_hint,
    box_hint,
    boxed_contents,
    contains_answer,
    executed_hints,
    final_answer_in,
    hide_computed_values,
    image_size,
    numeric_value,
    plan_steps,
    solution_hint,
    split_steps,
    states_computed_value,
    stepwise_hints,
    strip_calculator_annotations,
    summary_hints,
)
from .spec import (
    DEFAULT_PREFIXES,
    FORMS,
    HintsSpec,
    HintsSummary,
    check_columns,
    check_local_path,
    check_spec,
    output_kind,
    resolve_server,
)

__all__ = [
    # rules
    "RULE_FORMS",
    "COORDINATE_SYSTEMS",
    "strip_calculator_annotations",
    "boxed_contents",
    "final_answer_in",
    "split_steps",
    "plan_steps",
    "numeric_value",
    "hide_computed_values",
    "stepwise_hints",
    "executed_hints",
    "summary_hints",
    "solution_hint",
    "answer_hint",
    "contains_answer",
    "states_computed_value",
    "image_size",
    "box_hint",
    # client
    "check_reachable",
    "GENERATION_SYSTEM",
    "VERIFY_SYSTEM",
    "generation_messages",
    "verification_messages",
    "parse_hint_lines",
    "parse_verdicts",
    "HintResult",
    "generate_hints",
    # pipeline
    "FORMS",
    "DEFAULT_PREFIXES",
    "HintsSpec",
    "HintsSummary",
    "resolve_server",
    "check_spec",
    "check_local_path",
    "output_kind",
    "check_columns",
    "row_builder",
    "PartialLog",
    "datasets_progress",
    "run_hints",
    "check_writable",
    "write_dataset",
    "describe",
]
