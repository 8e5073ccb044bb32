"""Teacher fidelity: the teacher must read the student's tokens as the student's tokenizer means them, and its
prompts in the template it was trained on, before any weights load.

On-policy distillation scores the student's completion tokens with the teacher, so both must share one
vocabulary (the same token ids for the same strings), the same end-of-sequence ids and special tokens. A chat
template that differs is the most reported silent failure of on-policy distillation elsewhere: the teacher scores
a prompt rendered in a template it never saw. Here a probe conversation is rendered by both tokenizers' templates;
a difference stops the run with one line showing where the two part, unless `data.teacher_chat_template` says to
render the teacher's prompts with its own template (the completion tokens are shared either way). A model
directory without tokenizer files reads the other model's tokenizer, and the log says so.
"""

from __future__ import annotations

import logging

from .config import Config, ConfigError
from .loading import tokenizer_or_none

logger = logging.getLogger("dopd")
PROBE = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 12 + 30? Think step by step."},
    {"role": "assistant", "content": "12 + 30 = 42. The answer is 42."},
    {"role": "user", "content": "And 42 - 2?"},
]


def render_probe(tokenizer) -> str | None:
    """The probe conversation in the tokenizer's chat template (None without a template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        return tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template without a system role, for one: the same conversation without it
        return tokenizer.apply_chat_template(PROBE[1:], tokenize=False, add_generation_prompt=True)


def first_difference(a: str, b: str, context: int = 24) -> str:
    """Where two texts part: the character index and a little of each around it."""
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, index - context // 2)
    return f"character {index}: student {a[start : index + context]!r}, teacher {b[start : index + context]!r}"


def special_tokens(tokenizer) -> dict[str, object]:
    """End-of-sequence id and every named special token, by name (padding left out: dopd sets it when missing)."""
    named = {k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}
    return {"eos_token_id": tokenizer.eos_token_id, **named}


def check_teacher_fidelity(config: Config, tokenizer):
    """The tokenizer to render the teacher's prompts with: None (the student's) or, with
    `data.teacher_chat_template`, the teacher's own. Raises ConfigError (one line) when the teacher's vocabulary,
    special tokens or chat template differ from the student's."""
    m = config.model
    if not m.teacher or m.tokenizer or m.teacher_server.url:  # one tokenizer for both, or the server checks it
        return None
    teacher = tokenizer_or_none(m.teacher, m.trust_remote_code)
    if teacher is None:
        logger.warning(
            "model.teacher %s has no tokenizer files: it reads the student's tokenizer (%d tokens)",
            m.teacher,
            len(tokenizer),
        )
        return None
    if teacher.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"the teacher {m.teacher} has another tokenizer than the student {m.student} ({len(teacher)} against "
            f"{len(tokenizer)} tokens, or the same size with other ids); on-policy distillation scores the student's "
            "tokens with the teacher, so both must share one tokenizer"
        )
    ours, theirs = special_tokens(tokenizer), special_tokens(teacher)
    if ours != theirs:
        key = next(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
        raise ConfigError(
            f"the teacher {m.teacher} has other special tokens than the student: {key} is {theirs.get(key)!r} against "
            f"{ours.get(key)!r}; the completions end with the student's end-of-sequence token, so both must agree "
            "(give one tokenizer for both with model.tokenizer)"
        )
    if config.data.use_chat_template is False:
        return None  # plain prompts: no template is read
    student_text, teacher_text = render_probe(tokenizer), render_probe(teacher)
    if student_text == teacher_text:
        return None
    if config.data.teacher_chat_template:
        logger.warning("the teacher's prompts are rendered with its own chat template (data.teacher_chat_template)")
        return teacher
    where = first_difference(student_text or "", teacher_text or "")
    raise ConfigError(
        f"the teacher's chat template renders a conversation differently from the student's ({where}); set "
        "data.teacher_chat_template=true to render the teacher's prompts with its own template, or give both the "
        "same tokenizer with model.tokenizer"
    )
