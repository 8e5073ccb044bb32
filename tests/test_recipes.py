"""The recipes under recipes/: each loads with the config loader, carries the paper's hyper-parameters, and opens
with commands that the `dopd` command line accepts as written (data preparation, launch, evaluation)."""

from __future__ import annotations

import glob
import json
import os
import shlex

import pytest

from dopd.cli import build_parser
from dopd.config import load_config
from dopd.hints import FORMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
VLM_RECIPE = "recipes/qwen3-vl-8b-to-2b.yaml"
LLM_RECIPES = [path for path in RECIPES if path != VLM_RECIPE]


def header(path: str) -> list[str]:
    """The comment block a recipe opens with, `#` removed, continuation lines joined."""
    lines = []
    with open(os.path.join(ROOT, path)) as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            lines.append(line[1:].rstrip("\n"))
    joined, current = [], ""
    for line in lines:
        current += (" " if current else "") + line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            joined.append(current)
            current = ""
    return joined


def commands(path: str) -> list[list[str]]:
    """Every shell command in the header's indented command lines, split on `;`, `&`, `|` and `>`."""
    found = []
    for line in header(path):
        if not line.startswith(("dopd", "accelerate", "vllm", "for ", "jq", "done")):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in (";", "&", "|", ">", "&&"):
                found.append(current)
                current = []
            else:
                current.append(token)
        found.append(current)
    stripped = [command[1:] if command[:1] in (["do"], ["then"]) else command for command in found]
    return [command for command in stripped if command]


def dopd_arguments(command: list[str]) -> list[str] | None:
    if command[0] == "dopd":
        return command[1:]
    if command[0] == "accelerate" and "-m" in command and command[command.index("-m") + 1] == "dopd":
        return command[command.index("-m") + 2 :]
    return None


def test_there_are_the_recipes_the_paper_needs():
    names = [os.path.basename(path) for path in RECIPES]
    assert "qwen3-8b-to-1.7b.yaml" in names and "table3-pairs.yaml" in names
    assert [n for n in names if n.startswith("continual-stage")] == [
        "continual-stage1-science.yaml", "continual-stage2-math.yaml", "continual-stage3-code.yaml"]
    assert len([n for n in names if n.startswith("ood-")]) == 2
    assert os.path.basename(VLM_RECIPE) in names


def _papers_objective(config):
    o = config.objective
    assert (o.method, o.top_k, o.beta_w, o.beta_l, o.ht_weight, o.trim) == ("dopd", 128, 0.3, 0.6, 1.0, 0.05)
    assert o.beta_w < o.beta_l
    assert config.rollout.num_generations == 4
    assert (config.optim.lr, config.optim.schedule) == (5e-6, "cosine")


def test_vlm_recipe_is_the_papers_image_run():
    from dopd.config import is_image_text

    config = load_config(os.path.join(ROOT, VLM_RECIPE))
    _papers_objective(config)
    assert (config.model.student, config.model.teacher) == ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-8B-Instruct")
    assert is_image_text(config) and config.model.freeze_vision
    assert (config.train.prompts_per_step, config.train.steps) == (64, 300)  # spec: batch 64, 300 steps (VLM)
    assert config.data.image_column == "image" and config.data.box_column == "boxes"
    assert config.rollout.backend == "hf"  # the vLLM backend carries no images
    hints = [dopd_arguments(c) for c in commands(VLM_RECIPE) if dopd_arguments(c) and dopd_arguments(c)[0] == "hints"]
    args = build_parser().parse_args(hints[0])
    assert (args.form, args.coords) == ("boxes", "norm1000")  # Qwen3-VL reads boxes in [0, 1000]


@pytest.mark.parametrize("path", LLM_RECIPES)
def test_recipe_loads_with_the_papers_hyper_parameters(path):
    config = load_config(os.path.join(ROOT, path))
    o, t = config.objective, config.train
    assert (o.method, o.top_k, o.beta_w, o.beta_l, o.ht_weight, o.trim) == ("dopd", 128, 0.3, 0.6, 1.0, 0.05)
    assert o.beta_w < o.beta_l
    assert config.rollout.num_generations == 4
    assert (config.optim.lr, config.optim.schedule) == (5e-6, "cosine")
    assert (t.prompts_per_step, t.steps) == (128, 200)
    assert config.model.teacher == "Qwen/Qwen3-8B"
    assert config.data.prompt_column == "question" and config.data.privileged_column == "privileged_context"
    assert config.logging.output_dir.startswith("runs/")


