"""The lab's teacher/student pair: tiny Qwen3 models pretrained here by SFT, cached, and their properties measured.

The pair must show what DOPD needs (spec, "Setting"): a teacher clearly better than the student without
privileged input, privileged input that both models read (otherwise the privileged-student pass equals the plain
one), and a student with headroom. Tiny models read privileged input only when reading it pays off during
pretraining (lab notes), so the SFT data mixes the privileged kinds on problems (nested expressions) that the
models cannot solve dependably without them. Student and teacher share tokenizer and data; the student has fewer
and narrower layers and fewer steps.

`load_or_build_pair(config)` returns the pair shipped in `dopd/lab/pretrained/<task>` when `config` is the shipped
one, else a cached build (`$DOPD_CACHE` or `~/.cache/dopd/lab`, one directory per config hash), else trains it and
writes it atomically. `python -m dopd.lab.models --help` rebuilds and measures a pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from dopd.lab.evaluation import evaluate, render_lab_prompt
from dopd.lab.tasks import PRIVILEGED_KINDS, Task, get_task
from dopd.lab.tokenizer import build_tokenizer

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
EVAL_SEED = 12345  # held-out prompts: measure_properties draws from this seed, pretraining skips these prompts
N_HELDOUT = 2000
# Property thresholds (task brief): (a) teacher - student without privileged input; (b) gain from privilege.
MIN_TEACHER_GAP = 0.25
MIN_PRIVILEGE_GAIN = 0.10
REQUIRED_PRIVILEGE_KINDS = ("hints", "solution")
COMPLETE_MARKER = "lab_pair.json"


@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128


@dataclass(frozen=True)
class LabPairConfig:
    """Everything that decides the pretrained pair; its hash names the cache directory."""

    task: str = "order"
    teacher: ModelSize = ModelSize(layers=3, hidden=64, intermediate=192)
    student: ModelSize = ModelSize(layers=2, hidden=48, intermediate=128)
    teacher_steps: int = 2400
    student_steps: int = 2400  # at 1,500 steps the student read the hints too weakly (run o1, docs/lab_design.md)
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # Fractions of pretraining examples shown with each privileged kind.
    kind_mix: tuple[tuple[str, float], ...] = (("none", 0.4), ("answer", 0.1), ("hints", 0.3), ("solution", 0.2))
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind_mix"] = [list(item) for item in self.kind_mix]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabPairConfig":
        d = dict(d)
        d["teacher"] = ModelSize(**d["teacher"])
        d["student"] = ModelSize(**d["student"])
        d["kind_mix"] = tuple((str(k), float(w)) for k, w in d["kind_mix"])
        return cls(**d)

    def config_hash(self) -> str:
        """Stable across processes and Python versions: sha256 of the sorted JSON of the fields and of the
        task's parameters (so that changing a task's defaults also rebuilds)."""
        task_params = {k: v for k, v in vars(get_task(self.task)).items() if not k.startswith("_")}
        fields = {**self.to_dict(), "task_params": task_params}
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class LabPair:
    teacher: Any
    student: Any
    tokenizer: Any
    path: Path
    properties: dict[str, Any] = field(default_factory=dict)
    config: LabPairConfig | None = None
    built: bool = False  # True when this call trained the pair, False when it was loaded


def make_model(size: ModelSize, tokenizer: Any, seed: int) -> Qwen3ForCausalLM:
    if size.hidden % size.heads or size.heads % size.kv_heads:
        raise ValueError(f"model size {size}: hidden must divide by heads and heads by kv_heads")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def sft_batch(tokenizer: Any, examples: list, kinds: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels; the loss falls on completion tokens and eos only."""
    rows = []
    for example, kind in zip(examples, kinds):
        prompt_ids = tokenizer(render_lab_prompt(tokenizer, example, kind), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, completion_ids))
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pretrain(
    model: Any, tokenizer: Any, task: Task, config: LabPairConfig, steps: int, seed: int, log: Any = None
) -> list[dict[str, float]]:
    """Plain SFT with AdamW, linear warmup then cosine decay; returns the logged losses."""
    rng = random.Random(seed)
    heldout = {ex.prompt for ex in task.examples(N_HELDOUT, EVAL_SEED)}
    kinds, weights = zip(*config.kind_mix)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    history, running, start = [], 0.0, time.time()
    for step in range(steps):
        examples = []
        while len(examples) < config.batch_size:
            example = task.sample(rng)
            if example.prompt not in heldout:
                examples.append(example)
        batch = sft_batch(tokenizer, examples, rng.choices(kinds, weights, k=len(examples)))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            n = (step % 100) + 1
            history.append({"step": step + 1, "loss": running / n, "seconds": round(time.time() - start, 1)})
            running = 0.0
            if log:
                log(f"  step {step + 1}/{steps} loss {history[-1]['loss']:.4f} ({history[-1]['seconds']} s)")
    model.eval()
    return history


