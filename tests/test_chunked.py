"""`dopd.kernels.chunked` equals `objectives.compute_objective` on the full logits: loss, gradients with respect to
the student's hidden states, head weight and bias, routing and metrics, for every method and the main options."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny import with_scope

from dopd import losses, objectives
from dopd.kernels import chunked_objective, score_target
from dopd.kernels import scores as chunked_module
from dopd.objectives import build_objective
from dopd.plain import compute_objective
from dopd.terms import compute_cuts
from dopd.types import Head, TargetScores

V, K = 11, 3


@dataclass
class Case:
    hidden: torch.Tensor  # student [B, T, H]
    weight: torch.Tensor  # [V, H], shared by the student and the privileged student (same weights)
    bias: torch.Tensor
    self_hidden: torch.Tensor  # [B, T, H]
    teacher_hidden: torch.Tensor  # [B, T, H_T], another hidden size
    teacher_weight: torch.Tensor
    teacher_bias: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


def make_case(dtype=torch.float32, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    B, T, H, H_T = 3, 5, 6, 9

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return Case(
        hidden=randn(B, T, H),
        weight=randn(V, H, scale=0.6),
        bias=randn(V, scale=0.3),
        self_hidden=randn(B, T, H),
        teacher_hidden=randn(B, T, H_T),
        teacher_weight=randn(V, H_T, scale=0.6),
        teacher_bias=randn(V, scale=0.3),
        ids=torch.randint(0, V, (B, T), generator=g),
        mask=mask,
    )


def plain(objective, case: Case, scale: float = 1.0, **kwargs):
    """compute_objective on the logits of the three heads; gradients of hidden, weight and bias."""
    hidden, weight, bias = (x.clone().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    logits = hidden @ weight.T + bias
    self_logits = case.self_hidden @ case.weight.T + case.bias
    teacher_logits = case.teacher_hidden @ case.teacher_weight.T + case.teacher_bias
    out = compute_objective(
        objective,
        logits,
        case.ids,
        case.mask,
        self_logits_BTV=self_logits,
        teacher_logits_BTV=teacher_logits,
        **with_scope(kwargs),
    )
    (scale * out.loss).backward()
    return out, (hidden.grad, weight.grad, bias.grad)


def chunked(objective, case: Case, chunk_size=None, scale: float = 1.0, **kwargs):
    hidden, weight, bias = (x.clone().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    out = chunked_objective(
        objective,
        Head(hidden, weight, bias),
        case.ids,
        case.mask,
        self_head=Head(case.self_hidden, case.weight, case.bias),
        teacher_head=Head(case.teacher_hidden, case.teacher_weight, case.teacher_bias),
        chunk_size=chunk_size,
        **with_scope(kwargs),
    )
    (scale * out.loss).backward()
    return out, (hidden.grad, weight.grad, bias.grad)


def assert_same(expected, actual, rtol):
    (out_a, grads_a), (out_b, grads_b) = expected, actual
    assert out_b.loss.item() == pytest.approx(out_a.loss.item(), rel=rtol)
    for name, a, b in zip(("hidden", "weight", "bias"), grads_a, grads_b):
        assert b is not None, name
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * float(a.abs().max()), msg=name)
    if out_a.regime is not None:
        assert torch.equal(out_a.regime, out_b.regime)
    torch.testing.assert_close(out_b.token_loss, out_a.token_loss, rtol=rtol, atol=rtol)
    assert out_a.metrics.keys() == out_b.metrics.keys()
    for key in out_a.metrics:
        a, b = float(out_a.metrics[key]), float(out_b.metrics[key])
        assert b == pytest.approx(a, rel=max(rtol, 1e-5), abs=1e-6), key


OPTIONS = [
    {"method": "dopd"},
    {"method": "dopd-rkl"},
    {"method": "opd"},
    {"method": "opd-priv"},
    {"method": "opsd"},
    {"method": "gkd", "jsd_beta": 0.3},
    {"method": "eopd"},
    {"topk_support": "union"},
    {"topk_support": "student"},
    {"topk_tail": "bucket"},
    {"topk_support": "union", "topk_tail": "bucket", "divergence": "js"},
    {"routing": False},
    {"regimes": ["LL", "HT"]},
    {"target": "self"},
    {"drop_fraction": 0.3, "drop_mode": "random"},
    {"drop_fraction": 0.3, "drop_mode": "lowest_gap"},
    {"drop_fraction": 0.3, "drop_mode": "highest_gap"},
    {"granularity": "full"},
    {"granularity": "sampled", "divergence": "forward_kl"},
    {"temperature": 2.0},
    {"normalization": "zscore"},
    {"normalization": "minmax"},
    {"teacher_full": "topk_bucket"},
    {"method": "eopd", "teacher_full": "topk_bucket"},
    {"method": "sft"},
]


def option_id(option):
    return "-".join(f"{k}={v}" for k, v in option.items())


@pytest.fixture(params=["kept", "recomputed", "one-scratch-row"])
def target_path(request, monkeypatch):
    """How the loss gets a target's full log-probs: kept by the scores (tiny vocabularies) or recomputed from the
    head (large ones); the last also sums rows through one row of scratch at a time."""
    if request.param != "kept":
        monkeypatch.setattr(chunked_module, "_KEEP_ELEMENTS", 0)
    if request.param == "one-scratch-row":
        monkeypatch.setattr(chunked_module, "_SCRATCH_ELEMENTS", V)
    return request.param


@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_chunked_equals_plain_float32(option, target_path):
    objective = build_objective({"top_k": K, **option})
    case = make_case()
    expected = plain(objective, case, generator=torch.Generator().manual_seed(5))
    actual = chunked(objective, case, 3, generator=torch.Generator().manual_seed(5))
    assert expected[0].loss.item() != 0
    assert_same(expected, actual, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 100, None])  # None: the default, larger than the 9 tokens
@pytest.mark.parametrize("option", [OPTIONS[0], OPTIONS[6], OPTIONS[7], OPTIONS[14]], ids=option_id)
def test_chunk_sizes(option, chunk_size):
    objective = build_objective({"top_k": K, **option})
    case = make_case(seed=3)
    expected = plain(objective, case, generator=torch.Generator().manual_seed(6))
    actual = chunked(objective, case, chunk_size, generator=torch.Generator().manual_seed(6))
    assert_same(expected, actual, rtol=1e-5)


@pytest.mark.parametrize("option", [OPTIONS[i] for i in (0, 2, 6, 7, 10, 19)], ids=option_id)
def test_chunked_equals_plain_float64(option, target_path):
    objective = build_objective({"top_k": K, **option})
    case = make_case(torch.float64, seed=1)
    assert_same(plain(objective, case), chunked(objective, case, chunk_size=2), rtol=1e-10)


def test_case_covers_every_regime():
    out, _ = plain(build_objective({"top_k": K}), make_case())
    valid = out.regime[make_case().mask]
    assert set(valid.tolist()) == {0, 1, 2, 3}


def test_without_bias():
    objective = build_objective({"top_k": K})
    case = make_case(seed=2)
    hidden, weight = case.hidden.clone().requires_grad_(), case.weight.clone().requires_grad_()
    out = chunked_objective(
        objective,
        Head(hidden, weight),
        case.ids,
        case.mask,
        self_head=Head(case.self_hidden, case.weight),
        teacher_head=Head(case.teacher_hidden, case.teacher_weight),
        chunk_size=4,
    )
    out.loss.backward()
    hidden_p, weight_p = case.hidden.clone().requires_grad_(), case.weight.clone().requires_grad_()
    reference = compute_objective(
        objective,
        hidden_p @ weight_p.T,
        case.ids,
        case.mask,
        self_logits_BTV=case.self_hidden @ case.weight.T,
        teacher_logits_BTV=case.teacher_hidden @ case.teacher_weight.T,
    )
    reference.loss.backward()
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, hidden_p.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, weight_p.grad, rtol=1e-5, atol=1e-7)


def test_gradient_scales_with_grad_output():
    objective = build_objective({"top_k": K})
    case = make_case()
    expected = plain(objective, case, scale=2.0)
    actual = chunked(objective, case, chunk_size=3, scale=2.0)
    assert_same(expected, actual, rtol=1e-5)
    once = chunked(objective, case, chunk_size=3)
    torch.testing.assert_close(actual[1][0], 2 * once[1][0], rtol=1e-6, atol=1e-9)


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    objective = build_objective({"top_k": K})
    case = make_case()
    case.mask = torch.zeros_like(case.mask)
    for form in (chunked, plain):
        out, grads = form(objective, case)
        assert out.loss.item() == 0.0
        for grad in grads:
            assert grad is not None and (grad == 0).all()
        assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("option", [{"method": "dopd"}, {"method": "eopd"}, {"topk_support": "union"}], ids=option_id)
def test_precomputed_scores_and_thresholds_give_the_same_result(option):
    objective = build_objective({"top_k": K, **option})
    case = make_case()
    self_scores = score_target(
        Head(case.self_hidden, case.weight, case.bias), case.ids, case.mask, objective.top_k_for("self"), chunk_size=3
    )
    teacher_scores = score_target(
        Head(case.teacher_hidden, case.teacher_weight, case.teacher_bias),
        case.ids,
        case.mask,
        objective.top_k_for("teacher"),
        chunk_size=3,
    )
    cuts = compute_cuts(objective, self_scores, teacher_scores, case.mask)
    assert cuts.routing is not None or cuts.teacher_entropy is not None
    given = chunked(objective, case, 3, self_scores=self_scores, teacher_scores=teacher_scores, cuts=cuts)
    computed = chunked(objective, case, 3)
    assert given[0].thresholds == computed[0].thresholds
    assert_same(computed, given, rtol=1e-6)


def _scores_only(scores: TargetScores) -> TargetScores:
    """What a served teacher gives: the sampled token's log-probs, an entropy and a top-K; no full log-probs."""
    return TargetScores(scores.token_logprobs, scores.entropy, scores.topk_logprobs, scores.topk_ids)


