"""Divergences of `dopd.losses`: hand values on tiny vocabularies, identities, Top-K against a plain-loop
reference, -inf handling, fp32 accumulation, the sampled-token estimator and gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from dopd import losses

LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------ plain references


def kl(p: list[float], q: list[float]) -> float:
    """KL(p‖q) in plain Python; entries with p = 0 add nothing."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def jsd(s: list[float], t: list[float], beta: float) -> float:
    """GKD convention: β KL(t‖m) + (1−β) KL(s‖m), m = β t + (1−β) s; end points forward / reverse KL."""
    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def plain_divergence(name: str, s: list[float], t: list[float], beta: float = 0.5) -> float:
    return {
        "reverse_kl": lambda: kl(s, t),
        "forward_kl": lambda: kl(t, s),
        "js": lambda: jsd(s, t, 0.5),
        "jsd": lambda: jsd(s, t, beta),
    }[name]()


def lp(probs: list[float]) -> torch.Tensor:
    """Log-probabilities (float64) of a list of probabilities; 0 becomes -inf."""
    return torch.tensor([math.log(p) if p > 0 else float("-inf") for p in probs], dtype=torch.float64)


def plain_topk(name: str, s: list[float], t: list[float], k: int, support: str, tail: str, beta: float) -> float:
    """Top-K divergence with Python loops: pick the support, then renormalize or append the tail mass."""
    by_target = sorted(range(len(t)), key=lambda i: -t[i])[:k]
    by_student = sorted(range(len(s)), key=lambda i: -s[i])[:k]
    if support == "target":
        ids = by_target
    elif support == "student":
        ids = by_student
    else:
        ids = list(by_target)
        for i in by_student:
            if i not in ids:
                ids.append(i)
    s_sub = [s[i] for i in ids]
    t_sub = [t[i] for i in ids]
    if tail == "renormalize":
        s_sub = [x / sum(s_sub) for x in s_sub]
        t_sub = [x / sum(t_sub) for x in t_sub]
    else:
        s_sub.append(max(1.0 - sum(s_sub), 1e-30))
        t_sub.append(max(1.0 - sum(t_sub), 1e-30))
    return plain_divergence(name, s_sub, t_sub, beta)


S2, T2 = [0.25, 0.75], [0.5, 0.5]
S3, T3 = [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]


# ------------------------------------------------------------------------------------------ hand values


def test_reverse_kl_hand_value_v2():
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert losses.reverse_kl(lp(S2), lp(T2)).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.130812035941137, rel=1e-12)


def test_forward_kl_hand_value_v2():
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert losses.forward_kl(lp(S2), lp(T2)).item() == pytest.approx(expected, rel=1e-12)


def test_js_hand_value_v2():
    m = [0.375, 0.625]
    expected = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert losses.js(lp(S2), lp(T2)).item() == pytest.approx(expected, rel=1e-12)


def test_generalized_jsd_hand_value_v2():
    m = [0.3 * 0.5 + 0.7 * 0.25, 0.3 * 0.5 + 0.7 * 0.75]  # [0.325, 0.675]
    expected = 0.3 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.7 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert losses.generalized_jsd(lp(S2), lp(T2), 0.3).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js"])
def test_hand_values_v3(name):
    expected = {
        "reverse_kl": 0.2 * math.log(0.2 / 0.6) + 0.3 * math.log(0.3 / 0.3) + 0.5 * math.log(0.5 / 0.1),
        "forward_kl": 0.6 * math.log(0.6 / 0.2) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.5),
        "js": 0.5 * (0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(1.0) + 0.1 * math.log(0.1 / 0.3))
        + 0.5 * (0.2 * math.log(0.2 / 0.4) + 0.3 * math.log(1.0) + 0.5 * math.log(0.5 / 0.3)),
    }[name]
    assert losses.divergence(name, lp(S3), lp(T3)).item() == pytest.approx(expected, rel=1e-12)


