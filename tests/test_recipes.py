"""The recipes under recipes/: each loads with the config loader, carries the paper's hyper-parameters, and opens
with commands that the `dopd` command line accepts as written (data preparation, launch, evaluation)."""

from __future__ import annotations

import glob
import json
import os
import shlex

import pytest

from dopd.bench import BENCHMARKS, PAPER_LLM_SUITE
from dopd.cli import build_parser
from dopd.config import load_config
from dopd.hints import FORMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(
    os.path.relpath(path, ROOT)
    for pattern in ("*.yaml", "table3/*.yaml")
    for path in glob.glob(os.path.join(ROOT, "recipes", pattern))
)
VLM_RECIPE = "recipes/qwen3-vl-8b-to-2b.yaml"
MAIN_RECIPE = "recipes/qwen3-8b-to-1.7b.yaml"
LLM_RECIPES = [path for path in RECIPES if path != VLM_RECIPE]
TABLE3_RECIPES = [path for path in RECIPES if path.startswith("recipes/table3/")]
# The paper's Table 3 (section 4.1.1, the table's caption): Qwen3-8B/4B/1.7B -> Qwen3-0.6B, Qwen3-8B/4B -> Qwen3-1.7B.
PAPER_PAIRS = {
    ("Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B"),
    ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"),
    ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-0.6B"),
    ("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B"),
    ("Qwen/Qwen3-4B", "Qwen/Qwen3-1.7B"),
}


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
    assert MAIN_RECIPE in RECIPES and VLM_RECIPE in RECIPES
    assert sorted(os.path.basename(path) for path in TABLE3_RECIPES) == [
        "qwen3-1.7b-to-0.6b.yaml",
        "qwen3-4b-to-0.6b.yaml",
        "qwen3-4b-to-1.7b.yaml",
        "qwen3-8b-to-0.6b.yaml",
    ]
    assert [n for n in names if n.startswith("continual-stage")] == [
        "continual-stage1-science.yaml",
        "continual-stage2-math.yaml",
        "continual-stage3-code.yaml",
    ]
    assert sorted(n for n in names if n.startswith("ood-")) == ["ood-train-code.yaml", "ood-train-math.yaml"]


def marks(path: str) -> dict[str, str]:
    """The mark after each `key: value` line of a recipe (`paper...` or `ours...`), by key."""
    found = {}
    with open(os.path.join(ROOT, path)) as handle:
        for line in handle:
            key, _, rest = line.strip().partition(":")
            if "#" in rest and not line.lstrip().startswith("#"):
                found[key] = rest.split("#", 1)[1].strip()
    return found


PAPERS_KEYS = ("top_k", "beta_w", "beta_l", "ht_weight", "trim", "num_generations", "lr", "schedule")


def _papers_objective(config, path):
    o = config.objective
    assert (o.method, o.top_k, o.beta_w, o.beta_l, o.ht_weight, o.trim) == ("dopd", 128, 0.3, 0.6, 1.0, 0.05)
    found = marks(path)  # every value the paper gives is marked as the paper's
    assert all(found.get(key, "").startswith("paper") for key in PAPERS_KEYS), found
    assert config.rollout.num_generations == 4
    assert (config.optim.lr, config.optim.schedule) == (5e-6, "cosine")


def test_vlm_recipe_is_the_papers_image_run():
    from dopd.config import is_image_text

    config = load_config(os.path.join(ROOT, VLM_RECIPE))
    _papers_objective(config, VLM_RECIPE)
    assert (config.model.student, config.model.teacher) == ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-8B-Instruct")
    assert is_image_text(config) and config.model.freeze_vision
    assert (config.train.prompts_per_step, config.train.steps) == (64, 300)  # the paper: batch 64, 300 steps (VLM)
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
    found = marks(path)
    assert all(found.get(key, "").startswith("paper") for key in PAPERS_KEYS), found
    assert config.rollout.num_generations == 4
    assert (config.optim.lr, config.optim.schedule) == (5e-6, "cosine")
    assert (t.prompts_per_step, t.steps) == (128, 200)
    if path in TABLE3_RECIPES:
        assert (config.model.teacher, config.model.student) in PAPER_PAIRS
    else:  # the paper runs the main results and all analyses on Qwen3-8B -> Qwen3-1.7B (section 4.1.1)
        assert config.model.teacher == "Qwen/Qwen3-8B"
    assert config.data.prompt_column == "question" and config.data.privileged_column == "privileged_context"
    assert config.logging.output_dir.startswith("runs/")