@pytest.mark.parametrize(
    "option", [{"method": "dopd"}, {"method": "opd-priv"}, {"method": "gkd"}, {"method": "eopd"}], ids=option_id
)
def test_a_teacher_given_by_its_top_k_alone_matches_the_plain_form(option, monkeypatch):
    """A served teacher: no head, only its scores. With teacher_full=topk_bucket (HT's JS on the teacher's top-K
    plus a tail entry) the chunked form equals the plain form computed from the teacher's full logits."""
    monkeypatch.setattr(chunked_module, "_KEEP_ELEMENTS", 0)  # score_target computes the top-K
    objective = build_objective({"top_k": K, "teacher_full": "topk_bucket", **option})
    assert all(t.granularity != "full" for t in objective.terms if t.target == "teacher")
    case = make_case()
    teacher = Head(case.teacher_hidden, case.teacher_weight, case.teacher_bias)
    scores = _scores_only(score_target(teacher, case.ids, case.mask, objective.top_k_for("teacher")))
    expected = plain(objective, case, generator=torch.Generator().manual_seed(5))
    hidden, weight, bias = (x.clone().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    out = chunked_objective(
        objective,
        Head(hidden, weight, bias),
        case.ids,
        case.mask,
        self_head=Head(case.self_hidden, case.weight, case.bias),
        teacher_scores=scores,
        chunk_size=3,
        **with_scope({"generator": torch.Generator().manual_seed(5)}),
    )
    out.loss.backward()
    assert expected[0].loss.item() != 0
    assert_same(expected, (out, (hidden.grad, weight.grad, bias.grad)), rtol=1e-5)


def test_top_k_with_a_tail_bucket_over_the_whole_vocabulary_is_the_full_divergence():
    """K = V: the teacher's top-K is its whole distribution and the tail is empty, so HT's fallback is exact."""
    case = make_case()
    full = plain(build_objective({"top_k": V}), case)
    bucket = plain(build_objective({"top_k": V, "teacher_full": "topk_bucket"}), case)
    assert bucket[0].metrics["frac/HT"] > 0
    assert_same(full, bucket, rtol=1e-5)


def test_a_teacher_without_a_head_needs_the_top_k_fallback(monkeypatch):
    monkeypatch.setattr(chunked_module, "_KEEP_ELEMENTS", 0)
    case = make_case()
    teacher = Head(case.teacher_hidden, case.teacher_weight, case.teacher_bias)
    student = Head(case.hidden, case.weight, case.bias)
    own = Head(case.self_hidden, case.weight, case.bias)
    for option, message in (
        ({}, "teacher_full=topk_bucket"),
        ({"teacher_full": "topk_bucket", "topk_support": "union"}, "topk_support=target"),
    ):
        objective = build_objective({"top_k": K, **option})
        scores = _scores_only(score_target(teacher, case.ids, case.mask, K))
        with pytest.raises(ValueError, match=message):
            chunked_objective(objective, student, case.ids, case.mask, self_head=own, teacher_scores=scores)
    objective = build_objective({"top_k": K, "teacher_full": "topk_bucket"})
    scores = _scores_only(score_target(teacher, case.ids, case.mask, K - 1))
    with pytest.raises(ValueError, match="objective.top_k = 3"):
        chunked_objective(objective, student, case.ids, case.mask, self_head=own, teacher_scores=scores)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_score_target_equals_full_logits(temperature, keep, monkeypatch):
    """Chunk by chunk (two tokens at a time) with the top-K, or in one piece keeping the full log-probs."""
    if not keep:
        monkeypatch.setattr(chunked_module, "_KEEP_ELEMENTS", 0)
    case = make_case()
    head = Head(case.teacher_hidden, case.teacher_weight, case.teacher_bias)
    scores = score_target(head, case.ids, case.mask, top_k=K, temperature=temperature, chunk_size=2)
    logprobs = torch.log_softmax((case.teacher_hidden @ case.teacher_weight.T + case.teacher_bias) / temperature, -1)
    reference = TargetScores.from_logprobs(logprobs, case.ids, K)
    valid = case.mask
    torch.testing.assert_close(scores.token_logprobs[valid], reference.token_logprobs[valid], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.entropy[valid], losses.entropy(logprobs)[valid], rtol=1e-5, atol=1e-6)
    if keep:  # the kept log-probs hold the top-K: it is taken in the loss, for the tokens that need it
        assert scores.topk_logprobs is None and scores.topk_ids is None
        torch.testing.assert_close(scores.full_logprobs[valid], logprobs[valid], rtol=1e-5, atol=1e-6)
    else:
        assert scores.full_logprobs is None
        torch.testing.assert_close(scores.topk_logprobs[valid], reference.topk_logprobs[valid], rtol=1e-5, atol=1e-6)
        assert torch.equal(scores.topk_ids[valid], reference.topk_ids[valid])
        assert (scores.topk_logprobs[~valid] == 0).all() and (scores.topk_ids[~valid] == 0).all()
        assert score_target(head, case.ids, case.mask).topk_logprobs is None
    assert (scores.token_logprobs[~valid] == 0).all() and (scores.entropy[~valid] == 0).all()


def test_score_target_keeps_full_logprobs_of_small_passes_only(monkeypatch):
    case = make_case()
    head = Head(case.teacher_hidden, case.teacher_weight, case.teacher_bias)
    positions = case.mask.numel()  # padding included
    monkeypatch.setattr(chunked_module, "_KEEP_ELEMENTS", positions * V)
    assert score_target(head, case.ids, case.mask).full_logprobs is not None
    monkeypatch.setattr(chunked_module, "_KEEP_ELEMENTS", positions * V - 1)
    assert score_target(head, case.ids, case.mask, chunk_size=2).full_logprobs is None


def test_chunked_checks_its_inputs():
    objective = build_objective({"top_k": K})
    case = make_case()
    student, self_head = Head(case.hidden, case.weight, case.bias), Head(case.self_hidden, case.weight, case.bias)
    teacher = Head(case.teacher_hidden, case.teacher_weight, case.teacher_bias)
    narrow = Head(case.teacher_hidden, case.teacher_weight[:-1], case.teacher_bias[:-1])

    def call(objective, **heads):
        return chunked_objective(objective, student, case.ids, case.mask, self_head=self_head, **heads)

    with pytest.raises(ValueError, match=r"11 rows and the teacher's has 10.*tokenizer"):
        call(objective, teacher_head=narrow)
    with pytest.raises(ValueError, match="needs the teacher's hidden states"):
        call(objective)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        call(build_objective({"top_k": 12}), teacher_head=teacher)


def test_num_sequences_matches_plain():
    objective = build_objective({"top_k": K})
    case = make_case()
    assert_same(plain(objective, case, num_sequences=7), chunked(objective, case, 2, num_sequences=7), rtol=1e-5)
    assert objectives.METHODS == ("dopd", "dopd-rkl", "opd", "opd-priv", "opsd", "gkd", "eopd", "sft")  # in OPTIONS
