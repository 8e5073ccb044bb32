"""The three scoring passes over the same completions (docs/method.md, "Setting": step 2): the deployed student with
gradient, the privileged student (no gradient, with the weights `objective.self_weights` says) and the teacher
(frozen), each on its own prompt.

The privileged prompts are longer than the plain one, so a completion token sits at a different absolute
position in each pass: every pass is aligned by the completion. Sequences are `prompt + completion`, right-padded;
the hidden state that scores completion token t is the one at position `len(prompt) − 1 + t`. A pass returns a
`kernels.Head`: the final hidden states at those positions and the output head, so the loss can be evaluated
chunk by chunk without full-vocabulary logits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor

from .types import Completions, Head, PassInputs


def pack_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of sequences grouped into micro-batches whose padded size (rows × longest row) stays within
    `budget` tokens; longest first, so rows of one micro-batch have similar lengths. A sequence longer than the
    budget gets a micro-batch of its own. Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def micro_batches(
    prompts: list[int], rollouts, prompt_sets: list[list[list[int]]], size: int, budget: int, indices=None
):
    """Rollout indices of each micro-batch of a step: `size` in order, or, with a token `budget`, packed by the
    padded tokens of the longest of the passes' prompts (`prompt_sets`, each indexed by data set row) plus the
    completion. `prompts[rollouts.prompt_index[i]]` is rollout i's row. `indices`: the rollouts to cut (default:
    all; one teacher's with several teachers)."""
    indices = list(range(len(rollouts))) if indices is None else list(indices)
    count = len(indices)
    if not budget:
        return [indices[start : start + size] for start in range(0, count, size)]
    lengths = [
        max(len(ids[prompts[rollouts.prompt_index[i]]]) for ids in prompt_sets) + len(rollouts.completion_ids[i])
        for i in indices
    ]
    return [[indices[j] for j in packed] for packed in pack_by_tokens(lengths, budget)]


def pass_inputs(prompts: list[list[int]], completions: Completions, pad_id: int) -> PassInputs:
    """`prompt + completion` per row, right-padded, with the scoring positions of the completion tokens."""
    lengths = completions.mask.sum(-1).tolist()
    rows = [p + c[:n] for p, c, n in zip(prompts, completions.ids.tolist(), lengths)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    steps = torch.arange(completions.ids.shape[1])
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    positions = (prompt_lengths[:, None] - 1 + steps[None, :]).clamp(max=width - 1)
    return PassInputs(input_ids, attention, positions)


def output_head(model: torch.nn.Module, vocab_size: int) -> tuple[Tensor, Tensor | None]:
    """The output head's weight [V, H] and bias, cut to `vocab_size` rows (embeddings padded beyond the tokenizer
    are dropped so that both models score the same vocabulary). Read after the model's forward: FSDP2 leaves the
    head's unit whole then; a head still sharded (a DTensor) is gathered."""
    head = model.get_output_embeddings()
    weight, bias = _whole(head.weight), _whole(getattr(head, "bias", None))
    return weight[:vocab_size], None if bias is None else bias[:vocab_size]


def _whole(tensor: Tensor | None) -> Tensor | None:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# Models whose no-gradient passes must return heads that outlive the weights they were read from, with the function
# that makes such a head: `SelfWeights.swapped_in` registers the student while the privileged self's copy is swapped
# into FSDP2 units, whose gathered head is freed when the swap ends (self_weights.py).
_HEAD_KEEPERS: weakref.WeakKeyDictionary[torch.nn.Module, Callable[[Head], Head]] = weakref.WeakKeyDictionary()


@contextmanager
def heads_kept(model: torch.nn.Module, keep: Callable[[Head], Head]):
    """Within the block, `frozen_pass(model, ...)` returns `keep(head)` instead of the head it read."""
    _HEAD_KEEPERS[model] = keep
    try:
        yield
    finally:
        _HEAD_KEEPERS.pop(model, None)


_MODULES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.nn.Module, ...]] = weakref.WeakKeyDictionary()


@contextmanager
def eval_mode(model: torch.nn.Module):
    """`model.eval()` for the block, then each module's mode as it was. The same flags as `eval()`/`train()`, set on
    a module list taken at the first call per model (adapters are added before training starts): `train()` walks
    the module tree twice per pass, a few ms a step on small models.
    Models with hub kernels (`use_kernels`), whose `train()` also swaps kernels, go through `eval()`/`train()`."""
    if getattr(model, "use_kernels", False):
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
        return
    modules = _MODULES.get(model)
    if modules is None:
        modules = _MODULES[model] = tuple(model.modules())
    training = [module for module in modules if module.training]
    for module in training:  # the attribute `Module.train` sets, written without `Module.__setattr__`'s checks
        module.__dict__["training"] = False
    try:
        yield
    finally:
        for module in training:
            module.__dict__["training"] = True


def _on(tensors: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in tensors.items()}


def _gather_positions(hidden_BLH: Tensor, positions_BT: Tensor) -> Tensor:
    index = positions_BT.to(hidden_BLH.device).unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1])
    return hidden_BLH.gather(1, index)


def trainable_pass(
    model: torch.nn.Module,
    inner: torch.nn.Module,
    inputs: PassInputs,
    vocab_size: int,
    head: tuple[Tensor, Tensor | None] | None = None,
) -> Head:
    """The deployed student's pass, with gradient, through the (possibly distributed) wrapper `model` so that
    data-parallel engines see the forward; `inner` is the unwrapped module that owns the head. `head`: a whole
    frozen (weight, bias) to use instead (LoRA under ZeRO-3)."""
    device = next(inner.parameters()).device
    kwargs = dict(
        input_ids=inputs.input_ids.to(device),
        attention_mask=inputs.attention_mask.to(device),
        output_hidden_states=True,
        use_cache=False,
        **_on(inputs.vision, device),
    )
    try:
        output = model(**kwargs, logits_to_keep=1)  # the loss computes its own logits, chunk by chunk
    except TypeError:
        output = model(**kwargs)
    hidden = _gather_positions(output.hidden_states[-1], inputs.positions)
    weight, bias = head if head is not None else output_head(inner, vocab_size)
    # Under autocast the hidden states may be half precision and the head fp32: the loss works in the head's dtype
    # and accumulates in fp32 (kernels.chunked).
    return Head(hidden.to(weight.dtype), weight, bias)


@torch.no_grad()
def frozen_pass(
    model: torch.nn.Module, inputs: PassInputs, vocab_size: int, head: tuple[Tensor, Tensor | None] | None = None
) -> Head:
    """A no-gradient pass (privileged student or teacher). The model's own forward runs, so that a sharding engine
    gathers its weights and autocast applies, with logits for one position only; a hook on the decoder keeps its
    final hidden states. `head`: a whole (weight, bias) to use instead of the model's (a ZeRO-3 teacher)."""
    device = next(model.parameters()).device
    captured = {}

    def keep(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    hook = model.get_decoder().register_forward_hook(keep)
    try:
        with eval_mode(model):  # a scorer without dropout noise (the privileged student shares the training module)
            model(
                input_ids=inputs.input_ids.to(device),
                attention_mask=inputs.attention_mask.to(device),
                use_cache=False,
                logits_to_keep=1,
                **_on(inputs.vision, device),
            )
    finally:
        hook.remove()
    weight, bias = head if head is not None else output_head(model, vocab_size)
    hidden = _gather_positions(captured["hidden"], inputs.positions).to(weight.dtype)
    result = Head(hidden.detach(), weight.detach(), None if bias is None else bias.detach())
    keep = _HEAD_KEEPERS.get(model)
    return keep(result) if keep is not None else result
