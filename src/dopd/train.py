"""The on-policy distillation loop on accelerate (spec, "Setting": one training step).

Each optimizer step:
  1. rollouts: the student samples `num_generations` completions of each of its prompts, without privileged input;
  2. scoring: per micro-batch, the privileged student (same weights, no gradient) and the teacher (frozen) score
     the completions on their own prompts; their sampled-token log-probs, entropies and top-K are kept;
  3. routing thresholds over the whole step's tokens, gathered over all processes (or per micro-batch);
  4. update: per micro-batch, the student's pass with gradient, the objective (chunked by default) and backward,
     with the loss averaged per sequence over the step's sequences, so accumulation gives the batch mean;
     then clipping, AdamW and the schedule.
Metrics go to `metrics.jsonl` (and TensorBoard / W&B), samples with token-level routing to `samples.jsonl`,
checkpoints to `checkpoints/` (atomically) and the final model to `final/`, all in the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, is_image_text, to_yaml, validate
from .data import PromptOrder, PromptSet, build_prompt_set, check_columns, load_rows
from .engines import check_engine, configure_deepspeed, frozen_head, prepare_teacher
from .kernels import Head, chunked_objective, score_target
from .lora import add_adapters, load_adapters, require_peft
from .objectives import Objective, TargetScores, check_top_k, compute_batch_thresholds, compute_objective
from .rollout import Rollouts
from .routing import REGIMES, make_gather
from .scoring import Completions, frozen_pass, pack_by_tokens, pass_inputs, trainable_pass

logger = logging.getLogger("dopd")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    run_dir: str
    final_dir: str
    steps: int
    last_metrics: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- preparation


def check_run_dir(config: Config) -> None:
    """Refuse a run directory that holds another run unless overwrite or resume is set (read-only)."""
    run_dir = config.logging.output_dir
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if config.checkpoint.resume:
            ckpt.check_same_run(run_dir, config)
        elif not config.logging.overwrite:
            raise ConfigError(
                f"logging.output_dir = {run_dir} already holds files (another run?); set logging.overwrite=true "
                "to replace it, checkpoint.resume=true to continue it, or choose another directory"
            )


def init_run_dir(config: Config) -> None:
    """Create (or, with overwrite, empty) the run directory; called by the main process after `check_run_dir`."""
    run_dir = config.logging.output_dir
    if config.logging.overwrite and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


def load_tokenizer(config: Config):
    from transformers import AutoTokenizer

    name = config.model.tokenizer or config.model.student
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    except Exception as error:
        raise ConfigError(f"the tokenizer {name} could not be loaded (model.tokenizer / model.student): {error}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, config: Config, role: str):
    """The student always in fp32 (AdamW on half-precision weights rounds small updates away; mixed precision is
    `train.mixed_precision`, which autocasts its passes); the frozen teacher in `model.dtype`. Image-text models
    (`model.kind`) load with their image-text class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_class = AutoModelForImageTextToText if is_image_text(config) else AutoModelForCausalLM
    dtype = _DTYPES[config.model.dtype] if role == "teacher" else torch.float32
    kwargs = {"dtype": dtype, "trust_remote_code": config.model.trust_remote_code}
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    try:
        return model_class.from_pretrained(path, **kwargs)
    except Exception as error:
        raise ConfigError(f"the {role} model {path} could not be loaded (model.{role}): {error}") from None


def check_teacher_tokenizer(config: Config, tokenizer) -> None:
    """The teacher must read the same token ids: compare its own tokenizer, when it ships one, with the student's."""
    from transformers import AutoTokenizer

    if not config.model.teacher or config.model.tokenizer or config.model.teacher_server.url:
        return
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(
            config.model.teacher, trust_remote_code=config.model.trust_remote_code
        )
    except Exception:
        return  # no tokenizer files beside the teacher: the vocabulary-size check below still applies
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"the teacher {config.model.teacher} has another tokenizer than the student {config.model.student} "
            f"({len(teacher_tokenizer)} against {len(tokenizer)} tokens, or the same size with other ids); "
            "on-policy distillation scores the student's tokens with the teacher, so both must share one tokenizer"
        )


def common_vocab_size(student, teacher, tokenizer) -> int:
    """Rows of the output heads both models share; embeddings padded beyond the tokenizer are tolerated."""
    sizes = [student.get_output_embeddings().weight.shape[0]]
    if teacher is not None:
        sizes.append(teacher.get_output_embeddings().weight.shape[0])
    size = min(sizes)
    if size < len(tokenizer):
        raise ConfigError(
            f"an output head has {size} rows but the tokenizer has {len(tokenizer)} tokens (student "
            f"{sizes[0]}{', teacher ' + str(sizes[1]) if len(sizes) > 1 else ''}); the models and the tokenizer "
            "must match"
        )
    return size


