"""Several teachers, each for its own rows (model.teachers, data.teacher_column; docs/method.md, "Several
teachers"): two tiny teachers whose gaps differ by an order of magnitude route each row's tokens exactly as two
single-teacher runs would; each micro-batch is scored by its rows' teacher only; metrics and samples by teacher;
resume bit-identical with two teachers and a reward; two served teachers; every bad input in one line."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_served_teacher import FakeVLLM
from tiny import make_config, train_stopped_at, weights, write_rows

from dopd.config import ConfigError
from dopd.metrics import StepMetrics
from dopd.train import Trainer, train
from dopd.types import Rollouts


@pytest.fixture(scope="module")
def two(pair, tmp_path_factory):
    """Teacher `a` (the pair's teacher) and teacher `b`: the same weights with the final norm scaled by 10, so its
    logits are ten times sharper and its gaps an order of magnitude larger; rows alternate between them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("two")
    sharp = AutoModelForCausalLM.from_pretrained(pair["teacher"])
    with torch.no_grad():
        sharp.model.norm.weight.mul_(10.0)
    path_b = str(directory / "teacher_b")
    sharp.save_pretrained(path_b)
    AutoTokenizer.from_pretrained(pair["teacher"]).save_pretrained(path_b)
    rows = [json.loads(line) for line in open(pair["data"])]
    for i, row in enumerate(rows):
        row["teacher"] = "a" if i % 3 else "b"
    data = write_rows(directory / "rows.jsonl", rows)
    return {"a": pair["teacher"], "b": path_b, "data": data, "rows": rows}


def two_teacher_config(pair, two, out, *extra):
    return make_config(
        pair,
        out,
        "model.teacher=null",
        f"model.teachers.a={two['a']}",
        f"model.teachers.b={two['b']}",
        f"data.path={two['data']}",
        *extra,
    )


def subset(rollouts: Rollouts, keep: list[int]) -> Rollouts:
    return Rollouts(
        [rollouts.prompt_index[i] for i in keep],
        [rollouts.completion_ids[i] for i in keep],
        [rollouts.finished[i] for i in keep],
    )


def test_two_teachers_route_as_two_single_teacher_runs(pair, two, tmp_path):
    both = Trainer(two_teacher_config(pair, two, tmp_path / "both", "train.prompts_per_step=8"))
    prompts = both.local_prompts()
    rollouts = both.engine.generate([both.prompts.student_ids[p] for p in prompts], 2)
    batches = both.score(prompts, rollouts)
    assert all(len({both.prompts.teachers[p] for p in b.prompt_rows}) == 1 for b in batches)  # one teacher each
    cuts = both.batch_cuts(batches)
    outputs = both.update(batches, cuts, 0, StepMetrics())
    assert cuts["b"].routing.gap > 5 * cuts["a"].routing.gap  # the gaps differ by an order of magnitude
    for name in ("a", "b"):
        alone = Trainer(
            make_config(
                pair,
                tmp_path / name,
                f"model.teacher={two[name]}",
                f"data.path={two['data']}",
                "train.prompts_per_step=8",
            )
        )
        keep = [i for i, p in enumerate(rollouts.prompt_index) if two["rows"][prompts[p]]["teacher"] == name]
        own = subset(rollouts, keep)
        single = alone.score(prompts, own)
        single_cuts = alone.batch_cuts(single)
        assert single_cuts.routing == cuts[name].routing  # the same thresholds, exactly
        single_outputs = alone.update(single, single_cuts, 0, StepMetrics())
        mine = [(b, o) for b, o in zip(batches, outputs) if b.teacher == name]
        assert len(mine) == len(single)
        for (batch, output), other, other_output in zip(mine, single, single_outputs):
            assert batch.prompt_rows == other.prompt_rows
            assert torch.equal(batch.teacher_scores.token_logprobs, other.teacher_scores.token_logprobs)
            assert torch.equal(output.regime, other_output.regime)  # regimes, token by token
            assert torch.equal(output.gap, other_output.gap)
            torch.testing.assert_close(output.token_loss, other_output.token_loss, rtol=1e-6, atol=1e-7)
    pooled = Trainer(two_teacher_config(pair, two, tmp_path / "pooled", "objective.threshold_scope=pooled"))
    pooled_cuts = pooled.batch_cuts(batches)
    assert pooled_cuts["a"] == pooled_cuts["b"] and pooled_cuts["a"].routing.gap > cuts["a"].routing.gap


def test_each_micro_batch_is_scored_by_its_rows_teacher_only(pair, two, tmp_path):
    trainer = Trainer(two_teacher_config(pair, two, tmp_path / "run", "train.prompts_per_step=8"))
    assert trainer.teachers["a"].module is not trainer.teachers["b"].module
    seen = {"a": 0, "b": 0}
    for name in seen:
        module = trainer.teachers[name].module
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, seen[name] + 1))
    rows_seen = {"a": 0, "b": 0}
    original = trainer.score

    def counting(prompts, rollouts, step=0, rewards=(None, None)):
        batches = original(prompts, rollouts, step, rewards)
        for b in batches:
            rows_seen[b.teacher] += len(b.prompt_rows)
        return batches

    trainer.score = counting
    result = trainer.step(0)
    batches_per_teacher = {n: -(-rows_seen[n] // 3) for n in rows_seen}  # micro_batch_size = 3
    assert seen == batches_per_teacher  # one pass of its teacher per micro-batch, none of the other's
    assert result["teacher/a/tokens"] + result["teacher/b/tokens"] == result["tokens"]
    assert result["teacher/a/loss"] + result["teacher/b/loss"] == pytest.approx(result["loss"])
    assert "teacher/a/gap/threshold" in result and "teacher/b/gap/threshold" in result


def test_sft_samples_each_row_from_its_own_teacher(pair, two, tmp_path):
    trainer = Trainer(
        two_teacher_config(pair, two, tmp_path / "run", "objective.method=sft", "train.prompts_per_step=8")
    )
    sampled = {"a": [], "b": []}
    for name, engine in trainer.teacher_engines.items():
        original = engine.generate
        engine.generate = lambda ids, n, images=None, name=name, original=original: (
            sampled[name].extend(map(tuple, ids)) or original(ids, n, images)
        )
    prompts = trainer.local_prompts()
    rollouts = trainer.rollouts(prompts, 0)
    for name in ("a", "b"):  # each teacher sampled exactly its rows' prompts
        own = [tuple(trainer.prompts.student_ids[p]) for p in prompts if trainer.prompts.teachers[p] == name]
        assert sampled[name] == own
    assert sorted(rollouts.prompt_index) == sorted(i for i in range(len(prompts)) for _ in range(2))
    assert math.isfinite(trainer.step(1)["loss"])  # and it trains


def test_a_path_named_by_two_teachers_loads_once(pair, two, tmp_path):
    config = make_config(
        pair,
        tmp_path / "run",
        "model.teacher=null",
        f"model.teachers.a={two['a']}",
        f"model.teachers.b={two['a']}",
        f"data.path={two['data']}",
    )
    trainer = Trainer(config)
    assert trainer.teachers["a"].module is trainer.teachers["b"].module


def test_two_teachers_and_a_reward_train_and_resume_bit_identically(pair, two, tmp_path):
    common = ["train.steps=4", "checkpoint.save_every=2", "objective.reward=tiny:word_count_reward"]
    straight = train(two_teacher_config(pair, two, tmp_path / "straight", *common))
    train_stopped_at(two_teacher_config(pair, two, tmp_path / "resumed", *common), step=2)
    resumed = train(two_teacher_config(pair, two, tmp_path / "resumed", *common, "checkpoint.resume=true"))
    a, b = weights(straight.final_dir), weights(resumed.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    samples = [json.loads(line) for line in open(tmp_path / "straight" / "samples.jsonl")]
    assert {s["teacher"] for s in samples} == {"a", "b"}  # the token view of each teacher
    metrics = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert all("reward/mean" in m for m in metrics)
    for name in ("a", "b"):  # each step's metrics by the teachers of its rows
        assert any(f"teacher/{name}/frac/LH" in m and f"teacher/{name}/loss" in m for m in metrics)


def test_each_teacher_reads_its_own_template(pair, two, tmp_path):
    config = two_teacher_config(
        pair,
        two,
        tmp_path / "run",
        "model.teachers.b={model: " + two["b"] + ', template: "{privileged_context} {prompt}"}',
    )
    trainer = Trainer(config)
    tokenizer = trainer.tokenizer
    for row, name in enumerate(trainer.prompts.teachers):
        text = tokenizer.decode(trainer.prompts.teacher_ids[row])
        hint = trainer.prompts.privileged[row]
        assert (text.index(hint.split()[0]) < text.index("what")) == (name == "b")


def test_two_served_teachers(pair, two, tmp_path):
    servers = {"a": FakeVLLM(two["a"], name="math-teacher", max_logprobs=64)}
    servers["b"] = FakeVLLM(two["b"], name="code-teacher", max_logprobs=64)
    try:
        config = make_config(
            pair,
            tmp_path / "run",
            "model.teacher=null",
            f"model.teachers.a={{model: math-teacher, server_url: '{servers['a'].url}'}}",
            f"model.teachers.b={{model: code-teacher, server_url: '{servers['b'].url}'}}",
            f"data.path={two['data']}",
        )
        trainer = Trainer(config)
        assert trainer.teachers["a"].module is None and trainer.teachers["b"].module is None
        before = {name: len(s.requests) for name, s in servers.items()}
        trainer.run()
        for name, server in servers.items():
            own = {tuple(ids) for ids, t in zip(trainer.prompts.teacher_ids, trainer.prompts.teachers) if t == name}
            scored = [body for path, body in server.requests[before[name] :] if path == "/v1/completions"]
            assert scored and all(body["model"] == server.name for body in scored)
            for body in scored:  # every scored sequence starts with a prompt of one of its own rows
                for ids in body["prompt"]:
                    assert any(tuple(ids[: len(p)]) == p for p in own)
    finally:
        for server in servers.values():
            server.close()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.teacher=/x"], "model.teacher and model.teachers are both set"),
        (["model.teachers.c={path: x}"], "model.teachers.c must be a path or hub name, or a mapping with model"),
        (["model.teachers.c={model: x, colour: red}"], r"model.teachers.c has unknown key\(s\) \['colour'\]"),
        (["model.teacher_server.url=http://127.0.0.1:9", "model.teacher_server.model=t"], "name each teacher's"),
    ],
)
def test_bad_teacher_settings_stop_at_load(pair, two, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        two_teacher_config(pair, two, tmp_path / "run", *extra)


def test_rows_must_name_a_known_teacher(pair, two, tmp_path):
    rows = [dict(r) for r in two["rows"]]
    rows[5]["teacher"] = "bio"
    data = write_rows(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError, match=r"row 5 names the teacher 'bio' .* not in model.teachers \(a, b\)"):
        Trainer(two_teacher_config(pair, two, tmp_path / "run", f"data.path={data}"))
    missing = write_rows(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "teacher"} for r in rows])
    with pytest.raises(ConfigError, match="data.teacher_column = 'teacher' is not a column of"):
        Trainer(two_teacher_config(pair, two, tmp_path / "run2", f"data.path={missing}"))
    assert not os.path.exists(tmp_path / "run" / "config.yaml")


