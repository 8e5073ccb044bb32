"""Checks under accelerate's real FSDP2 preparation, run by test_fsdp2.py as two CPU processes (gloo) with
`python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py MODE OUT [ARGS...]`.

accelerate refuses FSDP without a GPU when the Accelerator starts, so `fsdp2_accelerator` starts it on the CPU and
then switches its state to FSDP with the plugin that `accelerate launch` would build from a FSDP2 config file; every
step after that (`prepare`, `fsdp2_prepare_model`, the units' gathers and reshards) is accelerate's and torch's own
code. Each process writes `OUT/rank<R>.json`.

Modes:
- `swap`: the privileged self's weights swapped into a prepared student (tied and untied heads; with and without a
  forward before scoring, as hf and vLLM rollouts leave the units; micro-batches 1 and 2): the maximum logit
  difference of the student's pass from the live weights and of the self's pass from the copy.
- `generate`: `HFRollout` greedy sampling on a sharded student where one process's completions end at once and the
  other's run to `max_new_tokens`; writes the completions (without `synced_gpus` the processes wait on each other).
- `vllm-sync`: TRL's `VLLMGeneration` weight sync over a fake vLLM (tests/tiny.py) from a sharded student, tied and
  untied, fully trained and LoRA, after a privileged-self swap (and a forward that leaves the root unit gathered):
  whether the engine received the live weights under the checkpoint's names.
- `train`: three `Trainer` steps under FSDP2 (`ARGS` = student teacher data [overrides]); `train-ddp` the same
  under plain multi-process data parallelism.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen3DecoderLayer",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}
VOCAB = 40


def fsdp2_accelerator():
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    os.environ.update(FSDP2_ENV)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def swap(accelerator, out: dict) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from tiny import build_model

    from dopd.scoring import frozen_pass, pass_inputs, trainable_pass
    from dopd.self_weights import SelfWeights
    from dopd.types import Completions

    completions = Completions.from_lists([[5, 6, 7, 8], [9, 10, 11]], 0)
    privileged = pass_inputs([[3, 4, 5], [6, 7]], completions, 0)
    plain = pass_inputs([[3], [6]], completions, 0)
    for tied in (True, False):
        for forward_first in (False, True):
            model = build_model(VOCAB, tied=tied)
            copy_reference = copy.deepcopy(model).eval()  # the weights at step 0: the frozen copy
            live_reference = copy.deepcopy(model).eval()
            with torch.no_grad():
                for parameter in live_reference.parameters():
                    parameter.add_(0.05)
            model = fsdp2_prepare_model(accelerator, model)
            weights = SelfWeights("frozen", model)
            with torch.no_grad():  # the optimizer moved the live shards
                for parameter in model.parameters():
                    parameter.to_local().add_(0.05)
            with torch.no_grad():
                want_self = frozen_pass(copy_reference, privileged, VOCAB).logits()
                want_student = frozen_pass(live_reference, plain, VOCAB).logits()
            differences = {}
            for micro_batch in (1, 2):
                if forward_first:  # what transformers' generate leaves behind (hf rollouts)
                    with torch.no_grad():
                        model(input_ids=plain.input_ids[:, :3])
                with weights.swapped_in():
                    self_head = frozen_pass(model, privileged, VOCAB)
                student = trainable_pass(model, model, plain, VOCAB)
                differences[f"student_{micro_batch}"] = (student.logits().detach() - want_student).abs().max().item()
                differences[f"self_{micro_batch}"] = (self_head.logits() - want_self).abs().max().item()
                student.logits().sum().backward()  # reshards the units, and frees what a later pass refills
            out[f"tied={tied},forward_first={forward_first}"] = differences


def generate(accelerator, out: dict) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from tiny import build_model, build_tokenizer

    from dopd.config import RolloutConfig
    from dopd.engines import gathers_across_processes
    from dopd.rollout.hf import HFRollout

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), tied=False)
    prompt = [[3, 4, 5, 6]] if accelerator.process_index == 0 else [[7, 8, 9]]
    reference = copy.deepcopy(model).eval()
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        greedy = reference.generate(
            torch.tensor(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt[0]) :].tolist()
    # Process 0 ends at its second token; process 1 has no end-of-sequence token it ever samples.
    ends = greedy[1] if accelerator.process_index == 0 else next(i for i in range(len(tokenizer)) if i not in greedy)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ends)
    model.generation_config.eos_token_id = ends
    model = fsdp2_prepare_model(accelerator, model)
    engine = HFRollout(lambda: model, tokenizer, RolloutConfig(temperature=0.0, max_new_tokens=8, num_generations=1))
    rollouts = engine.generate(prompt, 1)
    out.update(
        synced=gathers_across_processes(model),
        completion=rollouts.completion_ids[0],
        finished=rollouts.finished[0],
        greedy=greedy,
        eos=ends,
    )


def vllm_sync(accelerator, out: dict) -> None:
    """TRL's `VLLMGeneration.sync_weights` over a fake vLLM (tests/tiny.py) from a sharded student, after a swap of
    the privileged self: the engine must receive the whole live weights (merged adapters for LoRA)."""
    import pytest
    import tiny
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from dopd.config import LoraConfig, load_config
    from dopd.lora import add_adapters
    from dopd.rollout.vllm import VLLMRollout
    from dopd.scoring import frozen_pass, pass_inputs
    from dopd.self_weights import SelfWeights
    from dopd.types import Completions

    tokenizer = tiny.build_tokenizer()
    config = load_config(
        overrides=["model.student=s", "model.teacher=t", "data.path=d", "logging.output_dir=o", "rollout.backend=vllm"]
    )
    inputs = pass_inputs([[3, 4, 5]], Completions.from_lists([[6, 7]], 0), 0)
    for tied in (True, False):
        for lora in (False, True):
            model = tiny.build_model(len(tokenizer), tied=tied)
            if lora:
                adapters = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
                model = add_adapters(model, adapters)
                torch.manual_seed(1)
                with torch.no_grad():
                    for name, parameter in model.named_parameters():
                        if "lora_B" in name:
                            parameter.normal_()  # trained adapters: the merged weights differ from the base's
            reference = copy.deepcopy(model)
            with torch.no_grad():  # the optimizer moved the live weights; the frozen copy stays at step 0
                for parameter in reference.parameters():
                    if parameter.requires_grad:
                        parameter.add_(0.01)
            live = (copy.deepcopy(reference).merge_and_unload() if lora else reference).state_dict()
            if tied:
                del live["lm_head.weight"]  # the tied head is the embeddings (vLLM loads them once)
            model = fsdp2_prepare_model(accelerator, model)
            weights = SelfWeights("frozen", model)
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.to_local().add_(0.01)
            with weights.swapped_in():
                frozen_pass(model, inputs, len(tokenizer))
            if not lora:  # a forward since the last backward leaves the root unit gathered
                with torch.no_grad():
                    model(input_ids=inputs.input_ids)
            with pytest.MonkeyPatch.context() as patch:
                fake = tiny.install_fake_vllm(patch)
                rollout = VLLMRollout.create(model, accelerator, tokenizer, config, len(tokenizer))
                rollout.sync_weights()
                loaded = fake.instances[-1].loaded
            out[f"tied={tied},lora={lora}"] = {
                "names_match": sorted(loaded) == sorted(live),
                "max_difference": max((loaded[n] - live[n]).abs().max().item() for n in live if n in loaded),
            }


def train(accelerator, args: list[str]) -> None:
    from tiny import make_config

    from dopd.train import Trainer

    student, teacher, data, run_dir, *overrides = args
    pair = {"student": student, "teacher": teacher, "data": data}
    steps = ("train.steps=3", "train.micro_batch_size=2", "rollout.temperature=0", "logging.sample_every=0")
    Trainer(make_config(pair, run_dir, *steps, "train.device=cpu", *overrides), accelerator).run()


def main() -> None:
    mode, out_dir, *args = sys.argv[1:]
    torch.set_num_threads(1)
    if mode == "train-ddp":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    else:
        accelerator = fsdp2_accelerator()
    out: dict = {"processes": accelerator.num_processes}
    if mode == "swap":
        swap(accelerator, out)
    elif mode == "generate":
        generate(accelerator, out)
    elif mode == "vllm-sync":
        vllm_sync(accelerator, out)
    elif mode in ("train", "train-ddp"):
        train(accelerator, args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w") as handle:
        json.dump(out, handle)
    accelerator.wait_for_everyone()  # both results are written before either process tears the group down
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
