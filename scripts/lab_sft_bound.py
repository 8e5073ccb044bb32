"""How far plain supervised fine-tuning moves the lab's student with the lab's budget: a reference point for the
distillation methods, which in `dopd lab` do not close the teacher-student gap.

The same pair, training prompts, test prompts and budget as `dopd lab` (steps × 16 prompts × 4 completions),
without privileged input. The student is fine-tuned (cross-entropy on the completion tokens, AdamW, each learning
rate of the grid) on completions from one of two sources:

- `teacher`: the teacher's own samples (temperature 1, no hints): the off-policy counterpart of OPD, the same
  teacher knowledge through its samples instead of its log-probs on the student's;
- `reference`: the task's reference solutions (the order the hints would give): what a perfect teacher would show.

    python scripts/lab_sft_bound.py                      # order task, 60 steps, lr 1e-5, 1e-4, 1e-3
    python scripts/lab_sft_bound.py --steps 180 --sources teacher

Prints a line per run and one JSON line with the held-out answer accuracy of each (source, lr) on the lab's test
prompts, beside the student's and the teacher's.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time

import torch

from dopd.lab.evaluation import evaluate, generate_completions, render_lab_prompt
from dopd.lab.models import default_pair_config, load_or_build_pair, sft_batch
from dopd.lab.runner import TEST_SEED, TRAIN_SEED, LabConfig
from dopd.lab.tasks import Example, get_task


def teacher_samples(pair, examples: list[Example], per_prompt: int, max_new_tokens: int, seed: int) -> list[str]:
    """`per_prompt` completions per example, sampled from the teacher at temperature 1 without privileged input."""
    torch.manual_seed(seed)
    prompts = [render_lab_prompt(pair.tokenizer, ex, "none") for ex in examples for _ in range(per_prompt)]
    return generate_completions(pair.teacher, pair.tokenizer, prompts, max_new_tokens=max_new_tokens, sample=True)


def fine_tune(pair, batches: list[list[Example]], lr: float):
    """A copy of the student trained on the batches in order, one AdamW step each."""
    student = copy.deepcopy(pair.student).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    for examples in batches:
        loss = student(**sft_batch(pair.tokenizer, examples, ["none"] * len(examples))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
    return student.eval()


def main(argv=None) -> dict:
    lab = LabConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default=lab.task)
    parser.add_argument("--steps", type=int, default=lab.steps)
    parser.add_argument("--prompts-per-step", type=int, default=lab.prompts_per_step)
    parser.add_argument("--per-prompt", type=int, default=lab.num_generations)
    parser.add_argument("--lr-grid", default="1e-5,1e-4,1e-3")
    parser.add_argument("--sources", default="teacher,reference")
    parser.add_argument("--n-test", type=int, default=lab.n_test)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    task = get_task(args.task)
    pair = load_or_build_pair(default_pair_config(args.task), log=None)
    test = task.examples(args.n_test, TEST_SEED)
    train = task.examples(lab.n_train, TRAIN_SEED)
    rng = random.Random(args.seed)
    chosen = [rng.sample(train, args.prompts_per_step) for _ in range(args.steps)]
    longest = max(len(pair.tokenizer(e.completion)["input_ids"]) for e in train[:200]) + 4
    result = {
        "task": task.name, "steps": args.steps, "sequences_per_step": args.prompts_per_step * args.per_prompt,
        "seed": args.seed,
        "student": evaluate(pair.student, pair.tokenizer, task, test)["answer_accuracy"],
        "teacher": evaluate(pair.teacher, pair.tokenizer, task, test)["answer_accuracy"],
        "runs": {},
    }  # fmt: skip
    print(f"student {result['student']:.3f}, teacher {result['teacher']:.3f} (test prompts, no hints)", flush=True)
    for source in args.sources.split(","):
        if source == "teacher":
            flat = [ex for examples in chosen for ex in examples]
            texts = teacher_samples(pair, flat, args.per_prompt, longest, args.seed)
            expanded = [ex for ex in flat for _ in range(args.per_prompt)]
            rows = [Example(ex.prompt, ex.answer, text, ex.privileged) for ex, text in zip(expanded, texts)]
            correct = sum(task.check(ex, text).answer_correct for ex, text in zip(expanded, texts)) / len(texts)
            print(f"teacher samples: {len(texts)}, answer correct {correct:.3f}", flush=True)
        elif source == "reference":
            rows = [ex for examples in chosen for ex in examples for _ in range(args.per_prompt)]
        else:
            raise SystemExit(f"--sources: unknown source {source!r}; use teacher and/or reference")
        size = args.prompts_per_step * args.per_prompt
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        for lr in (float(x) for x in args.lr_grid.split(",")):
            accuracy = evaluate(fine_tune(pair, batches, lr), pair.tokenizer, task, test)["answer_accuracy"]
            result["runs"][f"{source}@{lr:g}"] = accuracy
            print(f"sft on {source} samples, lr {lr:g}: held-out accuracy {accuracy:.3f}", flush=True)
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
