"""Rollouts with transformers `generate` on the training model itself (the default backend).

Prompts are left-padded and sampled in batches of `batch_size` prompts, `num_generations` completions each.
Sampling uses a fresh `GenerationConfig` built from the rollout settings alone: a checkpoint's own defaults
(repetition penalty, top-k, ...) would make the completions come from another distribution than the student's,
which biases every on-policy estimate. The engine reads the live student module, so there are no weights to sync.
An image-text student gets each prompt's image through its processor (`processor`), and never samples the image
placeholder tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import RolloutConfig
from ..engines import gathers_across_processes, head_rows
from . import Rollouts, end_of_sequence_ids, trim_completion


class HFRollout:
    def __init__(
        self,
        model_getter: Callable[[], torch.nn.Module],
        tokenizer,
        config: RolloutConfig,
        vocab_size: int | None = None,
        processor=None,
    ):
        self.model_getter = model_getter
        self.processor = processor
        self.tokenizer = tokenizer
        self.config = config
        self.vocab_size = vocab_size  # ids at or above it are never sampled (the teacher has no scores for them)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sync_weights(self) -> None:
        return None

    def generation_config(self, model):
        from transformers import GenerationConfig

        c = self.config
        self.eos_ids = end_of_sequence_ids(self.tokenizer, model)
        settings = dict(
            max_new_tokens=c.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            do_sample=c.temperature > 0,
        )
        if c.temperature > 0:
            settings.update(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k or None)
        else:
            settings.update(temperature=None, top_p=None, top_k=None)
        rows = head_rows(model)
        suppressed = list(range(self.vocab_size, rows)) if self.vocab_size is not None else []
        if self.processor is not None:
            from ..multimodal import vision_token_ids

            suppressed = vision_token_ids(self.tokenizer) + suppressed
        if suppressed:
            settings["suppress_tokens"] = suppressed
        return GenerationConfig(**settings)

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], num_generations: int, images: list | None = None, streamer=None
    ) -> Rollouts:
        """`images`: one image per prompt, for an image-text student. `streamer`: a transformers streamer that
        sees each decoding step's tokens (progress reports)."""
        model = self.model_getter()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        generation_config = self.generation_config(model)
        greedy = not generation_config.do_sample
        # A sharded model's forward gathers weights from every process: all must decode the same number of steps
        # (transformers turns this on by itself for ZeRO-3 and its own FSDP wrapper, not for accelerate's FSDP2).
        synced = gathers_across_processes(model)
        generation_config.num_return_sequences = 1 if greedy else num_generations
        index, completions, finished = [], [], []
        # transformers fills every unset field from the model's own generation_config: swap it out meanwhile (on
        # the transformers model itself, under a PEFT wrapper).
        owner = model.get_base_model() if hasattr(model, "get_base_model") else model
        saved_config, owner.generation_config = owner.generation_config, generation_config
        try:
            for start in range(0, len(prompt_ids), self.config.batch_size):
                batch = prompt_ids[start : start + self.config.batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention[row, width - len(ids) :] = 1
                batch_images = None if images is None else images[start : start + self.config.batch_size]
                if greedy:  # greedy decoding returns one sequence per input row
                    input_ids = input_ids.repeat_interleave(num_generations, dim=0)
                    attention = attention.repeat_interleave(num_generations, dim=0)
                    batch_images = None if images is None else [i for i in batch_images for _ in range(num_generations)]
                vision = {}
                if batch_images is not None:
                    from ..multimodal import vision_inputs

                    vision = vision_inputs(self.processor, batch_images, input_ids, left_padded=True)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=generation_config,
                    streamer=streamer,
                    synced_gpus=synced,
                    **{key: value.to(device) for key, value in vision.items()},
                )
                for row, generated in enumerate(output[:, width:].tolist()):
                    ids, done = trim_completion(generated, self.eos_ids)
                    index.append(start + row // num_generations)
                    completions.append(ids)
                    finished.append(done)
        finally:
            owner.generation_config = saved_config
            model.train(was_training)
        return Rollouts(index, completions, finished)