def test_the_mixture_recipe_has_one_teacher_per_domain_and_passes_the_dry_run(capsys):
    from dopd.cli import main

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "beyond")
    recipe = os.path.join(path, "mixture-teacher-per-domain.yaml")
    assert main(["train", "--config", recipe, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "teacher science: Qwen/Qwen3-8B" in out and "teacher code: Qwen/Qwen3-14B" in out
    from dopd.config import load_config

    config = load_config(recipe)
    assert set(config.model.teachers) == {"science", "math", "code"} and config.model.teacher is None
    o = config.objective  # the paper's DOPD, thresholds per teacher
    assert (o.method, o.top_k, o.beta_w, o.beta_l, o.ht_weight, o.trim, o.threshold_scope) == (
        "dopd", 128, 0.3, 0.6, 1.0, 0.05, "batch"
    )  # fmt: skip


def test_every_teacher_is_checked_before_any_weights_load(pair, two, tmp_path):
    import tiny

    other = str(tmp_path / "other")
    tokenizer = tiny.build_tokenizer(extra_words=["zebra"])
    tiny.build_model(len(tokenizer), 32).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=f"the teacher {other} has another tokenizer than the student"):
        Trainer(two_teacher_config(pair, two, tmp_path / "run", f"model.teachers.b={other}"))
    with pytest.raises(ConfigError, match="model.teachers.b = /no/such/teacher does not exist"):
        Trainer(two_teacher_config(pair, two, tmp_path / "run2", "model.teachers.b=/no/such/teacher"))