def test_generalized_jsd_end_points():
    s, t = lp(S3), lp(T3)
    assert losses.generalized_jsd(s, t, 0.0).item() == pytest.approx(kl(T3, S3), rel=1e-12)
    assert losses.generalized_jsd(s, t, 1.0).item() == pytest.approx(kl(S3, T3), rel=1e-12)
    assert losses.generalized_jsd(s, t, 0.5).item() == pytest.approx(losses.js(s, t).item(), rel=1e-12)
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(s, t, 1.5)


def test_entropy_hand_values():
    assert losses.entropy(lp([0.25, 0.75])).item() == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-12
    )
    assert losses.entropy(lp([0.5, 0.5, 0.0])).item() == pytest.approx(LOG2, rel=1e-12)
    assert losses.entropy(torch.full((2, 4), -math.log(4), dtype=torch.float64)).tolist() == pytest.approx(
        [math.log(4)] * 2, rel=1e-12
    )
    assert losses.entropy(lp([1.0, 0.0, 0.0])).item() == 0.0


# ----------------------------------------------------------------------------------------- identities


def random_logprobs(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(*shape, generator=generator, dtype=torch.float64), -1)


def test_kl_of_a_distribution_with_itself_is_zero():
    p = random_logprobs(4, 7)
    for name in losses.DIVERGENCES:
        assert losses.divergence(name, p, p, beta=0.3).abs().max().item() < 1e-12


def test_js_symmetric_bounded_and_reaches_log2_on_disjoint_supports():
    s, t = random_logprobs(6, 5, seed=1, scale=4.0), random_logprobs(6, 5, seed=2, scale=4.0)
    torch.testing.assert_close(losses.js(s, t), losses.js(t, s), rtol=1e-12, atol=1e-14)
    assert (losses.js(s, t) <= LOG2).all() and (losses.js(s, t) > 0).all()
    disjoint = losses.js(lp([1.0, 0.0, 0.0]), lp([0.0, 0.5, 0.5]))
    assert disjoint.item() == pytest.approx(LOG2, rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_generalized_jsd_nonnegative(beta):
    s, t = random_logprobs(8, 6, seed=3, scale=3.0), random_logprobs(8, 6, seed=4, scale=3.0)
    values = losses.generalized_jsd(s, t, beta)
    assert (values >= 0).all()
    expected = [jsd(a.exp().tolist(), b.exp().tolist(), beta) for a, b in zip(s, t)]
    assert values.tolist() == pytest.approx(expected, rel=1e-10)


def test_divergence_rejects_unknown_name_and_shape_mismatch():
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, js, jsd"):
        losses.divergence("tv", lp(S2), lp(T2))
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        losses.reverse_kl(lp(S2), lp(T3))


# ---------------------------------------------------------------------------------------------- Top-K


@pytest.mark.parametrize("name", losses.DIVERGENCES)
@pytest.mark.parametrize("support", losses.TOPK_SUPPORTS)
@pytest.mark.parametrize("tail", losses.TOPK_TAILS)
def test_topk_with_k_equal_to_vocabulary_is_the_full_divergence(name, support, tail):
    s, t = random_logprobs(5, 6, seed=5), random_logprobs(5, 6, seed=6)
    full = losses.divergence(name, s, t, beta=0.3)
    topk = losses.topk_divergence(name, s, t, k=6, support=support, tail=tail, beta=0.3)
    torch.testing.assert_close(topk, full, rtol=1e-10, atol=1e-12)


def test_topk_hand_cases_v3():
    s, t = lp(S3), lp(T3)  # target's order: 0 > 1 > 2, student's order: 2 > 1 > 0
    # K = 2, target support {0, 1}, renormalized: s → [0.4, 0.6], t → [2/3, 1/3]
    renorm = 0.4 * math.log(0.4 / (2 / 3)) + 0.6 * math.log(0.6 / (1 / 3))
    assert losses.topk_divergence("reverse_kl", s, t, 2).item() == pytest.approx(renorm, rel=1e-12)
    # K = 1, target support {0} with a tail bucket: s → [0.2, 0.8], t → [0.6, 0.4]
    bucket = 0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4)
    assert losses.topk_divergence("reverse_kl", s, t, 1, tail="bucket").item() == pytest.approx(bucket, rel=1e-12)
    # K = 1 renormalized: one token on each side, nothing to compare
    assert losses.topk_divergence("reverse_kl", s, t, 1).item() == pytest.approx(0.0, abs=1e-15)
    # K = 2, student support {2, 1}: s → [0.625, 0.375], t → [0.25, 0.75]
    student = 0.625 * math.log(0.625 / 0.25) + 0.375 * math.log(0.375 / 0.75)
    assert losses.topk_divergence("reverse_kl", s, t, 2, support="student").item() == pytest.approx(student, rel=1e-12)
    # K = 1, union {0} ∪ {2}: s → [2/7, 5/7], t → [6/7, 1/7]
    union = (2 / 7) * math.log(2 / 6) + (5 / 7) * math.log(5 / 1)
    assert losses.topk_divergence("reverse_kl", s, t, 1, support="union").item() == pytest.approx(union, rel=1e-12)
    # K = 2, target support, bucket: covers all but token 2, the bucket holds it: the full divergence
    assert losses.topk_divergence("forward_kl", s, t, 2, tail="bucket").item() == pytest.approx(kl(T3, S3), rel=1e-12)


