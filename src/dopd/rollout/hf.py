"""Rollouts with transformers `generate` on the training model itself (the default backend).

Prompts are left-padded and sampled in batches of `batch_size` prompts, `num_generations` completions each.
The engine reads the live student module, so there are no weights to sync.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import RolloutConfig
from . import Rollouts, trim_completion


class HFRollout:
    def __init__(self, model_getter: Callable[[], torch.nn.Module], tokenizer, config: RolloutConfig):
        self.model_getter = model_getter
        self.tokenizer = tokenizer
        self.config = config
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def sync_weights(self) -> None:
        return None

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> Rollouts:
        model = self.model_getter()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        index, completions, finished = [], [], []
        try:
            for start in range(0, len(prompt_ids), self.config.batch_size):
                batch = prompt_ids[start : start + self.config.batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention[row, width - len(ids) :] = 1
                if self.config.temperature == 0:  # greedy decoding returns one sequence per input row
                    input_ids = input_ids.repeat_interleave(num_generations, dim=0)
                    attention = attention.repeat_interleave(num_generations, dim=0)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    num_return_sequences=1 if self.config.temperature == 0 else num_generations,
                    max_new_tokens=self.config.max_new_tokens,
                    pad_token_id=self.pad_id,
                    eos_token_id=sorted(self.eos_ids) or None,
                    **self._sampling(),
                )
                for row, generated in enumerate(output[:, width:].tolist()):
                    ids, done = trim_completion(generated, self.eos_ids)
                    index.append(start + row // num_generations)
                    completions.append(ids)
                    finished.append(done)
        finally:
            model.train(was_training)
        return Rollouts(index, completions, finished)

    def _sampling(self) -> dict:
        c = self.config
        if c.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k or None}