def test_main_recipe_is_the_papers_pair():
    config = load_config(os.path.join(ROOT, "recipes/qwen3-8b-to-1.7b.yaml"))
    assert (config.model.student, config.model.teacher) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B")


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_opens_with_commands_the_command_line_accepts(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    parser = build_parser()
    config = load_config(path)
    parsed = {"hints": [], "train": [], "eval": []}
    for command in commands(path):
        arguments = dopd_arguments(command)
        if arguments is None:
            continue
        args = parser.parse_args(arguments)  # an unknown option exits here
        parsed[args.command].append(args)
    assert parsed["hints"] and parsed["train"], f"{path} lacks a hints or a launch command"
    # `dopd eval` reads text prompts only: the VLM recipe names its evaluation instead.
    assert parsed["eval"] or path == VLM_RECIPE, f"{path} lacks an eval command"
    for args in parsed["hints"]:
        assert args.form in FORMS
    for args in parsed["train"]:
        assert args.config == path  # the launch command names this very file
        load_config(args.config, args.overrides)
    for args in parsed["eval"]:
        if args.chat_template_kwargs:
            assert json.loads(args.chat_template_kwargs) == {"enable_thinking": False}
    launches = [" ".join(c) for c in commands(path) if c[0] == "accelerate"]
    assert launches and all("--num_processes 8" in c and "--config_file configs/accelerate/ddp.yaml" in c
                            for c in launches)
    assert os.path.exists(os.path.join(ROOT, "configs/accelerate/ddp.yaml"))
    # The data the recipe trains on is what its preparation commands write.
    outputs = [a.out for a in parsed["hints"]] + [c[c.index(">") + 1] for c in commands_with_redirect(path)]
    assert config.data.path in outputs or config.data.path in {o.replace("$set", s) for o in outputs
                                                                for s in ("science", "math", "code")}


def commands_with_redirect(path: str) -> list[list[str]]:
    found = []
    for line in header(path):
        if ">" in line and line.startswith("jq"):
            found.append(shlex.split(line.replace(">", " > ")))
    return found


def test_continual_stages_chain_their_models():
    stages = [load_config(os.path.join(ROOT, f"recipes/continual-stage{k}-{name}.yaml"))
              for k, name in ((1, "science"), (2, "math"), (3, "code"))]
    assert stages[0].model.student == "Qwen/Qwen3-1.7B"
    for before, after in zip(stages, stages[1:]):
        assert after.model.student == before.logging.output_dir + "/final"
    assert [s.data.path for s in stages] == ["data/hints/science.jsonl", "data/hints/math.jsonl",
                                             "data/hints/code.jsonl"]
    assert len({s.logging.output_dir for s in stages}) == 3


def test_ood_splits_hold_out_what_they_evaluate():
    for name, trained, held_out in (("ood-train-math", {"math"}, {"science", "code"}),
                                    ("ood-train-science-code", {"science", "code"}, {"math"})):
        path = f"recipes/{name}.yaml"
        text = " ".join(header(path))
        hinted = {s for s in ("science", "math", "code")
                  if f"data/raw/{s}.jsonl" in text or ("for set in" in text and f" {s}" in text.split("for set in")[1].split(";")[0])}
        assert hinted == trained, (name, hinted)
        evaluated = text.split("for domain in")[1].split(";")[0].split()
        assert held_out <= set(evaluated)


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_say_what_the_spec_does_not_give(path):
    text = open(os.path.join(ROOT, path)).read()
    assert "ours" in text and "spec" in text
    if path == VLM_RECIPE:
        assert "vLLM backend does not carry images" in text and "dopd eval` reads text prompts only" in text
        return
    assert load_config(os.path.join(ROOT, path)).rollout.backend == "vllm"
    assert "rollout.backend=hf" in text or "vLLM rollouts: see the notes" in text  # the way to run without vLLM