@pytest.mark.parametrize("name", losses.DIVERGENCES)
@pytest.mark.parametrize("support", losses.TOPK_SUPPORTS)
@pytest.mark.parametrize("tail", losses.TOPK_TAILS)
def test_topk_equals_plain_loop_reference(name, support, tail):
    s, t = random_logprobs(4, 7, seed=7), random_logprobs(4, 7, seed=8)
    fast = losses.topk_divergence(name, s, t, k=3, support=support, tail=tail, beta=0.3)
    expected = [plain_topk(name, a.exp().tolist(), b.exp().tolist(), 3, support, tail, 0.3) for a, b in zip(s, t)]
    assert fast.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_topk_support_ids_and_union_mask():
    s, t = lp(S3), lp(T3)
    ids, mask = losses.topk_support(s, t, 2, "union")
    assert ids.tolist() == [0, 1, 2, 1] and mask.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="vocabulary size 3"):
        losses.topk_support(s, t, 4)
    with pytest.raises(ValueError, match="target, student, union"):
        losses.topk_support(s, t, 2, "teacher")


# ------------------------------------------------------------------------------------------------- -inf


def test_minus_inf_entries_give_no_nan_in_values_or_gradients():
    # Vocabulary entries 3 and 4 are impossible under both (masked logits), entry 2 under the target only
    # (KL(t‖·) and JS stay finite there) and the student only has mass on finite target entries.
    logits = torch.tensor([[1.0, 0.5, -0.3, float("-inf"), float("-inf")]], dtype=torch.float64, requires_grad=True)
    target = torch.log_softmax(torch.tensor([[0.2, 1.0, 0.1, float("-inf"), float("-inf")]], dtype=torch.float64), -1)
    target_no_2 = target.clone()
    target_no_2[0, 2] = float("-inf")
    target_no_2 = torch.log_softmax(target_no_2, -1)
    cases = []
    for name in losses.DIVERGENCES:
        cases.append((name, target, lambda s, t, n=name: losses.divergence(n, s, t, beta=0.3)))
        for support in losses.TOPK_SUPPORTS:
            for tail in losses.TOPK_TAILS:
                cases.append(
                    (
                        name,
                        target,
                        lambda s, t, n=name, a=support, b=tail: losses.topk_divergence(n, s, t, 2, a, b, 0.3),
                    )
                )
    # Divergences that stay finite when the student has mass where the target has none.
    for name in ("forward_kl", "js", "jsd"):
        cases.append((name, target_no_2, lambda s, t, n=name: losses.divergence(n, s, t, beta=0.3)))
    for name, tgt, fn in cases:
        logits.grad = None
        value = fn(torch.log_softmax(logits, -1), tgt)
        value.sum().backward()
        assert torch.isfinite(value).all(), name
        assert torch.isfinite(logits.grad).all(), name
    # Values on the finite entries equal the plain reference.
    s = torch.log_softmax(logits.detach(), -1)[0, :3].exp().tolist()
    t = target[0, :3].exp().tolist()
    js_value = losses.js(torch.log_softmax(logits.detach(), -1), target).item()
    assert js_value == pytest.approx(jsd(s, t, 0.5), rel=1e-12)


