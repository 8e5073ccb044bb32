"""The types that travel through one training step, and the letters of their shapes.

Shape letters, used as suffixes (`hidden_BTH`, `logprobs_MV`):

    B  sequences of a micro-batch          T  completion positions (padded)      L  prompt + completion positions
    V  vocabulary (the rows both heads share)                                     H  a model's hidden size
    K  Top-K entries kept per token         N  valid completion tokens of a call, flattened (padding dropped)
    M  tokens of a block (N, or a chunk)    R  rows a term applies to (a subset of M)
    C  tokens of one chunk                  J  terms of an objective              G  groups of terms evaluated as one

A step: the rollout engine returns `Rollouts`; each micro-batch's completions become `Completions`; each scoring
pass reads `PassInputs` and returns a `Head` (hidden states at the completion positions and the output head); a
no-gradient pass's `Head` is reduced to `TargetScores` (what routing and the Top-K terms read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import losses


@dataclass
class Rollouts:
    """Completions of a list of prompts: `prompt_index[i]` is the prompt that completion `i` continues."""

    prompt_index: list[int]
    completion_ids: list[list[int]]
    finished: list[bool]  # the completion ended with an end-of-sequence token (else it hit max_new_tokens)

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class Completions:
    """Completion tokens of a micro-batch, right-padded. Shapes: [B, T]."""

    ids: Tensor
    mask: Tensor

    @staticmethod
    def from_lists(completions: list[list[int]], pad_id: int) -> Completions:
        width = max(1, max(len(c) for c in completions))
        ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(completions), width), dtype=torch.long)
        for row, tokens in enumerate(completions):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return Completions(ids, mask)


@dataclass
class PassInputs:
    """One pass's padded sequences and where its completion tokens are. Shapes: [B, L] and [B, T]."""

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor  # position of the hidden state that scores completion token t
    vision: dict[str, Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw, ... (image-text models)


@dataclass
class Head:
    """One pass's final hidden states and output head. Shapes: `hidden` [B, T, H] (position t scores completion
    token t), `weight` [V, H], `bias` [V] or None."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self) -> Tensor:
        """Full logits [B, T, V] (the plain form of the loss)."""
        logits = self.hidden @ self.weight.T
        return logits if self.bias is None else logits + self.bias

    def with_weights_of(self, live: Head) -> Head:
        """These hidden states with `live`'s head, detached (a privileged pass of the live weights whose head, kept
        since scoring, a sharding engine may have freed by now)."""
        return Head(self.hidden, live.weight.detach(), None if live.bias is None else live.bias.detach())


@dataclass
class TargetScores:
    """What the objective keeps of one no-gradient pass (self or teacher) on the completion tokens.

    Shapes: `token_logprobs`, `entropy`: [B, T]; `topk_logprobs`, `topk_ids`: [B, T, K] or None;
    `full_logprobs`: [B, T, V] or None (the chunked form keeps them when they are small, so that its loss need
    not recompute the target's logits; read only, and only at valid tokens).
    """

    token_logprobs: Tensor
    entropy: Tensor
    topk_logprobs: Tensor | None = None
    topk_ids: Tensor | None = None
    full_logprobs: Tensor | None = None

    @staticmethod
    def from_logprobs(logprobs_BTV: Tensor, completion_ids_BT: Tensor, top_k: int | None) -> TargetScores:
        logprobs_BTV = logprobs_BTV.detach()
        token = logprobs_BTV.gather(-1, completion_ids_BT.unsqueeze(-1)).squeeze(-1)
        topk = logprobs_BTV.topk(top_k, dim=-1) if top_k else None
        return TargetScores(
            token_logprobs=token,
            entropy=losses.entropy(logprobs_BTV),
            topk_logprobs=topk.values if topk is not None else None,
            topk_ids=topk.indices if topk is not None else None,
        )

    def flat(self, valid_BT: Tensor) -> TargetScores:
        """The valid tokens only, flattened: [B, T, ...] -> [N, ...]."""
        return self.rows(valid_BT)

    def rows(self, index: Tensor | slice) -> TargetScores:
        """The scores of some tokens: any index of the leading axes (a mask, indices, a slice)."""
        fields = (self.token_logprobs, self.entropy, self.topk_logprobs, self.topk_ids, self.full_logprobs)
        return TargetScores(*(None if tensor is None else tensor[index] for tensor in fields))


@dataclass
class MicroBatch:
    """One micro-batch of a step after scoring: each sequence's prompt, the completions, and the no-gradient passes'
    heads and scores (None when the method reads no such pass)."""

    prompt_rows: list[int]  # each sequence's prompt: its row in the prompt set (`data.PromptSet`)
    completions: Completions
    self_head: Head | None
    teacher_head: Head | None
    self_scores: TargetScores | None
    teacher_scores: TargetScores | None
    rewards: Tensor | None = None  # each sequence's reward [b] (objective.reward; None without one)
    advantages: Tensor | None = None  # each sequence's advantage over its prompt's rollouts [b] (rewards.py)
    teacher: str | None = None  # the teacher of its rows (model.teachers; None: the one model.teacher)
