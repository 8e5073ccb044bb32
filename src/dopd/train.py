"""The on-policy distillation loop on accelerate; over 450 lines: one class that reads downward (see the end).

One training step is docs/method.md, "Setting".

Each optimizer step:
  1. rollouts: the student samples `num_generations` completions of each of its prompts, without privileged input
     (for `sft`, the teacher samples them); with `objective.reward`, each completion's reward and its advantage
     over its prompt's rollouts (rewards.py);
  2. scoring: per micro-batch, the privileged student (no gradient, with the weights of `objective.self_weights`)
     and the teacher (frozen) score the completions on their own prompts; every score is checked to be finite;
  3. the cuts (routing thresholds, EOPD's entropy cut) over the whole step's tokens, gathered over all processes
     (or per micro-batch);
  4. update: per micro-batch, the student's pass with gradient, the objective (chunked by default) and backward,
     with the loss averaged per sequence over the step's sequences, so accumulation gives the batch mean;
     then clipping, AdamW, the schedule, and the privileged self's copy.
What a run needs is built in `__init__` (loading.py, data.py, engines.py); what it writes goes to the run
directory (run_dir.py, checkpoint.py).

Over 450 lines as the formatter lays them out (one argument a line in the longer calls): the loop is one class
that reads downward, building a run, one step's four stages, then the run; every stage's work is in the modules
it calls.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import checkpoint as ckpt
from . import run_dir
from .config import Config, ConfigError, flat_dict, resolve, to_yaml, validate
from .data import PromptOrder, load_prompt_set
from .diagnostics import CollapseWatch, NonFiniteError, check_finite
from .engines import check_engine, configure_deepspeed, frozen_head, prepare_teacher
from .kernels import chunked_objective, score_target
from .loading import check_sources, common_vocab_size, load_processing, load_student
from .lora import require_peft
from .metrics import StepMetrics, completion_metrics
from .objectives import build_objective
from .pair_checks import check_teacher_fidelity
from .plain import compute_objective
from .probe import Probe
from .rewards import Verifier, step_rewards
from .rollout import end_of_sequence_ids, make_engine
from .routing import make_gather
from .scoring import frozen_pass, micro_batches, pass_inputs, trainable_pass
from .self_weights import SelfWeights
from .served_teacher import check_server as check_served_teacher
from .served_teacher import connect as connect_served_teacher
from .teachers import TeacherSet, cuts_for, generate_by_teacher, split_by_teacher, step_cuts_by_teacher
from .terms import Cuts, LossScope
from .types import Completions, Head, MicroBatch, Rollouts
from .validation import Validation

logger = logging.getLogger("dopd")


@dataclass
class TrainResult:
    run_dir: str
    final_dir: str
    steps: int
    last_metrics: dict = field(default_factory=dict)


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


class Trainer:
    """Holds the models, data and state of one run; `run()` trains. Built by `train(config)`."""

    def __init__(self, config: Config, accelerator=None, probe: Probe | None = None):
        from accelerate import Accelerator

        self.config, c = config, config
        self.probe = probe or Probe()  # timing hook for benchmarks (probe.py)
        validate(resolve(config))  # a config built in code gets the defaults load_config fills
        self.objective = build_objective(config.objective)
        restart = run_dir.check_run_dir(config)  # an interrupted run that never reached a checkpoint: start again
        self.accelerator = accelerator or Accelerator(
            cpu=c.train.device == "cpu",
            log_with=list(c.logging.report_to) or None,
            project_dir=c.logging.output_dir,
            mixed_precision=c.train.mixed_precision,
        )
        check_engine(config, self.accelerator)  # launch settings and optional packages before any model loads
        if c.rollout.backend == "vllm":
            from .rollout.vllm import require_vllm

            require_vllm(self.accelerator.device)
        if c.model.lora.enabled:
            require_peft()
        check_sources(config)  # every path and hub name, before anything loads
        if c.train.prompts_per_step % self.accelerator.num_processes:
            raise ConfigError(
                f"train.prompts_per_step = {c.train.prompts_per_step} must be divisible by the number "
                f"of processes ({self.accelerator.num_processes})"
            )
        self.run_dir = c.logging.output_dir
        # Each process samples its own completions: its own random stream (process 0 keeps the plain seed).
        seed_everything(c.train.seed + 1_000_003 * self.accelerator.process_index)
        self.tokenizer, self.processor = load_processing(config)  # processor: an image-text model's, else None
        self.teachers = TeacherSet(config)  # one per name of model.teachers, or the one model.teacher
        teacher_tokenizers = self.teachers.check_fidelity(check_teacher_fidelity, self.tokenizer)  # None: student's
        teacher_tokenizer = teacher_tokenizers if self.teachers.several else teacher_tokenizers[None]
        self.prompts = load_prompt_set(config, self.objective, self.tokenizer, self.processor, teacher_tokenizer)
        self.validation = Validation.prepare(config, self.tokenizer)  # the eval section's held-out set, or None
        for teacher in self.teachers:  # before any model loads
            check_served_teacher(teacher.config, self.objective, self.tokenizer)
        self.verifier = Verifier(c.objective.reward, self.prompts) if self.objective.has_reward else None
        resume_dir = ckpt.latest(self.run_dir) if c.checkpoint.resume else None
        student = load_student(config, resume_dir, self.processor is not None)
        teachers = self.teachers.load(self.probe.load_teacher, self.objective.needs_teacher_model)
        self.vocab_size = min(common_vocab_size(student, t, self.tokenizer) for t in teachers or [None])
        self.teachers.connect(lambda view: connect_served_teacher(view, self.objective, self.vocab_size, self.is_main))
        try:
            self.objective.check_top_k(self.vocab_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        student.train()
        optimizer, self.scheduler = build_optimizer(student, config)
        # The schedule is stepped once per optimizer step by us: accelerate's prepared scheduler would step once per
        # process, running the schedule num_processes times faster.
        configure_deepspeed(config, self.accelerator)
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        # Whole copies of frozen heads where the engine shards them (ZeRO-3; the student's is frozen under LoRA).
        vocab = self.vocab_size
        self.teachers.prepare(
            lambda t: prepare_teacher(t, self.accelerator), lambda t: frozen_head(t, vocab, self.accelerator)
        )
        self.student_head_weights = frozen_head(self.inner, vocab, self.accelerator) if c.model.lora.enabled else None
        self.order = PromptOrder(len(self.prompts), c.train.seed, c.data.shuffle)
        self.self_weights = SelfWeights.for_run(self.objective, self.inner, log=self.is_main)
        self.collapse = CollapseWatch()
        self.start_step = ckpt.load_state(resume_dir, self.checkpoint_state()) if resume_dir else 0
        if c.checkpoint.resume and self.is_main:
            run_dir.truncate_after(self.run_dir, self.start_step)
        student_model = lambda: self.inner  # the engine reads the live student module
        models = (student_model, self.teacher, self.tokenizer, self.vocab_size, self.processor)
        self.engine = make_engine(config, self.objective, self.accelerator, *models)
        self.teacher_engines = None  # several teachers that sample (sft): each row's own samples its completions
        if self.teachers.several and self.objective.rollout_model == "teacher":
            make = lambda module: make_engine(config, self.objective, self.accelerator, models[0], module, *models[2:])
            self.teacher_engines = {t.name: make(t.module) for t in self.teachers}
        # The ids whose probability is a metric (the loss leaves out any beyond the vocabulary both heads score).
        self.eos_ids = tuple(sorted(end_of_sequence_ids(self.tokenizer, self.inner)))
        self.gather = make_gather(self.accelerator)
        if self.is_main and not resume_dir:
            run_dir.init_run_dir(config, restart)
        self.accelerator.wait_for_everyone()

    @property
    def teacher(self):
        """The frozen local teacher of a one-teacher run (None: served, or several: `self.teachers`)."""
        return None if self.teachers.several else self.teachers[None].module

    @property
    def teacher_head_weights(self):
        return None if self.teachers.several else self.teachers[None].head_weights

    @property
    def served_teacher(self):
        return None if self.teachers.several else self.teachers[None].served

    @property
    def inner(self):
        return self.accelerator.unwrap_model(self.student)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def checkpoint_state(self) -> ckpt.CheckpointState:
        processing = self.processor or self.tokenizer  # an image-text student's processor holds its tokenizer
        return ckpt.CheckpointState(
            self.config,
            self.accelerator,
            self.student,
            processing,
            self.optimizer,
            self.scheduler,
            self.order,
            self.self_weights,
            self.collapse,
        )

    # -------------------------------------------------------------------------------------------- one step

    def local_prompts(self) -> list[int]:
        """This process's share of the step's prompts (every process advances the same global order)."""
        indices = self.order.take(self.config.train.prompts_per_step)
        share = len(indices) // self.accelerator.num_processes
        rank = self.accelerator.process_index
        return indices[rank * share : (rank + 1) * share]

    def rollouts(self, prompts: list[int], step: int) -> Rollouts:
        ids = [self.prompts.student_ids[p] for p in prompts]
        pictures = self.prompts.images  # the student sees the plain image, without the privileged boxes
        images = [pictures.image(p) for p in prompts] if pictures is not None else None
        try:
            if self.teacher_engines is not None:
                names, count = self.prompts.teachers, self.config.rollout.num_generations
                return generate_by_teacher(self.teacher_engines, names, prompts, ids, count, images)
            return self.engine.generate(ids, self.config.rollout.num_generations, images)
        except RuntimeError as error:
            if "probability tensor contains" in str(error):  # torch.multinomial on a distribution with NaN or inf
                sampler = "teacher" if self.objective.rollout_model == "teacher" else "student"
                first = str(error).splitlines()[0]
                raise NonFiniteError(
                    f"step {step + 1}: sampling from the {sampler} failed, its probabilities hold "
                    f"NaN or inf ({first}); {NonFiniteError.FIX}"
                ) from None
            raise

    def micro_batches(self, prompts: list[int], rollouts: Rollouts) -> list[tuple[list[int], str | None]]:
        """Rollout indices of each micro-batch and the teacher of its rows (`scoring.micro_batches`, one teacher's
        rollouts at a time: `teachers.split_by_teacher`; the loss is the same either way)."""
        prompt_sets = [self.prompts.student_ids]
        if self.objective.needs_self:
            prompt_sets.append(self.prompts.self_ids)
        if self.objective.needs_teacher:
            prompt_sets.append(self.prompts.teacher_ids)
        t = self.config.train
        size, budget = t.micro_batch_size, t.max_tokens_per_micro_batch
        make = lambda indices: micro_batches(prompts, rollouts, prompt_sets, size, budget, indices)
        return split_by_teacher(self.prompts.teachers, prompts, rollouts, make)

    def score(self, prompts: list[int], rollouts: Rollouts, step: int = 0, rewards=(None, None)) -> list[MicroBatch]:
        """The no-gradient passes of every micro-batch: privileged student and teacher, their scores checked to be
        finite (`step`, counted from 0, names where they were not); `rewards`: the step's rewards and advantages
        [N] (None without objective.reward), split by micro-batch."""
        pad = self.tokenizer.pad_token_id
        # No top-K here (top_k=None): routing reads only the sampled token, and the loss computes a target's top-K
        # for just the tokens whose Top-K term applies (LH: teacher; LL, HS: self), from the heads kept here.
        temperature, chunk_size = self.config.objective.temperature, self.config.train.chunk_size
        inner = self.inner  # unwrapping walks the engine's wrappers: once per step, not per micro-batch
        batches = []
        for sequences, teacher_name in self.micro_batches(prompts, rollouts):
            teacher = self.teachers[teacher_name]  # the one teacher of this micro-batch's rows
            prompt_rows = [prompts[rollouts.prompt_index[i]] for i in sequences]
            completions = Completions.from_lists([rollouts.completion_ids[i] for i in sequences], pad)
            self_head = teacher_head = self_scores = teacher_scores = None
            if self.objective.needs_self:
                inputs = self.pass_inputs(
                    self.prompts.self_ids, prompt_rows, completions, bool(self.config.objective.self_privileged)
                )
                with self.self_weights.swapped_in(), self.probe.section("self_pass"):
                    self_head = frozen_pass(inner, inputs, self.vocab_size, self.student_head_weights)
                with self.probe.section("self_score_target"):
                    self_scores = score_target(
                        self_head, completions.ids, completions.mask, None, temperature, chunk_size
                    )
            if self.objective.needs_teacher and teacher.served is not None:
                teacher_scores = teacher.served.score(  # the teacher's prompts, privileged as the method says
                    [self.prompts.teacher_ids[p] for p in prompt_rows],
                    completions.ids,
                    completions.mask,
                    self.objective.top_k_for("teacher"),
                    self.accelerator.device,
                )
            elif self.objective.needs_teacher:
                inputs = self.pass_inputs(
                    self.prompts.teacher_ids, prompt_rows, completions, bool(self.objective.teacher_privileged)
                )
                with self.probe.section("teacher_pass"):
                    teacher_head = frozen_pass(teacher.module, inputs, self.vocab_size, teacher.head_weights)
                with self.probe.section("teacher_score_target"):
                    teacher_scores = score_target(
                        teacher_head, completions.ids, completions.mask, None, temperature, chunk_size
                    )
            for name, scores in (("self", self_scores), ("teacher", teacher_scores)):
                if scores is not None:  # a NaN score would route every token to one regime, silently
                    check_finite(name, step, scores.token_logprobs, completions.mask)
            batch = MicroBatch(prompt_rows, completions, self_head, teacher_head, self_scores, teacher_scores)
            batch.teacher = teacher_name
            batch.rewards, batch.advantages = (None if r is None else r[sequences] for r in rewards)
            batches.append(batch)
        return batches

    def pass_inputs(
        self, prompt_ids: list[list[int]], prompt_rows: list[int], completions: Completions, privileged: bool
    ):
        """One pass's inputs: `prompt + completion` rows (`prompt_rows`: each sequence's row in the prompt set), and
        for an image-text model each row's image (with its boxes drawn for a privileged pass when `data.draw_box`
        is set)."""
        prompts = [prompt_ids[p] for p in prompt_rows]
        inputs = pass_inputs(prompts, completions, self.tokenizer.pad_token_id)
        images = self.prompts.images
        if images is not None:
            from .multimodal import vision_inputs

            pictures = [images.image(p) for p in prompt_rows]
            if privileged:
                pictures = [images.privileged(picture, p) for picture, p in zip(pictures, prompt_rows)]
            inputs.vision = vision_inputs(self.processor, pictures, inputs.input_ids, [len(p) for p in prompts])
        return inputs

    def batch_cuts(self, batches: list[MicroBatch]) -> Cuts | dict[str, Cuts] | None:
        """The cuts (routing thresholds, EOPD's entropy cut) over the whole step and all processes; with several
        teachers, by teacher name (each teacher's tokens apart, or pooled: `teachers.step_cuts_by_teacher`). None
        for the micro-batch scope, where each loss call cuts its own tokens."""
        if self.config.objective.threshold_scope == "micro_batch":
            return None
        cuts = step_cuts_by_teacher(self.objective, batches, self.gather, self.teachers.names)
        return cuts if self.teachers.several else cuts[None]

    def update(self, batches: list[MicroBatch], cuts: Cuts | dict | None, step: int, metrics: StepMetrics):
        """Student passes with gradient, the objective and backward, micro-batch by micro-batch, in the step's
        `LossScope`: its cuts, the mean over all its sequences, its dropping generator and end-of-sequence ids."""
        rank = self.accelerator.process_index
        generator = torch.Generator().manual_seed((self.config.train.seed * 1_000_003 + step) * 1009 + rank)
        scope = LossScope(
            num_sequences=sum(len(b.prompt_rows) for b in batches),
            gather=self.gather if self.config.objective.threshold_scope != "micro_batch" else None,
            generator=generator,
            eos_ids=self.eos_ids,
        )
        outputs, inner = [], self.inner
        for number, batch in enumerate(batches):
            inputs = self.pass_inputs(self.prompts.student_ids, batch.prompt_rows, batch.completions, privileged=False)
            last = number == len(batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.student):
                with self.probe.section("student_pass"):
                    student = trainable_pass(self.student, inner, inputs, self.vocab_size, self.student_head_weights)
                mask = batch.completions.mask.to(student.hidden.device)
                check_finite("student", step, student.hidden.detach(), mask)
                if batch.self_head is not None and self.self_weights.is_live:
                    # The same weights, read live: a sharded head kept since scoring may have been freed by now.
                    batch.self_head = batch.self_head.with_weights_of(student)
                with self.probe.section("loss"):
                    ids = batch.completions.ids.to(student.hidden.device)
                    own = replace(scope, cuts=cuts_for(cuts, batch.teacher))  # its teacher's
                    output = self.objective_output(student, ids, mask, batch, own)
                check_finite("loss", step, output.loss.detach())
                self.accelerator.backward(output.loss)
            metrics.add(output.metrics, None if batch.teacher is None else f"teacher/{batch.teacher}")
            outputs.append(output)
        return outputs

    def objective_output(self, student: Head, ids, mask, batch: MicroBatch, scope: LossScope):
        if self.config.train.loss_form == "plain":
            return compute_objective(
                self.objective,
                student.logits(),
                ids,
                mask,
                scope=scope,
                self_logits_BTV=None if batch.self_head is None else batch.self_head.logits(),
                teacher_logits_BTV=None if batch.teacher_head is None else batch.teacher_head.logits(),
                advantages_B=batch.advantages,
            )
        return chunked_objective(
            self.objective,
            student,
            ids,
            mask,
            scope=scope,
            chunk_size=self.config.train.chunk_size,
            self_head=batch.self_head,
            teacher_head=batch.teacher_head,
            self_scores=batch.self_scores,
            teacher_scores=batch.teacher_scores,
            advantages_B=batch.advantages,
        )

    def step(self, step: int) -> dict[str, float]:
        timer = time.perf_counter
        start = timer()
        prompts = self.local_prompts()
        rollouts = self.rollouts(prompts, step)
        *rewards, reward_metrics = step_rewards(
            self.verifier, prompts, rollouts, self.tokenizer, step, self.accelerator
        )
        rolled = timer()
        batches = self.score(prompts, rollouts, step, rewards)
        cuts = self.batch_cuts(batches)
        scored = timer()
        metrics = StepMetrics()
        outputs = self.update(batches, cuts, step, metrics)
        grad_norm, lr = None, self.scheduler.get_last_lr()[0]  # the rate this step uses
        if self.config.optim.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.student.parameters(), self.config.optim.max_grad_norm)
            check_finite("gradient norm", step, torch.as_tensor(grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.self_weights is not None:
            self.self_weights.after_step(step + 1)
        self.engine.sync_weights()
        done = timer()
        result = metrics.reduce(self.accelerator) | reward_metrics
        result.update(
            completion_metrics(self.accelerator, rollouts, self.tokenizer, self.config.logging.answer_pattern)
        )
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
        result.update(self.collapse.update(result))
        if self.config.logging.sample_every and (step + 1) % self.config.logging.sample_every == 0 and self.is_main:
            firsts = {}  # each teacher's first micro-batch: the token view of every teacher
            for batch, output in zip(batches, outputs):
                firsts.setdefault(batch.teacher, (batch, output))
            records = [
                record
                for batch, output in firsts.values()
                for record in run_dir.sample_records(
                    step + 1, batch, output, self.prompts, self.tokenizer, self.config.logging.num_samples
                )
            ]
            run_dir.append_jsonl(os.path.join(self.run_dir, "samples.jsonl"), records)
        return result

    # -------------------------------------------------------------------------------------------------- run

    def log(self, result: dict[str, float]) -> None:
        if self.is_main:
            run_dir.append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), [result])
        if self.config.logging.report_to:
            self.accelerator.log({k: v for k, v in result.items() if k != "step"}, step=int(result["step"]))

    def run(self, evaluate: Callable[[int, Trainer], dict[str, float]] | None = None, evaluate_every: int = 0):
        """Train to `train.steps`. `evaluate(step, trainer)`, called at step 0, every `evaluate_every` steps and
        at the end, returns metrics (e.g. held-out accuracy) that are logged with that step's line."""
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        if self.is_main:
            run_dir.write_config(self.run_dir, to_yaml(config))
        if config.logging.report_to:
            name = config.logging.run_name or os.path.basename(self.run_dir)
            accelerator.init_trackers(
                config.logging.project, config=flat_dict(config), init_kwargs={"wandb": {"name": name}}
            )
        bar = tqdm(
            total=config.train.steps,
            initial=self.start_step,
            desc="dopd",
            disable=not (self.is_main and config.logging.progress_bar),
        )
        result: dict[str, float] = {}
        if evaluate is not None and self.start_step == 0 and (measured := evaluate(0, self)):
            self.log({"step": 0, **measured})
        for step in range(self.start_step, config.train.steps):
            result = self.step(step)
            last = step + 1 == config.train.steps
            measured = evaluate is not None and (last or (evaluate_every and (step + 1) % evaluate_every == 0))
            if measured:
                result.update(evaluate(step + 1, self))
            if (step + 1) % config.logging.log_every == 0 or last or measured:
                self.log(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.3g}", step=step + 1)
            every = config.checkpoint.save_every
            if every and (step + 1) % every == 0 and step + 1 < config.train.steps:
                ckpt.save(self.checkpoint_state(), step + 1)
        bar.close()
        final_dir = ckpt.save_final(self.checkpoint_state())
        if config.logging.report_to:
            accelerator.end_training()
        return TrainResult(self.run_dir, final_dir, config.train.steps, result)


def train(config: Config) -> TrainResult:
    """Train (and validate) a student as `config` says; returns where the run and the final model are."""
    trainer = Trainer(config)
    return trainer.run(trainer.validation, config.eval.every)