def test_entropy_and_kl_ignore_minus_inf_in_the_first_argument():
    p = lp([0.5, 0.5, 0.0])
    q = lp([0.25, 0.25, 0.5])
    assert losses.reverse_kl(p, q).item() == pytest.approx(math.log(2.0), rel=1e-12)


# ------------------------------------------------------------------------------------ fp32 accumulation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    # A large vocabulary makes a half-precision sum lose about 1e-2; float32 accumulation keeps ~1e-6.
    s = random_logprobs(3, 4096, seed=9, scale=1.0).to(dtype)
    t = random_logprobs(3, 4096, seed=10, scale=1.0).to(dtype)
    s64, t64 = s.double(), t.double()
    checks = [
        (losses.reverse_kl(s, t), losses.reverse_kl(s64, t64)),
        (losses.forward_kl(s, t), losses.forward_kl(s64, t64)),
        (losses.js(s, t), losses.js(s64, t64)),
        (losses.topk_divergence("reverse_kl", s, t, 64), losses.topk_divergence("reverse_kl", s64, t64, 64)),
        (losses.entropy(s), losses.entropy(s64)),
        (
            losses.sampled_token_divergence("js", s[:, 0], t[:, 0]),
            losses.sampled_token_divergence("js", s64[:, 0], t64[:, 0]),
        ),
    ]
    for value, reference in checks:
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference, rtol=2e-5, atol=2e-6)


def test_float64_stays_float64():
    assert losses.js(lp(S3), lp(T3)).dtype == torch.float64
    assert losses.accumulation_dtype(torch.bfloat16) == torch.float32


# ------------------------------------------------------------------------------------------ sampled token


def integrand_by_hand(name: str, s: float, t: float, beta: float = 0.5) -> float:
    if name == "reverse_kl":
        return math.log(s) - math.log(t)
    if name == "forward_kl":
        return (t / s) * math.log(t / s)
    b = 0.5 if name == "js" else beta
    m = b * t + (1 - b) * s
    return b * (t / s) * math.log(t / m) + (1 - b) * math.log(s / m)


def dloss_dlogs_by_hand(name: str, s: float, t: float, beta: float = 0.5) -> float:
    """d surrogate / d log s(y) = g + ∂g/∂log s (score-function part g, pathwise part ∂g)."""
    g = integrand_by_hand(name, s, t, beta)
    if name == "reverse_kl":
        return g  # the pathwise part has mean zero and is left out: OPD's advantage
    if name == "forward_kl":
        return g + (-(t / s) * math.log(t / s) - t / s)  # = −t/s
    b = 0.5 if name == "js" else beta
    m = b * t + (1 - b) * s
    r = t / s
    dlogm = (1 - b) * s / m
    return g + (-b * r * math.log(t / m) - b * r * dlogm + (1 - b) * (1 - dlogm))


