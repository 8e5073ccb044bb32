"""The three scoring passes over the same completions (spec, step 2): the deployed student with gradient, the
privileged student (same weights, no gradient) and the teacher (frozen), each on its own prompt.

The privileged prompts are longer than the plain one, so a completion token sits at a different absolute
position in each pass: every pass is aligned by the completion. Sequences are `prompt + completion`, right-padded;
the hidden state that scores completion token t is the one at position `len(prompt) − 1 + t`. A pass returns a
`kernels.Head`: the final hidden states at those positions and the output head, so the loss can be evaluated
chunk by chunk without full-vocabulary logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import Head


@dataclass
class PassInputs:
    """One pass's padded sequences and where its completion tokens are. Shapes: [B, L] and [B, T]."""

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor  # position of the hidden state that scores completion token t


@dataclass
class Completions:
    """Completion tokens of a micro-batch, right-padded. Shapes: [B, T]."""

    ids: Tensor
    mask: Tensor

    @staticmethod
    def from_lists(completions: list[list[int]], pad_id: int) -> "Completions":
        width = max(1, max(len(c) for c in completions))
        ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(completions), width), dtype=torch.long)
        for row, tokens in enumerate(completions):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return Completions(ids, mask)


def pass_inputs(prompts: list[list[int]], completions: Completions, pad_id: int) -> PassInputs:
    """`prompt + completion` per row, right-padded, with the scoring positions of the completion tokens."""
    lengths = completions.mask.sum(-1).tolist()
    rows = [p + c[:n] for p, c, n in zip(prompts, completions.ids.tolist(), lengths)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention[row, : len(tokens)] = 1
    steps = torch.arange(completions.ids.shape[1])
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    positions = (prompt_lengths[:, None] - 1 + steps[None, :]).clamp(max=width - 1)
    return PassInputs(input_ids, attention, positions)


def output_head(model: torch.nn.Module, vocab_size: int) -> tuple[Tensor, Tensor | None]:
    """The output head's weight [V, H] and bias, cut to `vocab_size` rows (embeddings padded beyond the tokenizer
    are dropped so that both models score the same vocabulary)."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight[:vocab_size], None if bias is None else bias[:vocab_size]


def _gather_positions(hidden_BLH: Tensor, positions_BT: Tensor) -> Tensor:
    index = positions_BT.to(hidden_BLH.device).unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1])
    return hidden_BLH.gather(1, index)


def trainable_pass(model: torch.nn.Module, inner: torch.nn.Module, inputs: PassInputs, vocab_size: int) -> Head:
    """The deployed student's pass, with gradient, through the (possibly distributed) wrapper `model` so that
    data-parallel engines see the forward; `inner` is the unwrapped module that owns the head."""
    device = next(inner.parameters()).device
    kwargs = dict(
        input_ids=inputs.input_ids.to(device),
        attention_mask=inputs.attention_mask.to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    try:
        output = model(**kwargs, logits_to_keep=1)  # the loss computes its own logits, chunk by chunk
    except TypeError:
        output = model(**kwargs)
    hidden = _gather_positions(output.hidden_states[-1], inputs.positions)
    weight, bias = output_head(inner, vocab_size)
    return Head(hidden, weight, bias)


@torch.no_grad()
def frozen_pass(model: torch.nn.Module, inputs: PassInputs, vocab_size: int) -> Head:
    """A no-gradient pass (privileged student or teacher) through the model's decoder only."""
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    was_training = model.training
    model.eval()  # a scorer without dropout noise (the privileged student shares the training module)
    try:
        output = decoder(
            input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device), use_cache=False
        )
    finally:
        model.train(was_training)
    hidden = _gather_positions(output.last_hidden_state, inputs.positions)
    weight, bias = output_head(model, vocab_size)
    return Head(hidden.detach(), weight.detach(), None if bias is None else bias.detach())
