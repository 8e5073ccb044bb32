"""The verifiable reward (objective.reward; docs/method.md, "A verifiable reward"): the group advantage by hand,
the policy-gradient term's value and gradient against hand-computed ones in both loss forms, OPD's advantage
identity, the trainer with a reward, and every bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import make_config, train_stopped_at, weights

from dopd.config import ConfigError
from dopd.diagnostics import NonFiniteError
from dopd.kernels import chunked_objective
from dopd.objectives import ObjectiveConfig, build_objective
from dopd.plain import compute_objective
from dopd.rewards import group_advantages
from dopd.train import Trainer, train
from dopd.types import Head


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    advantages = group_advantages(rewards, [0, 0, 0, 0, 1, 1, 2])
    std = math.sqrt(0.25 * 0.75)  # population std of [1, 0, 0, 0]
    expected = [0.75 / (std + 1e-6), *[-0.25 / (std + 1e-6)] * 3, 0.0, 0.0, 0.0]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-12)
    assert advantages.dtype == torch.float64


def _case(seed=0, B=3, T=4, V=7, H=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    self_hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    advantages = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    return hidden, weight, teacher_hidden, self_hidden, ids, mask, advantages


def _loss_and_grad(method, form, reward_weight=None, seed=0):
    hidden, weight, teacher_hidden, self_hidden, ids, mask, advantages = _case(seed)
    extra = {} if reward_weight is None else {"reward": "exact", "reward_weight": reward_weight}
    objective = build_objective(ObjectiveConfig(method=method, top_k=4, **extra))
    logits = (hidden @ weight.T).requires_grad_()
    given = {"advantages_B": advantages} if reward_weight is not None else {}
    if form == "plain":
        out = compute_objective(
            objective,
            logits,
            ids,
            mask,
            self_logits_BTV=self_hidden @ weight.T,
            teacher_logits_BTV=teacher_hidden @ weight.T,
            **given,
        )
        out.loss.backward()
        return out, logits.grad, (hidden, weight, teacher_hidden, self_hidden, ids, mask, advantages)
    student_hidden = hidden.clone().requires_grad_()
    out = chunked_objective(
        objective,
        Head(student_hidden, weight),
        ids,
        mask,
        self_head=Head(self_hidden, weight),
        teacher_head=Head(teacher_hidden, weight),
        chunk_size=3,
        **given,
    )
    out.loss.backward()
    # The gradient with respect to the logits, back from the hidden states' (weight is square-free: solve).
    grad_hidden = student_hidden.grad
    return out, grad_hidden, (hidden, weight, teacher_hidden, self_hidden, ids, mask, advantages)


def _reward_grad_by_hand(ids, mask, logits, advantages, w):
    """∂/∂z of −w/B Σ_b A_b/|y_b| Σ_t log softmax(z_bt)[y_bt]: −w A_b/(|y_b| B) (onehot(y) − softmax(z))."""
    B = ids.shape[0]
    lengths = mask.sum(-1, keepdim=True).double()
    onehot = torch.nn.functional.one_hot(ids, logits.shape[-1]).double()
    scale = (-w * advantages[:, None] / (lengths * B) * mask)[..., None]
    return scale * (onehot - torch.softmax(logits, -1))


@pytest.mark.parametrize("method", ["dopd", "opd", "gkd", "opsd", "eopd", "sft"])
@pytest.mark.parametrize("form", ["plain", "chunked"])
def test_reward_term_gradient_is_the_hand_computed_one(method, form):
    w = 0.5
    with_reward, grad_with, case = _loss_and_grad(method, form, w)
    without, grad_without, _ = _loss_and_grad(method, form, None)
    hidden, weight, _, _, ids, mask, advantages = case
    by_hand = _reward_grad_by_hand(ids, mask, hidden @ weight.T, advantages, w)
    if form == "chunked":  # the gradient reaches the hidden states through the head: G W
        by_hand = by_hand @ weight
    torch.testing.assert_close(grad_with - grad_without, by_hand, rtol=1e-9, atol=1e-12)
    # The value: every token is kept, so each sequence's 1/|y| sum is 1 and the term adds −w · mean_b A_b.
    expected = -w * float(advantages.mean())
    assert float((with_reward.loss - without.loss).detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_opd_with_reward_is_opd_with_the_advantage_added():
    """OPD's per-token advantage is log t − log s; with the reward, its gradient is the policy gradient with
    log t − log s + w·A_b on every token of sequence b."""
    w = 0.8
    _, grad, case = _loss_and_grad("opd", "plain", w)
    hidden, weight, teacher_hidden, _, ids, mask, advantages = case
    logits = hidden @ weight.T
    student_lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    teacher_lp = torch.log_softmax(teacher_hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    advantage = teacher_lp - student_lp + w * advantages[:, None]
    lengths = mask.sum(-1, keepdim=True).double()
    onehot = torch.nn.functional.one_hot(ids, logits.shape[-1]).double()
    by_hand = (-advantage / (lengths * ids.shape[0]) * mask)[..., None] * (onehot - torch.softmax(logits, -1))
    torch.testing.assert_close(grad, by_hand, rtol=1e-9, atol=1e-12)


def test_reward_without_advantages_says_what_is_missing():
    hidden, weight, teacher_hidden, self_hidden, ids, mask, _ = _case()
    objective = build_objective(ObjectiveConfig(method="opd", reward="exact"))
    with pytest.raises(ValueError, match="one advantage per sequence"):
        compute_objective(objective, hidden @ weight.T, ids, mask, teacher_logits_BTV=teacher_hidden @ weight.T)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"reward": "maths"}, "objective.reward = 'maths' is unknown"),
        ({"reward": "not a module:f"}, "is unknown"),
        ({"reward": "exact", "reward_weight": -1.0}, "objective.reward_weight = -1.0 must be >= 0"),
    ],
)
def test_bad_reward_options(options, message):
    with pytest.raises(ValueError, match=message):
        build_objective(ObjectiveConfig(**options))


# ------------------------------------------------------------------------------------------ the trainer


def _records(path):
    return [json.loads(line) for line in open(path)]


def test_trainer_logs_rewards_and_weight_zero_changes_nothing(pair, tmp_path):
    plain = train(make_config(pair, tmp_path / "plain"))
    zero = train(
        make_config(pair, tmp_path / "zero", "objective.reward=tiny:word_count_reward", "objective.reward_weight=0")
    )
    half = train(
        make_config(pair, tmp_path / "half", "objective.reward=tiny:word_count_reward", "objective.reward_weight=0.5")
    )
    a, b, c = weights(plain.final_dir), weights(zero.final_dir), weights(half.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the term with weight 0 adds exactly nothing
    assert any(not torch.equal(a[k], c[k]) for k in a)
    metrics = _records(tmp_path / "half" / "metrics.jsonl")
    samples = _records(tmp_path / "half" / "samples.jsonl")
    for record in samples:  # each logged completion's reward is its word count
        words = [t for t in record["tokens"] if t not in ("<pad>", "<eos>", "<unk>")]  # special tokens skipped
        assert record["reward"] == float(len(words))
        assert "advantage" in record
    assert all("reward/mean" in m and m["reward/mean"] > 0 for m in metrics)
    from dopd.report import build_report

    report = build_report([str(tmp_path / "half")], str(tmp_path / "report"), token_steps=1)
    page = open(report.html_path).read()
    assert "reward" in report.plots and f"<b>reward</b> {samples[-1]['reward']}" in page  # shown per completion


def test_exact_reward_scores_the_answer(pair, tmp_path):
    config = make_config(pair, tmp_path / "run", "objective.reward=exact", "train.steps=1")
    trainer = Trainer(config)
    assert trainer.verifier.reward(0, f"the answer is {trainer.prompts.answers[0]}") == 1.0
    assert trainer.verifier.reward(0, "no idea") == 0.0


def test_resume_with_a_reward_is_bit_identical(pair, tmp_path):
    common = ["train.steps=4", "checkpoint.save_every=2", "objective.reward=tiny:word_count_reward"]
    straight = train(make_config(pair, tmp_path / "straight", *common))
    train_stopped_at(make_config(pair, tmp_path / "resumed", *common), step=2)
    resumed = train(make_config(pair, tmp_path / "resumed", *common, "checkpoint.resume=true"))
    a, b = weights(straight.final_dir), weights(resumed.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "reward, error, message",
    [
        ("no_such_module:f", ConfigError, "module 'no_such_module' cannot be imported"),
        ("tiny:missing", ConfigError, "tiny has no function 'missing'"),
        ("tiny:text_reward", ConfigError, "returned str 'yes' for row"),
        ("tiny:nan_reward", NonFiniteError, "gave nan for a completion of row"),
        ("lab", ConfigError, "use lab:TASK"),
    ],
)
def test_bad_reward_functions_stop_with_one_line(pair, tmp_path, reward, error, message):
    with pytest.raises(error, match=message) as caught:
        train(make_config(pair, tmp_path / "run", f"objective.reward={reward}", "train.steps=1"))
    assert "\n" not in str(caught.value)


def test_a_checker_reward_needs_every_answer(pair, tmp_path):
    rows = [json.loads(line) for line in open(pair["data"])]
    rows[3].pop("answer")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = make_config(pair, tmp_path / "run", "objective.reward=exact", f"data.path={path}")
    with pytest.raises(ConfigError, match="1 of 24 rows have none"):
        Trainer(config)


def test_a_reward_needs_several_rollouts_per_prompt(pair, tmp_path):
    with pytest.raises(ConfigError, match="objective.reward needs rollout.num_generations >= 2"):
        make_config(pair, tmp_path / "run", "objective.reward=exact", "rollout.num_generations=1")