@pytest.mark.parametrize("name,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("jsd", 0.3)])
def test_sampled_token_value_and_gradient_by_hand(name, beta):
    s_vals, t_vals = [0.2, 0.7, 0.05], [0.6, 0.1, 0.05]
    student = torch.tensor([math.log(x) for x in s_vals], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([math.log(x) for x in t_vals], dtype=torch.float64, requires_grad=True)
    value = losses.sampled_token_divergence(name, student, target, beta)
    expected = [integrand_by_hand(name, s, t, beta) for s, t in zip(s_vals, t_vals)]
    assert value.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    value.sum().backward()
    grads = [dloss_dlogs_by_hand(name, s, t, beta) for s, t in zip(s_vals, t_vals)]
    assert student.grad.tolist() == pytest.approx(grads, rel=1e-10, abs=1e-13)
    assert target.grad is None  # the target carries no gradient


def test_sampled_reverse_kl_is_opd_advantage():
    student = torch.tensor([-0.3, -2.0, -1.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([-1.5, -0.4, -1.0], dtype=torch.float64)
    losses.sampled_token_divergence("reverse_kl", student, target).sum().backward()
    assert student.grad.tolist() == pytest.approx([-0.3 + 1.5, -2.0 + 0.4, 0.0], rel=1e-12, abs=1e-15)
    assert losses.sampled_integrand("jsd", student, target, 1.0).tolist() == pytest.approx([1.2, -1.6, 0.0])


@pytest.mark.parametrize("name,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("jsd", 0.3)])
def test_sampled_token_is_unbiased_in_value_and_gradient(name, beta):
    """E_{y~s}[surrogate(y)] = D(s, t) and E_{y~s}[∇ surrogate(y)] = ∇D(s, t), by exact expectation over y."""
    logits = torch.tensor([0.4, -1.0, 1.2, 0.1], dtype=torch.float64, requires_grad=True)
    target = torch.log_softmax(torch.tensor([1.0, 0.3, -0.5, 0.2], dtype=torch.float64), -1)
    full = losses.divergence(name, torch.log_softmax(logits, -1), target, beta)
    (full_grad,) = torch.autograd.grad(full, logits)
    s = torch.log_softmax(logits.detach(), -1).exp()
    expected_value, expected_grad = 0.0, torch.zeros(4, dtype=torch.float64)
    for y in range(4):
        token = torch.log_softmax(logits, -1)[y]
        value = losses.sampled_token_divergence(name, token, target[y], beta)
        (grad,) = torch.autograd.grad(value, logits)
        expected_value += float(s[y]) * value.item()
        expected_grad += s[y] * grad
    assert expected_value == pytest.approx(full.item(), rel=1e-10)
    torch.testing.assert_close(expected_grad, full_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js"])
def test_sampled_token_monte_carlo_mean_approaches_divergence(name):
    student = torch.log_softmax(torch.tensor([0.4, -1.0, 1.2, 0.1], dtype=torch.float64), -1)
    target = torch.log_softmax(torch.tensor([1.0, 0.3, -0.5, 0.2], dtype=torch.float64), -1)
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(student.exp(), 40000, replacement=True, generator=generator)
    values = losses.sampled_token_divergence(name, student[samples], target[samples])
    standard_error = float(values.std()) / math.sqrt(values.numel())
    full = losses.divergence(name, student, target).item()
    assert abs(float(values.mean()) - full) < 4 * standard_error
    assert standard_error < 0.05 * full  # the check is tight enough to fail on a wrong integrand


# --------------------------------------------------------------------------------------------- gradcheck


def _target(shape, seed):
    return random_logprobs(*shape, seed=seed, scale=1.5)


@pytest.mark.parametrize("name,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("jsd", 0.3)])
def test_gradcheck_full_divergences(name, beta):
    logits = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    target = _target((3, 5), 12)

    def fn(x):
        return losses.divergence(name, torch.log_softmax(x, -1), target, beta)

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("name", ["reverse_kl", "js"])
@pytest.mark.parametrize("support", losses.TOPK_SUPPORTS)
@pytest.mark.parametrize("tail", losses.TOPK_TAILS)
def test_gradcheck_topk(name, support, tail):
    logits = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(13), requires_grad=True)
    target = _target((3, 6), 14)

    def fn(x):
        return losses.topk_divergence(name, torch.log_softmax(x, -1), target, 2, support, tail)

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("name,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("jsd", 0.3)])
def test_gradcheck_sampled_token(name, beta):
    """The integrand g is differentiated correctly, and Σ_y sg(s(y))·surrogate(y), whose value is D(s, t),
    has the gradient of D: gradcheck of the expected surrogate checks the estimator's gradient."""
    logits = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(15), requires_grad=True)
    target = _target((2, 4), 16)

    def integrand(x):
        return losses.sampled_integrand(name, torch.log_softmax(x, -1), target, beta)

    def expected_surrogate(x):
        logprobs = torch.log_softmax(x, -1)
        return (logprobs.detach().exp() * losses.sampled_token_divergence(name, logprobs, target, beta)).sum(-1)

    assert torch.autograd.gradcheck(integrand, (logits,))
    assert torch.autograd.gradcheck(expected_surrogate, (logits,))