def test_main_recipe_is_the_papers_pair():
    config = load_config(os.path.join(ROOT, MAIN_RECIPE))
    assert (config.model.student, config.model.teacher) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B")


def test_main_recipe_names_the_papers_benchmark_suite_with_harness_tasks():
    text = " ".join(header(MAIN_RECIPE))
    for name in ("C-Eval", "LiveBench", "MATH500", "AIME25", "ZebraLogic", "AutoLogi", "BFCLv3", "LiveCodeBench v5"):
        assert name in text
    for name in PAPER_LLM_SUITE:  # each benchmark by its harness task, or by where it runs instead
        task = BENCHMARKS[name].task if name in BENCHMARKS else None
        assert task is None or task in text
    for task in ("zebralogicbench", "bfcl_v3", "live_code_bench", "release_v5"):  # evalscope's names
        assert task in text
    benched = {
        build_parser().parse_args(dopd_arguments(c)).model for c in commands(MAIN_RECIPE) if c[:2] == ["dopd", "bench"]
    }
    config = load_config(os.path.join(ROOT, MAIN_RECIPE))
    assert benched == {config.model.teacher, config.model.student, config.logging.output_dir + "/final"}


def _size(hub_name: str) -> float:
    return float(hub_name.removeprefix("Qwen/Qwen3-").removesuffix("B"))


