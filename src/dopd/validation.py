"""Validation inside `dopd train` (the `eval` section; docs/evaluation.md): before the first step, every
`eval.every` steps and after the last, the student answers held-out prompts and `dopd eval`'s checkers score them.

The prompts are read, their answers checked and rendered when the trainer starts, before any model loads, so a
data set without an answer column stops the run at once. Sampling is `evaluate.sample_completions` over the run's
own engine: transformers generate on the live student, or the run's vLLM engine with the validation's decoding
settings. Under several processes each takes an equal share of the prompts; the verdicts are gathered once and
every process computes the same accuracy and pass@k, logged as `eval/validation_accuracy` and
`eval/validation_pass@k`. With `checkpoint.keep_best` the model of the best accuracy so far is written to `best/`
(`checkpoint.save_best`); ties keep the earlier step. The random state of training is left as it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .answers import default_ks, make_checker, summarize
from .config import Config, ConfigError, DataConfig, EvalConfig, RolloutConfig

# The names errors give the eval section's data settings (`data.load_rows`, `data.check_columns`).
EVAL_KEYS = {
    "path": "eval.path",
    "name": "eval.name",
    "split": "eval.split",
    "max_samples": "eval.max_prompts",
    "prompt_column": "eval.prompt_column",
    "answer_column": "eval.answer_column",
    "privileged_column": "data.privileged_column",
}


def eval_data(config: Config) -> DataConfig:
    """The held-out set as data settings: the eval section's source and columns, the run's prompt rendering."""
    e = config.eval
    return DataConfig(
        path=e.path,
        name=e.name,
        split=e.split,
        prompt_column=e.prompt_column,
        answer_column=e.answer_column,
        max_samples=e.max_prompts,
        use_chat_template=config.data.use_chat_template,
    )


def eval_sampling(config: Config) -> RolloutConfig:
    """The validation's decoding settings, on the run's rollout backend."""
    e = config.eval
    return RolloutConfig(
        backend=config.rollout.backend,
        num_generations=e.samples,
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        top_p=e.top_p,
        top_k=e.top_k,
        batch_size=e.batch_size,
    )


def improves(accuracy: float, best: float | None) -> bool:
    """Whether a validation accuracy replaces the best so far (a tie keeps the earlier model)."""
    return best is None or accuracy > best


def share(count: int, rank: int, processes: int) -> list[int]:
    """Prompt indices of one process: every `processes`-th from `rank`, padded with the process's first prompt to
    the same length on every process (a sharded model's generate is collective: every process decodes as many
    batches); `Validation.measure` drops the padding before scoring."""
    mine = list(range(rank, count, processes))
    length = -(-count // processes)
    return mine + [mine[0] if mine else 0] * (length - len(mine))


@dataclass
class Validation:
    """The held-out prompts rendered for the student, their checker, and the best accuracy so far."""

    config: EvalConfig
    prompt_ids: list[list[int]]
    checker: Any
    keep_best: bool = False
    best: dict = field(default_factory=dict)  # {"step", "accuracy"} of the model in best/

    @classmethod
    def prepare(cls, config: Config, tokenizer) -> Validation | None:
        """Read and check the held-out set (None when `eval.every` is 0). Called by the trainer before any model
        loads; every problem is one line naming the eval key."""
        if not config.eval.every:
            return None
        from .data import check_columns, load_rows, require_column
        from .loading import check_source
        from .prompts import render_prompt

        data = eval_data(config)
        check_source(data.path, "eval.path", "dataset")
        dataset = load_rows(data, EVAL_KEYS)
        check_columns(dataset, data, False, EVAL_KEYS)
        answers = list(require_column(dataset, data.answer_column, "eval.answer_column", data.path))
        prompts = list(dataset[data.prompt_column])
        extra = {column: list(dataset[column]) for column in ("completion",) if column in dataset.column_names}
        rows = [{column: values[i] for column, values in extra.items()} for i in range(len(answers))]
        try:
            checker = make_checker(config.eval.checker)
            checker.prepare(answers, prompts, rows)
            texts = [render_prompt(tokenizer, p, None, use_chat_template=data.use_chat_template) for p in prompts]
        except ValueError as error:
            message = str(error).replace("--checker", "eval.checker").replace("--answer-column", "eval.answer_column")
            raise ConfigError(message) from None
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        best = read_best(config.logging.output_dir) if config.checkpoint.resume else {}
        return cls(config.eval, prompt_ids, checker, config.checkpoint.keep_best, best)

    def measure(self, trainer) -> dict[str, float]:
        """Sample this process's share, check it, gather every verdict once; the metrics of the whole set."""
        import torch

        from .evaluate import sample_completions

        accelerator, sampling = trainer.accelerator, eval_sampling(trainer.config)
        mine = share(len(self.prompt_ids), accelerator.process_index, accelerator.num_processes)
        ids = [self.prompt_ids[i] for i in mine]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # training's random stream stays as it was
            if sampling.backend == "vllm":
                with trainer.engine.sampling(sampling) as engine:
                    completions, _ = sample_completions(engine, trainer.tokenizer, ids, sampling, self.config.seed)
            else:
                from .rollout.hf import HFRollout

                engine = HFRollout(lambda: trainer.inner, trainer.tokenizer, sampling, trainer.vocab_size)
                completions, _ = sample_completions(engine, trainer.tokenizer, ids, sampling, self.config.seed)
        own = len(range(accelerator.process_index, len(self.prompt_ids), accelerator.num_processes))
        verdicts = [(i, [self.checker.score(i, text) for text in completions[n]]) for n, i in enumerate(mine[:own])]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            verdicts = gather_object(verdicts)
        correct = [row for _, row in sorted(verdicts, key=lambda item: item[0])]
        summary = summarize(correct, default_ks(self.config.samples))
        metrics = {"eval/validation_accuracy": summary["accuracy"]}
        if self.config.samples > 1:
            metrics.update({f"eval/validation_pass@{k}": value for k, value in summary["pass_at_k"].items()})
        return metrics

    def __call__(self, step: int, trainer) -> dict[str, float]:
        """The trainer's evaluation hook (`Trainer.run`): the metrics of `step` (0: before training), and the best
        model kept."""
        if step == 0 and not self.config.before_train:
            return {}
        metrics = self.measure(trainer)
        accuracy = metrics["eval/validation_accuracy"]
        if self.keep_best and improves(accuracy, self.best.get("accuracy")):
            from .checkpoint import save_best

            self.best = {"step": step, "accuracy": accuracy}
            save_best(trainer.checkpoint_state(), self.best)
        if self.best:
            metrics["eval/best_step"] = self.best["step"]
        return metrics


def read_best(run_dir: str) -> dict:
    """The step and accuracy of a run's best model ({} when it has none yet)."""
    path = os.path.join(run_dir, "best", "best.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