def build_optimizer(model, config: Config):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, o.warmup_steps, config.train.steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, o.warmup_steps)
    return optimizer, scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- metrics


class StepMetrics:
    """Token-weighted means over micro-batches and processes; `loss` is summed (each micro-batch's loss is
    already a share of the step's mean)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        tokens = float(metrics["tokens"])
        for key, value in metrics.items():
            value = float(value)
            if key in ("loss", "tokens"):
                weight = 1.0
            elif key.startswith("loss/"):
                weight = float(metrics[f"frac/{key[5:]}"]) * tokens
            else:
                weight = tokens
            if weight > 0 and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value * weight
                self.weights[key] = self.weights.get(key, 0.0) + weight

    def reduce(self, accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        if accelerator.num_processes > 1:
            keys = sorted(set().union(*accelerator.gather_for_metrics([keys], use_gather_object=True)))
            packed = torch.tensor(
                [[self.sums.get(k, 0.0), self.weights.get(k, 0.0)] for k in keys], dtype=torch.float64,
                device=accelerator.device,
            )
            packed = accelerator.reduce(packed, reduction="sum").cpu()
            sums = {k: float(packed[i, 0]) for i, k in enumerate(keys)}
            weights = {k: float(packed[i, 1]) for i, k in enumerate(keys)}
            # Data-parallel gradients are averaged over processes, so the step's loss is the mean of theirs.
            sums["loss"] = sums.get("loss", 0.0) / accelerator.num_processes
        else:
            sums, weights = self.sums, self.weights
        out = {}
        for key in keys:
            if key in ("loss", "tokens"):
                out[key] = sums[key]
            elif weights[key] > 0:
                out[key] = sums[key] / weights[key]
        return out


# ------------------------------------------------------------------------------------------------- step


@dataclass
class MicroBatch:
    owners: list[int]  # the data set row of each sequence's prompt
    completions: Completions
    self_head: Head | None
    teacher_head: Head | None
    self_scores: TargetScores | None
    teacher_scores: TargetScores | None


class Trainer:
    """Holds the models, data and state of one run; `run()` trains. Built by `train(config)`."""

    def __init__(self, config: Config, accelerator=None):
        from accelerate import Accelerator

        self.config = config
        self.objective: Objective = validate(config)
        check_run_dir(config)
        trackers = list(config.logging.report_to) or None
        self.accelerator = accelerator or Accelerator(
            cpu=config.train.device == "cpu",
            log_with=trackers,
            project_dir=config.logging.output_dir,
            mixed_precision=config.train.mixed_precision,
        )
        # Launch settings and optional packages are checked before any model loads.
        check_engine(config, self.accelerator)
        if config.rollout.backend == "vllm":
            from .rollout.vllm import require_vllm

            require_vllm(self.accelerator.device)
        if config.model.lora.enabled:
            require_peft()
        self.run_dir = config.logging.output_dir
        # Each process samples its own completions: its own random stream (process 0 keeps the plain seed).
        seed_everything(config.train.seed + 1_000_003 * self.accelerator.process_index)
        self.processor = None  # an image-text model's processor (its tokenizer is self.tokenizer)
        if is_image_text(config):
            from .multimodal import load_processor

            name = config.model.tokenizer or config.model.student
            self.processor = load_processor(name, config.model.trust_remote_code)
            self.tokenizer = self.processor.tokenizer
        else:
            self.tokenizer = load_tokenizer(config)
        self.prompts = self._load_prompts()
        check_teacher_tokenizer(config, self.tokenizer)
        self.served_teacher = self._served_teacher()  # None unless model.teacher_server.url; checked here
        if config.train.prompts_per_step % self.accelerator.num_processes:
            raise ConfigError(
                f"train.prompts_per_step = {config.train.prompts_per_step} must be divisible by the number of "
                f"processes ({self.accelerator.num_processes})"
            )
        self.start_step, resume_dir = 0, None
        if config.checkpoint.resume:
            resume_dir = ckpt.latest(self.run_dir)
        student = self._load_student(resume_dir)
        local_teacher = self.objective.needs_teacher and self.served_teacher is None
        teacher = load_model(config.model.teacher, config, "teacher") if local_teacher else None
        self.vocab_size = common_vocab_size(student, teacher, self.tokenizer)
        if self.served_teacher is not None:
            self.served_teacher.vocab_size = self.vocab_size
        try:
            check_top_k(self.objective, self.vocab_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        student.train()
        optimizer, scheduler = build_optimizer(student, config)
        # The schedule is stepped once per optimizer step by us: accelerate's prepared scheduler would step once per
        # process, running the schedule num_processes times faster.
        configure_deepspeed(config, self.accelerator)
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.scheduler = scheduler
        self.teacher = prepare_teacher(teacher, self.accelerator) if teacher is not None else None
        # Whole copies of frozen heads where the engine shards them (ZeRO-3; the student's is frozen under LoRA).
        accelerator, vocab = self.accelerator, self.vocab_size
        self.teacher_head = frozen_head(self.teacher, vocab, accelerator) if teacher is not None else None
        self.student_head = frozen_head(self.inner, vocab, accelerator) if config.model.lora.enabled else None
        self.order = PromptOrder(len(self.prompts), config.train.seed, config.data.shuffle)
        if resume_dir:
            self.start_step = ckpt.load_state(resume_dir, self)
        if config.checkpoint.resume and self.accelerator.is_main_process:
            ckpt.truncate_metrics(self.run_dir, self.start_step)
        self.engine = self._rollout_engine()
        self.gather = make_gather(self.accelerator)
        if self.accelerator.is_main_process and not resume_dir:
            init_run_dir(config)
        self.accelerator.wait_for_everyone()

    def _load_student(self, resume_dir: str | None):
        """The student from its path or the newest checkpoint; with LoRA, the base from its path and the adapter
        fresh or from the checkpoint."""
        config = self.config
        lora = config.model.lora.enabled
        saved = os.path.join(resume_dir, "model") if resume_dir else None
        student = load_model(saved if saved and not lora else config.model.student, config, "student")
        exclude = None
        if self.processor is not None:
            from .multimodal import EXCLUDE_VISION, freeze_vision

            exclude = EXCLUDE_VISION
            if config.model.freeze_vision:
                freeze_vision(student)
        if config.model.gradient_checkpointing:
            student.gradient_checkpointing_enable()
            if lora:  # the frozen embeddings must pass gradients on to the checkpointed layers' adapters
                student.enable_input_require_grads()
        if lora:
            student = load_adapters(student, saved) if saved else add_adapters(student, config.model.lora, exclude)
        return student

    def _load_prompts(self) -> PromptSet:
        config = self.config
        dataset = load_rows(config.data)
        needs_privileged = bool(self.objective.teacher_privileged) or (
            self.objective.needs_self and config.objective.self_privileged
        )
        check_columns(dataset, config.data, needs_privileged)
        return build_prompt_set(
            dataset, config.data, self.tokenizer, self.objective.teacher_privileged, config.objective.self_privileged,
            self.processor,
        )

    def _served_teacher(self):
        """The vLLM client of a served teacher, its server checked (models, tokenizer, log-probs cap), or None."""
        ts, objective = self.config.model.teacher_server, self.objective
        if not ts.url:
            return None
        from .served_teacher import ServedTeacher, TeacherServerError

        top_k = ts.top_k or (self.config.objective.top_k if objective.top_k_for("teacher") else 1)
        max_length = self.config.data.max_prompt_length + self.config.rollout.max_new_tokens + 1
        client = ServedTeacher(ts, ts.model or self.config.model.teacher, top_k, len(self.tokenizer), max_length)
        try:
            client.check(self.tokenizer)
        except TeacherServerError as error:
            raise ConfigError(str(error)) from None
        if self.accelerator.is_main_process:
            fallback = [t.label for t in objective.terms if t.target == "teacher" and t.tail == "bucket"]
            logger.warning(
                "teacher served by %s (%s, top-%d log-probs per token)%s", ts.url, client.model, top_k,
                f"; the teacher's full-vocabulary term(s) {', '.join(fallback)} run on its top-{top_k} with a tail "
                "bucket (objective.teacher_full=topk_bucket)" if fallback else "",
            )  # fmt: skip
        return client

    def _rollout_engine(self):
        if self.config.rollout.backend == "vllm":
            from .rollout.vllm import VLLMRollout

            return VLLMRollout.create(self.inner, self.accelerator, self.tokenizer, self.config, self.vocab_size)
        from .rollout.hf import HFRollout

        return HFRollout(
            lambda: self.accelerator.unwrap_model(self.student), self.tokenizer, self.config.rollout, self.vocab_size,
            self.processor,
        )

    @property
    def inner(self):
        return self.accelerator.unwrap_model(self.student)

    # -------------------------------------------------------------------------------------------- one step

    def local_prompts(self) -> list[int]:
        """This process's share of the step's prompts (every process advances the same global order)."""
        indices = self.order.take(self.config.train.prompts_per_step)
        share = len(indices) // self.accelerator.num_processes
        rank = self.accelerator.process_index
        return indices[rank * share : (rank + 1) * share]

    def micro_batches(self, prompts: list[int], rollouts: Rollouts) -> list[list[int]]:
        """Rollout indices of each micro-batch: `micro_batch_size` in order, or packed by padded tokens of the
        longest of the passes when `max_tokens_per_micro_batch` is set (the loss is the same either way)."""
        count, budget = len(rollouts), self.config.train.max_tokens_per_micro_batch
        if not budget:
            size = self.config.train.micro_batch_size
            return [list(range(start, min(start + size, count))) for start in range(0, count, size)]
        prompt_sets = [self.prompts.student_ids]
        if self.objective.needs_self:
            prompt_sets.append(self.prompts.self_ids)
        if self.objective.needs_teacher:
            prompt_sets.append(self.prompts.teacher_ids)
        lengths = [
            max(len(ids[prompts[rollouts.prompt_index[i]]]) for ids in prompt_sets) + len(rollouts.completion_ids[i])
            for i in range(count)
        ]
        return pack_by_tokens(lengths, budget)

    def score(self, prompts: list[int], rollouts: Rollouts) -> list[MicroBatch]:
        """The no-gradient passes of every micro-batch: privileged student and teacher."""
        pad = self.tokenizer.pad_token_id
        # No top-K here (top_k=None): routing reads only the sampled token, and the loss computes a target's top-K
        # for just the tokens whose Top-K term applies (LH: teacher; LL, HS: self), from the heads kept here.
        temperature = self.config.objective.temperature
        inner = self.inner  # unwrapping walks the engine's wrappers: once per step, not per micro-batch
        batches = []
        for sequences in self.micro_batches(prompts, rollouts):
            owners = [prompts[rollouts.prompt_index[i]] for i in sequences]
            completions = Completions.from_lists([rollouts.completion_ids[i] for i in sequences], pad)
            self_head = teacher_head = self_scores = teacher_scores = None
            if self.objective.needs_self:
                privileged = bool(self.config.objective.self_privileged)
                inputs = self.pass_inputs(self.prompts.self_ids, owners, completions, privileged)
                self_head = frozen_pass(inner, inputs, self.vocab_size, self.student_head)
                self_scores = score_target(
                    self_head, completions.ids, completions.mask, None, temperature, self.chunk_size
                )
            if self.objective.needs_teacher and self.served_teacher is not None:
                teacher_scores = self.served_teacher.score(  # the teacher's prompts, privileged as the method says
                    [self.prompts.teacher_ids[p] for p in owners], completions.ids, completions.mask,
                    self.objective.top_k_for("teacher"), self.accelerator.device,
                )  # fmt: skip
            elif self.objective.needs_teacher:
                privileged = bool(self.objective.teacher_privileged)
                inputs = self.pass_inputs(self.prompts.teacher_ids, owners, completions, privileged)
                teacher_head = frozen_pass(self.teacher, inputs, self.vocab_size, self.teacher_head)
                teacher_scores = score_target(
                    teacher_head, completions.ids, completions.mask, None, temperature, self.chunk_size
                )
            batches.append(MicroBatch(owners, completions, self_head, teacher_head, self_scores, teacher_scores))
        return batches

    def pass_inputs(self, prompt_ids: list[list[int]], owners: list[int], completions: Completions, privileged: bool):
        """One pass's inputs: `prompt + completion` rows, and for an image-text model each row's image (with its
        boxes drawn for a privileged pass when `data.draw_box` is set)."""
        prompts = [prompt_ids[p] for p in owners]
        inputs = pass_inputs(prompts, completions, self.tokenizer.pad_token_id)
        images = self.prompts.images
        if images is not None:
            from .multimodal import vision_inputs

            pictures = [images.image(p) for p in owners]
            if privileged:
                pictures = [images.privileged(picture, p) for picture, p in zip(pictures, owners)]
            inputs.vision = vision_inputs(self.processor, pictures, inputs.input_ids, [len(p) for p in prompts])
        return inputs

    @property
    def chunk_size(self) -> int | None:
        return self.config.train.chunk_size or None

    def batch_thresholds(self, batches: list[MicroBatch]):
        """Routing thresholds over the whole step, all processes (None for micro-batch scope or no routing)."""
        if self.config.objective.threshold_scope != "batch":
            return None

        def flat(name: str) -> TargetScores | None:
            parts = [getattr(b, f"{name}_scores") for b in batches]
            if parts[0] is None:
                return None
            masks = [b.completions.mask.bool().to(p.token_logprobs.device) for b, p in zip(batches, parts)]
            return TargetScores(
                torch.cat([p.token_logprobs[m] for p, m in zip(parts, masks)]),
                torch.cat([p.entropy[m] for p, m in zip(parts, masks)]),
            )

        self_flat, teacher_flat = flat("self"), flat("teacher")
        reference = self_flat or teacher_flat
        if reference is None:
            return None
        mask = torch.ones_like(reference.token_logprobs, dtype=torch.bool)
        return compute_batch_thresholds(self.objective, self_flat, teacher_flat, mask, self.gather)

    def update(self, batches: list[MicroBatch], thresholds, step: int, metrics: StepMetrics):
        """Student passes with gradient, the objective and backward, micro-batch by micro-batch."""
        total_sequences = sum(len(b.owners) for b in batches)
        rank = self.accelerator.process_index
        generator = torch.Generator().manual_seed((self.config.train.seed * 1_000_003 + step) * 1009 + rank)
        gather = self.gather if self.config.objective.threshold_scope == "batch" else None
        outputs, inner = [], self.inner
        for number, batch in enumerate(batches):
            inputs = self.pass_inputs(self.prompts.student_ids, batch.owners, batch.completions, privileged=False)
            last = number == len(batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.student):
                student = trainable_pass(self.student, inner, inputs, self.vocab_size, self.student_head)
                ids = batch.completions.ids.to(student.hidden.device)
                mask = batch.completions.mask.to(student.hidden.device)
                if batch.self_head is not None:  # the same weights, read live: a sharded head kept since scoring
                    batch.self_head = _same_head(batch.self_head, student)  # may have been freed by now
                output = self.objective_output(student, ids, mask, batch, thresholds, total_sequences, gather, generator)
                self.accelerator.backward(output.loss)
            metrics.add(output.metrics)
            outputs.append(output)
        return outputs

    def objective_output(self, student: Head, ids, mask, batch: MicroBatch, thresholds, sequences, gather, generator):
        if self.config.train.chunk_size == 0:
            logits = {
                name: None if head is None else _logits(head)
                for name, head in (("self", batch.self_head), ("teacher", batch.teacher_head))
            }
            return compute_objective(
                self.objective, _logits(student), ids, mask, logits["self"], logits["teacher"], thresholds,
                sequences, gather, generator,
            )
        return chunked_objective(
            self.objective, student, ids, mask, batch.self_head, batch.teacher_head, batch.self_scores,
            batch.teacher_scores, thresholds, sequences, gather, generator, self.chunk_size,
        )

    def step(self, step: int) -> dict[str, float]:
        timer = time.perf_counter
        start = timer()
        prompts = self.local_prompts()
        ids = [self.prompts.student_ids[p] for p in prompts]
        if self.prompts.images is None:
            rollouts = self.engine.generate(ids, self.config.rollout.num_generations)
        else:  # the student sees the plain image, without the privileged boxes
            images = [self.prompts.images.image(p) for p in prompts]
            rollouts = self.engine.generate(ids, self.config.rollout.num_generations, images=images)
        rolled = timer()
        batches = self.score(prompts, rollouts)
        thresholds = self.batch_thresholds(batches)
        scored = timer()
        metrics = StepMetrics()
        outputs = self.update(batches, thresholds, step, metrics)
        grad_norm, lr = None, self.scheduler.get_last_lr()[0]  # the rate this step uses
        if self.config.optim.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.student.parameters(), self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.sync_weights()
        done = timer()
        lengths = [len(c) for c in rollouts.completion_ids]
        result = metrics.reduce(self.accelerator)
        result["completion_length/mean"] = _reduce(self.accelerator, float(np.mean(lengths)), "mean")
        result["completion_length/max"] = _reduce(self.accelerator, float(np.max(lengths)), "max")
        result["completion/finished"] = _reduce(self.accelerator, float(np.mean(rollouts.finished)), "mean")
        result.update(
            {
                "step": step + 1,
                "lr": lr,
                "time/rollout": rolled - start,
                "time/scoring": scored - rolled,
                "time/update": done - scored,
                "time/step": done - start,
                "tokens_per_second": result.get("tokens", 0.0) / max(done - start, 1e-9),
            }
        )
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        if self.config.logging.sample_every and (step + 1) % self.config.logging.sample_every == 0:
            self.save_samples(step + 1, batches, outputs)
        return result

    # --------------------------------------------------------------------------------------------- outputs

    def save_samples(self, step: int, batches: list[MicroBatch], outputs) -> None:
        """A few completions with each token's regime, gap, q_S, q_T and loss, for token-level reports."""
        if not self.accelerator.is_main_process or not batches:
            return
        batch, output = batches[0], outputs[0]
        lines = []
        for row, prompt in enumerate(batch.owners[: self.config.logging.num_samples]):
            n = int(batch.completions.mask[row].sum())
            ids = batch.completions.ids[row, :n].tolist()
            record = {
                "step": step,
                "prompt": self.prompts.prompts[prompt],
                "privileged_context": self.prompts.privileged[prompt],
                "answer": self.prompts.answers[prompt],
                "completion": self.tokenizer.decode(ids),
                "tokens": [self.tokenizer.decode([t]) for t in ids],
                "token_ids": ids,
                "loss": output.token_loss[row, :n].tolist(),
            }
            if output.regime is not None:
                record["regime"] = [REGIMES[r] if r >= 0 else None for r in output.regime[row, :n].tolist()]
            if output.gap is not None:
                record["gap"] = output.gap[row, :n].tolist()
            for name, key in (("self_scores", "q_self"), ("teacher_scores", "q_teacher")):
                scores = getattr(batch, name)
                if scores is not None:
                    record[key] = scores.token_logprobs[row, :n].exp().tolist()
            lines.append(json.dumps(record))
        with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as handle:
            handle.write("\n".join(lines) + "\n")

    def log(self, result: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as handle:
                handle.write(json.dumps(result) + "\n")
        if self.config.logging.report_to:
            self.accelerator.log({k: v for k, v in result.items() if k != "step"}, step=int(result["step"]))

    def run(self, evaluate: Callable[[int, "Trainer"], dict[str, float]] | None = None, evaluate_every: int = 0):
        """Train to `train.steps`. `evaluate(step, trainer)`, called at step 0, every `evaluate_every` steps and
        at the end, returns metrics (e.g. held-out accuracy) that are logged with that step's line."""
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as handle:
                handle.write(to_yaml(config))
        if config.logging.report_to:
            accelerator.init_trackers(
                config.logging.project,
                config=_flat_config(config),
                init_kwargs={"wandb": {"name": config.logging.run_name or os.path.basename(self.run_dir)}},
            )
        bar = tqdm(
            total=config.train.steps,
            initial=self.start_step,
            disable=not (accelerator.is_main_process and config.logging.progress_bar),
            desc="dopd",
        )
        result: dict[str, float] = {}
        if evaluate is not None and self.start_step == 0:
            self.log({"step": 0, **evaluate(0, self)})
        for step in range(self.start_step, config.train.steps):
            result = self.step(step)
            last = step + 1 == config.train.steps
            if evaluate is not None and (last or (evaluate_every and (step + 1) % evaluate_every == 0)):
                result.update(evaluate(step + 1, self))
            if (step + 1) % config.logging.log_every == 0 or last:
                self.log(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.4f}", step=step + 1)
            every = config.checkpoint.save_every
            if every and (step + 1) % every == 0 and step + 1 < config.train.steps:
                ckpt.save(self, step + 1)
        bar.close()
        final_dir = ckpt.save_final(self)
        if config.logging.report_to:
            accelerator.end_training()
        return TrainResult(self.run_dir, final_dir, config.train.steps, result)


def _same_head(frozen: Head, live: Head) -> Head:
    bias = None if live.bias is None else live.bias.detach()
    return Head(frozen.hidden, live.weight.detach(), bias)


def _logits(head: Head) -> torch.Tensor:
    logits = head.hidden @ head.weight.T
    return logits if head.bias is None else logits + head.bias


def _reduce(accelerator, value: float, reduction: str) -> float:
    """A per-process number reduced over processes (`mean` or `max`)."""
    if accelerator.num_processes == 1:
        return value
    gathered = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
    return float(gathered.max() if reduction == "max" else gathered.mean())


def _flat_config(config: Config) -> dict:
    from .config import to_dict

    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: Config) -> TrainResult:
    """Train a student as `config` says; returns where the run and the final model are."""
    return Trainer(config).run()