def measure_properties(
    pair: LabPair, task: Task | str | None = None, n_eval: int = 300, seed: int = EVAL_SEED, batch_size: int = 150
) -> dict[str, Any]:
    """Teacher and student accuracy without and with each privileged kind on held-out prompts, and the checks.

    checks["a_teacher_gap"]: teacher answer accuracy without privileged input >= student's + MIN_TEACHER_GAP.
    checks["b_privilege_helps"]: for "hints" and "solution", both models gain >= MIN_PRIVILEGE_GAIN.
    """
    task = get_task(task if task is not None else pair.config.task)
    examples = task.examples(n_eval, seed)
    accuracy: dict[str, dict[str, dict[str, float]]] = {}
    for role, model in (("teacher", pair.teacher), ("student", pair.student)):
        accuracy[role] = {}
        for kind in PRIVILEGED_KINDS:
            result = evaluate(model, pair.tokenizer, task, examples, kind=kind, batch_size=batch_size)
            accuracy[role][kind] = {"answer_accuracy": result["answer_accuracy"], "full_match": result["full_match"]}
    checks = check_properties(accuracy)
    return {"task": task.name, "n_eval": n_eval, "eval_seed": seed, "accuracy": accuracy, "checks": checks}


def check_properties(accuracy: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    def acc(role: str, kind: str) -> float:
        return accuracy[role][kind]["answer_accuracy"]

    gap = acc("teacher", "none") - acc("student", "none")
    gains = {
        f"{role}_{kind}_gain": round(acc(role, kind) - acc(role, "none"), 4)
        for role in ("teacher", "student")
        for kind in PRIVILEGED_KINDS[1:]
    }
    helps = all(
        gains[f"{role}_{kind}_gain"] >= MIN_PRIVILEGE_GAIN
        for role in ("teacher", "student")
        for kind in REQUIRED_PRIVILEGE_KINDS
    )
    return {
        "teacher_minus_student": round(gap, 4),
        "a_teacher_gap": gap >= MIN_TEACHER_GAP,
        "b_privilege_helps": helps,
        **gains,
        "thresholds": {"min_teacher_gap": MIN_TEACHER_GAP, "min_privilege_gain": MIN_PRIVILEGE_GAIN},
    }


def default_cache_root() -> Path:
    return Path(os.environ.get("DOPD_CACHE") or Path.home() / ".cache" / "dopd").expanduser() / "lab"


def shipped_config(task: str) -> LabPairConfig | None:
    """The config of the pair shipped for `task`, or None when none is shipped."""
    marker = PRETRAINED_DIR / task / COMPLETE_MARKER
    if not marker.exists():
        return None
    return LabPairConfig.from_dict(json.loads(marker.read_text())["config"])


def default_pair_config(task: str) -> LabPairConfig:
    """The pair a run of `task` uses unless told otherwise: the shipped one when a pair ships for the task (so
    `--task arith` loads its own 1,500-step pair), else `LabPairConfig(task=task)` (built and cached)."""
    return shipped_config(task) or LabPairConfig(task=task)


def load_pair(path: str | Path) -> LabPair:
    """A pair saved by `build_pair` (teacher/, student/, tokenizer/ and lab_pair.json)."""
    path = Path(path)
    meta = json.loads((path / COMPLETE_MARKER).read_text())
    return LabPair(
        teacher=AutoModelForCausalLM.from_pretrained(path / "teacher").eval(),
        student=AutoModelForCausalLM.from_pretrained(path / "student").eval(),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        path=path,
        properties=meta.get("properties", {}),
        config=LabPairConfig.from_dict(meta["config"]),
        built=False,
    )


def build_pair(
    config: LabPairConfig, out_dir: str | Path, n_eval: int = 0, log: Any = print, command: str | None = None
) -> LabPair:
    """Pretrain teacher then student and save them to `out_dir`; with n_eval > 0 also measure the properties.

    Writes into a temporary sibling directory and renames it at the end, so a directory holding the marker
    file is always complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    task = get_task(config.task)
    tokenizer = build_tokenizer()
    timings, histories, models = {}, {}, {}
    for offset, role in enumerate(("teacher", "student")):
        size, steps = getattr(config, role), getattr(config, f"{role}_steps")
        model = make_model(size, tokenizer, config.seed + offset)
        if log:
            log(f"pretraining {role} {size} ({model.num_parameters():,} parameters) for {steps} steps")
        start = time.time()
        histories[role] = pretrain(model, tokenizer, task, config, steps, config.seed + 1000 * (offset + 1), log)
        timings[f"{role}_seconds"] = round(time.time() - start, 1)
        models[role] = model
    pair = LabPair(models["teacher"], models["student"], tokenizer, out_dir, config=config, built=True)
    if n_eval:
        start = time.time()
        pair.properties = measure_properties(pair, task, n_eval)
        timings["measure_seconds"] = round(time.time() - start, 1)
        if log:
            log(json.dumps(pair.properties, indent=1))
    meta = {
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "properties": pair.properties,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "losses": {role: h[-1]["loss"] for role, h in histories.items() if h},
        "command": command,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for role in ("teacher", "student"):
            models[role].save_pretrained(tmp / role)
            tokenizer.save_pretrained(tmp / role)  # so AutoTokenizer works on a model path too
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "history.json").write_text(json.dumps(histories))
        (tmp / COMPLETE_MARKER).write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pair


def load_or_build_pair(
    config: LabPairConfig | None = None, cache_dir: str | Path | None = None, n_eval: int = 0, log: Any = print
) -> LabPair:
    """The shipped pair if `config` is the shipped one, else the cached build, else a new build (then cached)."""
    config = config or LabPairConfig()
    shipped = shipped_config(config.task)
    if shipped is not None and shipped.config_hash() == config.config_hash():
        return load_pair(PRETRAINED_DIR / config.task)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    path = root / config.config_hash()
    if (path / COMPLETE_MARKER).exists():
        return load_pair(path)
    if log:
        log(f"no pretrained lab pair for this config: building it into {path}")
    return build_pair(config, path, n_eval=n_eval, log=log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the lab's teacher/student pair and measure its properties.")
    parser.add_argument("--task", default="order")
    parser.add_argument("--out", default=None, help="output directory (default: the cache directory of the config)")
    parser.add_argument("--seed", type=int, default=None, help="default: the shipped pair's seed (0)")
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--student-steps", type=int, default=None)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    changes: dict[str, Any] = {}  # on top of the task's default pair, so no flag reproduces the shipped pair
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.teacher_steps is not None:
        changes["teacher_steps"] = args.teacher_steps
    if args.student_steps is not None:
        changes["student_steps"] = args.student_steps
    config = dataclasses.replace(default_pair_config(args.task), **changes)
    out = Path(args.out) if args.out else default_cache_root() / config.config_hash()
    command = "python -m dopd.lab.models " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.time()
    pair = build_pair(config, out, n_eval=args.n_eval, command=command)
    print(f"wrote {pair.path} in {time.time() - start:.0f} s; checks: {pair.properties.get('checks')}")


if __name__ == "__main__":
    main()
