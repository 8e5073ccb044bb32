"""`dopd lab --study`: the undetermined share of a task, the attribution's shares, paired differences by part and
across rates, and a study end to end at a small size, its tables checked against its labs' runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from dopd.lab.attribution import mean_attribution, shares
from dopd.lab.config import LabConfig
from dopd.lab.results import paired
from dopd.lab.runner import check_lab_config, run_lab
from dopd.lab.study import STUDIES, study_configs
from dopd.lab.tasks import OrderTask, ShareTask, get_task, with_undetermined_share
from dopd.run_dir import read_jsonl


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6, 1.0])
def test_an_undetermined_share_is_what_it_says(share):
    task = ShareTask(OrderTask(), share)
    examples = task.examples(1500, seed=4)
    measured = sum(e.determined is False for e in examples) / len(examples)
    assert measured == pytest.approx(share, abs=0.04)  # binomial SE at most 1.3 points
    assert {e.prompt for e in examples[:50]} == {e.prompt for e in task.examples(50, seed=4)}  # the same draws
    # Each part keeps the base task's distribution within it: the same problems' checker, the same answers.
    example = examples[0]
    assert task.check(example, example.completion).full_match


def test_a_share_the_task_cannot_give_fails_on_one_line():
    with pytest.raises(ValueError, match="--undetermined-share 0.3: task 'lookup' has no undetermined problems"):
        with_undetermined_share(get_task("lookup"), 0.3)
    with pytest.raises(ValueError, match="--undetermined-share 1.5 must lie between 0 and 1"):
        with_undetermined_share(OrderTask(), 1.5)
    assert with_undetermined_share(get_task("lookup"), 0.0).share == 0.0  # every lookup problem is determined
    with pytest.raises(ValueError, match="--undetermined-share"):
        check_lab_config(LabConfig(out="unused", task="lookup", undetermined_share=0.5))


def test_plan_tokens_by_hand():
    tokens = list("3-1=2;7-2=5;A:5") + ["<eos>"]
    plan = OrderTask().plan_positions(tokens)
    assert [t for t, p in zip(tokens, plan) if p] == ["3", "1", "7", "2"]
    assert get_task("lookup").plan_positions(tokens) is None


def test_attribution_shares_by_hand():
    sums = {
        ("HT", "determined", "plan"): [2.0, 3.0, 9.0],
        ("HT", "undetermined", "other"): [1.0, 1.0, 1.0],
        ("LH", "determined", "other"): [5.0, 4.0, 0.0],
    }
    out = shares(sums, 8)
    assert out["by_regime"]["HT"] == pytest.approx({"tokens": 3 / 8, "loss": 4 / 8, "grad": 1.0})
    assert out["by_regime"]["LH"] == pytest.approx({"tokens": 5 / 8, "loss": 4 / 8, "grad": 0.0})
    assert out["by_part"]["undetermined"] == pytest.approx({"tokens": 1 / 8, "loss": 1 / 8, "grad": 0.1})
    assert out["by_token"]["plan"] == pytest.approx({"tokens": 2 / 8, "loss": 3 / 8, "grad": 0.9})
    for margin in ("by_regime", "by_part", "by_token"):
        for measure in ("tokens", "loss", "grad"):
            assert sum(v[measure] for v in out[margin].values()) == pytest.approx(1.0)
    mean = mean_attribution([out, shares({("HT", "determined", "plan"): [1.0, 1.0, 1.0]}, 1)])
    assert mean["by_regime"]["HT"]["tokens"] == pytest.approx((3 / 8 + 1) / 2)
    assert mean["by_regime"]["LH"]["tokens"] == pytest.approx(5 / 16)  # a regime one run lacks counts as 0 there


def test_paired_differences_by_part_and_across_rates():
    def record(label, lr, seed, overall, undetermined):
        test = {"answer_accuracy": overall, "determined": overall, "undetermined": undetermined}
        return {"label": label, "lr": lr, "seed": seed, "validation_accuracy": 0.5, "test": test}

    records = [
        record("a", 1e-4, 0, 0.50, 0.30),
        record("a", 1e-4, 1, 0.60, 0.20),
        record("b", 3e-4, 0, 0.40, None),  # a part without prompts is left out of that part's pairs
        record("b", 3e-4, 1, 0.45, 0.10),
    ]
    across = paired(records, "a", "b", 1e-4, second_lr=3e-4)
    assert across["per_seed"] == pytest.approx([0.10, 0.15]) and across["mean"] == pytest.approx(0.125)
    part = paired(records, "a", "b", 1e-4, second_lr=3e-4, key="undetermined")
    assert part["per_seed"] == pytest.approx([0.10]) and part["se"] == 0.0


def test_study_levels_group_into_labs_and_are_checked_first(tmp_path):
    config = LabConfig(out=str(tmp_path / "s"))
    share = study_configs(STUDIES["share"], config)
    assert [c.undetermined_share for c in share.values()] == [0.0, 0.3, 0.6]
    assert all(c.methods == ["opd-priv", "opd", "dopd"] for c in share.values())
    components = study_configs(STUDIES["components"], config)
    (lab,) = components.values()  # the variants share one lab
    assert lab.methods[:2] == ["opd-priv", "opd"] and "dopd[granularity=sampled]" in lab.methods
    (kinds,) = study_configs(STUDIES["privilege"], config).values()
    assert kinds.privilege == ["hints", "solution", "answer"]
    with pytest.raises(ValueError, match="--undetermined-share"):
        study_configs(STUDIES["share"], LabConfig(out=str(tmp_path / "t"), task="lookup"))
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def _quiet(*_):
    return None


def test_attribution_leaves_the_run_unchanged_and_a_zero_weight_gets_no_share(tmp_path):
    common = {"methods": ["dopd[ht_weight=0.0]"], "workers": 1, "steps": 2, "eval_every": 2, "n_test": 40}
    common.update(n_validation=20, n_train=80)
    plain = run_lab(LabConfig.quick(out=str(tmp_path / "a"), attribution_prompts=0, **common), log=_quiet)
    measured = run_lab(LabConfig.quick(out=str(tmp_path / "b"), attribution_prompts=6, **common), log=_quiet)
    for first, second in zip(plain["kinds"]["hints"]["runs"], measured["kinds"]["hints"]["runs"]):
        assert first["test"] == second["test"] and first["curves"] == second["curves"]
        lines = [read_jsonl(f"{r['run_dir']}/metrics.jsonl") for r in (first, second)]
        assert [line.get("loss") for line in lines[0]] == [line.get("loss") for line in lines[1]]
        assert "attribution" not in first and set(second["attribution"]) == {"start", "end"}
    run = next(r for r in measured["kinds"]["hints"]["runs"] if r["label"] == "dopd[ht_weight=0.0]")
    for when in ("start", "end"):
        margins = run["attribution"][when]
        assert sum(v["tokens"] for v in margins["by_regime"].values()) == pytest.approx(1.0)
        assert sum(v["grad"] for v in margins["by_part"].values()) == pytest.approx(1.0)
        ht = margins["by_regime"].get("HT", {"loss": 0.0, "grad": 0.0})
        assert ht["loss"] == 0.0 and ht["grad"] == 0.0  # the HT term has weight 0: no loss, no gradient
    sft = next(r for r in measured["kinds"]["hints"]["runs"] if r["label"] == "sft")
    assert list(sft["attribution"]["end"]["by_regime"]) == ["all"]


@pytest.mark.slow
def test_a_study_at_quick_size_end_to_end(tmp_path):
    out = tmp_path / "study"
    size = ["--steps", "2", "--eval-every", "2", "--n-test", "60", "--n-validation", "20", "--n-train", "100"]
    command = [sys.executable, "-m", "dopd", "lab", "--study", "share", "--quick", "--out", str(out), *size]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "study share" in run.stdout and "study.md" in run.stdout and "wall time" in run.stdout
    study = json.loads((out / "study.json").read_text())
    assert [level["level"] for level in study["levels"]] == ["0", "0.3", "0.6"]
    for level in study["levels"]:
        lab = json.loads((tmp_path / "study" / f"undetermined_share{level['level']}" / "results.json").read_text())
        assert lab["config"]["undetermined_share"] == float(level["level"])
        runs = {r["label"]: r["test"] for r in lab["kinds"]["hints"]["runs"]}
        for baseline in ("opd-priv", "opd"):
            expected = runs["dopd"]["answer_accuracy"] - runs[baseline]["answer_accuracy"]
            assert level["differences"][baseline]["common"]["answer_accuracy"]["mean"] == pytest.approx(expected)
        n_undetermined = lab["student"]["none"]["n_undetermined"]
        assert n_undetermined == level["n_undetermined"]
        if level["level"] == "0":
            assert n_undetermined == 0 and level["differences"]["opd"]["common"]["undetermined"]["per_seed"] == []
        else:
            assert abs(n_undetermined / 60 - float(level["level"])) < 0.25
    markdown = (out / "study.md").read_text()
    assert markdown.count("| `dopd` |") == 3 and "## Attribution at the last step" in markdown
    first, second = (level["accuracy"]["dopd"]["per_seed"] for level in study["levels"][:2])
    row = next(line for line in markdown.splitlines() if line.startswith("| dopd |"))  # minus itself at share 0
    assert row.startswith(f"| dopd | {100 * (second['0'] - first['0']):+.1f} ± 0.0 * |")
    assert (out / "study.png").stat().st_size > 1000

    refused = subprocess.run(
        [sys.executable, "-m", "dopd", "lab", "--study", "share", "--methods", "dopd", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "--methods" in refused.stderr


def test_every_study_names_known_methods(tmp_path):
    for study in STUDIES.values():
        # The teachers study needs a mixture, the mismatch study a task with a second convention.
        task = {"teachers": "order+arith", "mismatch": "add"}.get(study.name, "order")
        study_configs(study, LabConfig(task=task, out=str(tmp_path / study.name)))  # parses variants, checks settings
    with pytest.raises(ValueError, match="--teacher-per-task needs a mixture task"):
        study_configs(STUDIES["teachers"], LabConfig(out=str(tmp_path / "one")))  # one line, before any work
    one, own = study_configs(STUDIES["teachers"], LabConfig(task="order+arith", out=str(tmp_path / "t"))).values()
    assert (one.teacher_per_task, own.teacher_per_task) == (False, True) and one.out != own.out


def test_the_mismatch_study_gives_each_level_its_own_student(tmp_path):
    config = LabConfig(task="add", out=str(tmp_path / "m"), pair=["seed=0", "teacher={hidden: 32}"])
    same, own = study_configs(STUDIES["mismatch"], config).values()
    size = "student={layers: 3, hidden: 32, heads: 4, kv_heads: 2, intermediate: 192}"  # the pair's teacher's
    assert same.pair == [*config.pair, size, "student_task=add"]
    assert own.pair == [*config.pair, size, "student_task=add-swapped"]
    assert same.out.endswith("same-convention") and own.out.endswith("own-convention")
    big, small = study_configs(STUDIES["capacity"], replace(config, out=str(tmp_path / "c"))).values()
    assert big.pair == same.pair and small.pair[-1] == "student_task=add" and "hidden: 48" in small.pair[-2]
    with pytest.raises(ValueError, match="--study mismatch needs a task whose worked solutions have a second"):
        study_configs(STUDIES["mismatch"], LabConfig(out=str(tmp_path / "o")))  # order has one convention
    assert not (tmp_path / "m").exists() and not (tmp_path / "o").exists()


def test_each_method_across_levels_is_paired_by_seed():
    from dopd.lab.study import across_levels

    def level(lab, accuracies):
        accuracy = {method: {"per_seed": values} for method, values in accuracies.items()}
        return {"lab": lab, "kind": "hints", "variant": "dopd", "accuracy": accuracy}

    base = {"sft": {0: 0.5, 1: 0.6}, "opd-priv": {0: 0.5, 1: 0.5}, "opd": {0: 0.4, 1: 0.4}, "dopd": {0: 0.3, 1: 0.5}}
    later = {"sft": {0: 0.6, 1: 0.6}, "opd-priv": {0: 0.5, 1: 0.7}, "opd": {0: 0.4, 1: 0.4}, "dopd": {1: 0.8, 2: 0.1}}
    across = across_levels({"levels": [level("a", base), level("b", later)]})
    (sft,), (priv,), (dopd,) = across["sft"], across["opd-priv"], across["dopd"]
    assert sft["per_seed"] == pytest.approx([0.1, 0.0]) and sft["mean"] == pytest.approx(0.05)
    assert sft["se"] == pytest.approx(0.05)  # sd 0.0707 / sqrt(2)
    assert priv["mean"] == pytest.approx(0.1)
    assert dopd["per_seed"] == pytest.approx([0.3]) and dopd["se"] == 0.0  # seed 1 only: the seeds both ran
    assert across_levels({"levels": [level("a", base), level("a", base)]}) == {}  # variants of one lab