def test_table3_recipes_are_the_papers_five_pairs():
    main = load_config(os.path.join(ROOT, MAIN_RECIPE))
    configs = {path: load_config(os.path.join(ROOT, path)) for path in TABLE3_RECIPES}
    pairs = [(c.model.teacher, c.model.student) for c in configs.values()] + [(main.model.teacher, main.model.student)]
    assert len(pairs) == len(set(pairs)) and set(pairs) == PAPER_PAIRS
    assert max(_size(t) / _size(s) for t, s in pairs) == pytest.approx(13.3, abs=0.05)  # "size ratio up to 13.3x"
    for path, config in configs.items():
        teacher, student = config.model.teacher, config.model.student
        assert _size(teacher) > _size(student)
        # The file is named after its pair, and so is its run directory.
        stem = f"qwen3-{_size(teacher):g}b-to-{_size(student):g}b"
        assert os.path.basename(path) == stem + ".yaml" and config.logging.output_dir == f"runs/table3/{stem}-dopd"
        assert config.data.path == main.data.path  # one training set for every pair (our reading)
        text = " ".join(header(path))
        assert "Table 3" in text and "share a tokenizer" in text
        # Its evaluation measures this pair: the teacher, the base student and the distilled student.
        evaluated = {
            build_parser().parse_args(dopd_arguments(c)).model
            for c in commands(path)
            if dopd_arguments(c) and dopd_arguments(c)[0] == "eval"
        }
        assert evaluated == {teacher, student, config.logging.output_dir + "/final"}
    assert len({c.logging.output_dir for c in configs.values()} | {main.logging.output_dir}) == len(PAPER_PAIRS)


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_opens_with_commands_the_command_line_accepts(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    parser = build_parser()
    config = load_config(path)
    parsed = {"hints": [], "train": [], "eval": [], "bench": []}
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
    for args in parsed["bench"]:  # the paper's benchmarks the harness has, in non-thinking mode
        assert set(args.benchmarks.split(",")) <= set(BENCHMARKS)
        assert args.model_args is None or json.loads(args.model_args) == {"enable_thinking": False}
    for args in parsed["eval"]:
        if args.chat_template_kwargs:
            assert json.loads(args.chat_template_kwargs) == {"enable_thinking": False}
    launches = [" ".join(c) for c in commands(path) if c[0] == "accelerate"]
    assert launches and all(
        "--num_processes 8" in c and "--config_file configs/accelerate/ddp.yaml" in c for c in launches
    )
    assert os.path.exists(os.path.join(ROOT, "configs/accelerate/ddp.yaml"))
    # The data the recipe trains on is what its preparation commands write.
    outputs = [a.out for a in parsed["hints"]] + [c[c.index(">") + 1] for c in commands_with_redirect(path)]
    assert config.data.path in outputs or config.data.path in {
        o.replace("$set", s) for o in outputs for s in ("science", "math", "code")
    }


def commands_with_redirect(path: str) -> list[list[str]]:
    found = []
    for line in header(path):
        if ">" in line and line.startswith("jq"):
            found.append(shlex.split(line.replace(">", " > ")))
    return found


CONTINUAL = [f"recipes/continual-stage{k}-{name}.yaml" for k, name in ((1, "science"), (2, "math"), (3, "code"))]


def test_continual_stages_are_the_papers_curriculum():
    # Section 4.2.3 / Figure 7(a): general, then reasoning, then coding data, one stage each, on one model;
    # section 4.1.1: general, reasoning, coding = RaR-Science-20K, DAPO-Math-17K, Skywork-OR1-Coding-14K.
    stages = [load_config(os.path.join(ROOT, path)) for path in CONTINUAL]
    assert (stages[0].model.student, stages[0].model.teacher) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B")
    for before, after in zip(stages, stages[1:]):
        assert after.model.student == before.logging.output_dir + "/final"
        assert after.model.teacher == before.model.teacher
    assert [s.data.path for s in stages] == [
        "data/hints/science.jsonl",
        "data/hints/math.jsonl",
        "data/hints/code.jsonl",
    ]
    assert len({s.logging.output_dir for s in stages}) == 3
    for path, stage, dataset in zip(CONTINUAL, stages, ("RaR-Science-20K", "DAPO-Math-17K", "Skywork-OR1-Coding-14K")):
        text = " ".join(header(path))
        assert text.startswith(f"DOPD continual learning, stage {CONTINUAL.index(path) + 1} of 3: {dataset}")
        # The paper's probes after every stage: LiveBench (general), MATH500 and BFCLv3 (the specific ones).
        assert all(bench in text for bench in ("LiveBench", "MATH500", "BFCLv3"))
        hinted = [a.input for a in _parsed(path, "hints")]
        assert hinted == [stage.data.path.replace("data/hints/", "data/raw/")]  # this stage's domain only
        evaluated = _parsed(path, "eval")
        assert evaluated and all(a.model == stage.logging.output_dir + "/final" for a in evaluated)
        assert "data/eval/math500.jsonl" in {a.data for a in evaluated}


def _parsed(path: str, command: str) -> list:
    parser = build_parser()
    found = [parser.parse_args(dopd_arguments(c)) for c in commands(path) if dopd_arguments(c)]
    return [args for args in found if args.command == command]


def test_ood_splits_are_the_papers():
    # Section 4.2.4 / Figure 7(b): train on the reasoning or the coding set alone, score the other domain's
    # benchmark: reasoning-trained on BFCLv3, coding-trained on MATH500.
    splits = {
        "recipes/ood-train-math.yaml": ("math", "DAPO-Math-17K", "BFCLv3"),
        "recipes/ood-train-code.yaml": ("code", "Skywork-OR1-Coding-14K", "MATH500"),
    }
    for path, (domain, dataset, held_out) in splits.items():
        config = load_config(os.path.join(ROOT, path))
        assert (config.model.student, config.model.teacher) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B")
        assert config.data.path == f"data/hints/{domain}.jsonl"  # one domain, no mixture
        assert [a.input for a in _parsed(path, "hints")] == [f"data/raw/{domain}.jsonl"]
        text = " ".join(header(path))
        assert text.startswith("DOPD out of distribution: trained on the") and f"alone ({dataset})" in text
        assert f"unseen {'coding' if domain == 'math' else 'reasoning'} benchmark {held_out}" in text
        evaluated = _parsed(path, "eval")
        assert evaluated and all(a.model == config.logging.output_dir + "/final" for a in evaluated)
        if held_out == "MATH500":  # `dopd eval` scores MATH500; BFCLv3 needs its official harness
            assert "data/eval/math500.jsonl" in {a.data for a in evaluated}
    assert {d for d, _, _ in splits.values()} == {"math", "code"}


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_say_what_the_paper_does_not_give(path):
    text = open(os.path.join(ROOT, path)).read()
    assert "ours" in text and "# paper" in text
    if path == VLM_RECIPE:
        assert "vLLM backend does not carry images" in text and "dopd eval` reads text prompts only" in text
        return
    assert load_config(os.path.join(ROOT, path)).rollout.backend == "vllm"
    assert "rollout.backend=hf" in text or "vLLM rollouts: see the notes" in text  # the way to run without vLLM
