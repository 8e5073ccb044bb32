"""Rendering prompts for the three scoring passes (docs/method.md, "Privileged input": insertion).

The deployed student sees the prompt alone; the privileged student and the teacher see the prompt with the
privileged context inserted by a template inside the user turn. Every pass renders through the tokenizer's chat
template when it has one, so that the lab's tiny models and real checkpoints take the same path. These are pure
functions of strings and a tokenizer; `data.py` applies them to datasets and the lab applies them to its
pretraining examples, so that the prompts a model was trained on are the prompts it is distilled on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_PRIVILEGED_TEMPLATE = "{prompt}\n\n{privileged_context}"

Messages = list[dict[str, Any]]


def check_template(template: str, field: str) -> None:
    """Raise a clear error when a privileged template lacks one of its two placeholders."""
    missing = [name for name in ("{prompt}", "{privileged_context}") if name not in template]
    if missing:
        raise ValueError(
            f"{field} = {template!r} lacks {' and '.join(missing)}: a privileged template must contain both "
            "'{prompt}' and '{privileged_context}', for example '{prompt}\\n\\n{privileged_context}'."
        )
    try:
        template.format(prompt="", privileged_context="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"{field} = {template!r} has a placeholder other than {{prompt}} and {{privileged_context}} ({error}); "
            "write literal braces as '{{' and '}}'."
        ) from None


def insert_privileged(prompt: str | Messages, privileged_context: str | None, template: str) -> str | Messages:
    """The prompt with `privileged_context` inserted by `template` (into the last user turn for chat messages)."""
    if privileged_context is None:
        return prompt
    if isinstance(prompt, str):
        return template.format(prompt=prompt, privileged_context=privileged_context)
    messages = [dict(message) for message in prompt]
    user_turns = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not user_turns:
        raise ValueError("a chat prompt needs at least one message with role 'user' to carry the privileged context")
    last = user_turns[-1]
    content = messages[last]["content"]
    if not isinstance(content, str):
        # Multimodal content parts: the privileged text goes into the text parts, images stay where they are.
        parts = [dict(part) for part in content]
        text_parts = [i for i, part in enumerate(parts) if part.get("type") == "text"]
        if text_parts:
            i = text_parts[-1]
            parts[i]["text"] = template.format(prompt=parts[i]["text"], privileged_context=privileged_context)
        else:
            parts.append({"type": "text", "text": template.format(prompt="", privileged_context=privileged_context)})
        messages[last]["content"] = parts
    else:
        messages[last]["content"] = template.format(prompt=content, privileged_context=privileged_context)
    return messages


def render_prompt(
    tokenizer: Any,
    prompt: str | Messages,
    privileged_context: str | None = None,
    template: str = DEFAULT_PRIVILEGED_TEMPLATE,
    use_chat_template: bool | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The text a model reads before its completion.

    `use_chat_template=None` uses the tokenizer's chat template when it has one. Without a chat template, a
    string prompt is used as it is, and chat messages are an error (there is no way to render them).
    """
    prompt = insert_privileged(prompt, privileged_context, template)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template:
        if not has_template:
            raise ValueError(
                "data.use_chat_template is true but the tokenizer has no chat_template; set it to false or "
                "give a tokenizer with a chat template"
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
    if not isinstance(prompt, str):
        raise ValueError(
            "the prompt is a list of chat messages but no chat template is used; give string prompts or a "
            "tokenizer with a chat_template"
        )
    return prompt


def render_prompts(
    tokenizer: Any,
    prompts: Sequence[str | Messages],
    privileged_contexts: Sequence[str | None] | None = None,
    template: str = DEFAULT_PRIVILEGED_TEMPLATE,
    use_chat_template: bool | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """`render_prompt` over a batch; `privileged_contexts=None` renders the plain prompts."""
    contexts = privileged_contexts if privileged_contexts is not None else [None] * len(prompts)
    return [
        render_prompt(tokenizer, p, c, template, use_chat_template, chat_template_kwargs)
        for p, c in zip(prompts, contexts)
    ]
