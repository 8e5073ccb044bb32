"""`dopd.kernels.logit_grads`: the closed-form logit gradients of the full-vocabulary divergences against autograd
of `losses.divergence` and against finite differences (gradcheck), the in-place log-softmax, extreme logits."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from dopd import losses
from dopd.kernels.logit_grads import full_divergence_, log_softmax_, log_softmax_rows_, rowdot, support_divergence

NAMES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.9)]


def closed_form(name, beta, logits_RV, target_logprobs_RV, coefficient_R, scratch_rows=2):
    """(values, gradient of Σ coefficient·value with respect to the logits) from `full_divergence_`."""
    logprobs, probs = logits_RV.clone(), torch.empty_like(logits_RV)
    log_softmax_(logprobs, probs)
    q = torch.full_like(logits_RV, float("nan"))  # every entry must be written
    scratch = [torch.full_like(logits_RV[:scratch_rows], float("nan")) for _ in range(2)]
    values, scale = full_divergence_(name, beta, coefficient_R, logprobs, probs, target_logprobs_RV, q, scratch)
    return values, q - scale[:, None] * probs


def by_autograd(name, beta, logits_RV, target_logprobs_RV, coefficient_R):
    logits = logits_RV.clone().requires_grad_()
    values = losses.divergence(name, torch.log_softmax(logits, -1), target_logprobs_RV, beta)
    (coefficient_R * values).sum().backward()
    return values.detach(), logits.grad


def make(rows=4, vocab=9, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(rows, vocab, generator=g, dtype=dtype)
    target = torch.log_softmax(scale * torch.randn(rows, vocab, generator=g, dtype=dtype), -1)
    coefficient = torch.rand(rows, generator=g, dtype=dtype) + 0.1
    return logits, target, coefficient


@pytest.mark.parametrize("name,beta", NAMES)
def test_values_and_gradients_equal_autograd_float64(name, beta):
    logits, target, coefficient = make()
    values, grad = closed_form(name, beta, logits, target, coefficient)
    expected_values, expected_grad = by_autograd(name, beta, logits, target, coefficient)
    torch.testing.assert_close(values, expected_values, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [3.0, 40.0])
@pytest.mark.parametrize("name,beta", NAMES)
def test_float32_is_as_accurate_as_autograd(name, beta, scale):
    """In float32 at a larger vocabulary, the closed form is as close to the float64 reference as autograd in
    float32 is (within 4× and 1e-7). Logits spread over ±160 (scale 40) put most entries of s, t and the mixture
    below float32's range and saturate the JSD (its gradient is about 1e-17): no NaN, no error from cancellation."""
    logits, target, coefficient = make(rows=3, vocab=4096, scale=scale, seed=1)
    values, grad = closed_form(name, beta, logits.float(), target.float(), coefficient.float())
    values_32, grad_32 = by_autograd(name, beta, logits.float(), target.float(), coefficient.float())
    expected_values, expected_grad = by_autograd(name, beta, logits, target, coefficient)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    for ours, autograd_32, reference in ((values, values_32, expected_values), (grad, grad_32, expected_grad)):
        error = (ours.double() - reference).abs().max()
        assert error <= 4 * (autograd_32.double() - reference).abs().max() + 1e-7


@pytest.mark.parametrize("scratch_rows", [1, 3, 8])
def test_scratch_of_any_number_of_rows(scratch_rows):
    logits, target, coefficient = make(rows=5, seed=2)
    for name, beta in NAMES:
        expected = closed_form(name, beta, logits, target, coefficient)
        actual = closed_form(name, beta, logits, target, coefficient, scratch_rows)
        torch.testing.assert_close(actual, expected, rtol=1e-14, atol=1e-15)


def test_log_softmax_with_a_few_rows_of_scratch():
    logits, _, _ = make(rows=5, vocab=7, scale=30.0, seed=4)
    logprobs = logits.clone()
    log_softmax_rows_(logprobs, [torch.empty(2, 7, dtype=torch.float64)])
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1), rtol=1e-12, atol=1e-12)


class _ClosedForm(torch.autograd.Function):
    """The divergence's value with the closed form as its backward, for gradcheck against finite differences."""

    @staticmethod
    def forward(ctx, logits, target, name, beta):
        values, grad = closed_form(name, beta, logits, target, torch.ones(logits.shape[0], dtype=logits.dtype))
        ctx.save_for_backward(grad)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        (grad,) = ctx.saved_tensors
        return grad_values[:, None] * grad, None, None, None


@pytest.mark.parametrize("name,beta", NAMES)
def test_gradcheck(name, beta):
    logits, target, _ = make(rows=3, vocab=5, seed=3)
    assert torch.autograd.gradcheck(lambda x: _ClosedForm.apply(x, target, name, beta), (logits.requires_grad_(),))


def test_a_wrong_gradient_fails_gradcheck():
    """The gradcheck above can fail: the JSD gradient without its (1 − β) factor is rejected."""
    logits, target, _ = make(rows=3, vocab=5, seed=3)

    class Wrong(_ClosedForm):
        @staticmethod
        def backward(ctx, grad_values):
            (grad,) = ctx.saved_tensors
            return grad_values[:, None] * grad / 0.7, None, None, None

    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x: Wrong.apply(x, target, "jsd", 0.3), (logits.requires_grad_(),))


def test_log_softmax_in_place_and_rowdot():
    logits, _, _ = make(rows=5, vocab=7, scale=30.0, seed=4)
    logprobs, probs = logits.clone(), torch.empty_like(logits)
    log_softmax_(logprobs, probs)
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=1e-12, atol=1e-300)
    for scratch_rows in (1, 2, 5, 8):
        scratch = [torch.empty(scratch_rows, 7, dtype=torch.float64)]
        torch.testing.assert_close(rowdot(probs, logprobs, scratch), (probs * logprobs).sum(-1))


@pytest.mark.parametrize("name,beta", NAMES)
def test_support_divergence_equals_autograd_of_the_renormalized_topk(name, beta):
    """The Top-K closed form on [R, K] gathered log-probs against autograd of `losses.restrict_gathered` +
    `losses.divergence` (the plain form's Top-K path, renormalized, every entry in the support)."""
    student, target, coefficient = make(rows=4, vocab=6, seed=5)
    student, target = torch.log_softmax(student, -1)[:, :4], target[:, :4]  # a support of 4 of 6 entries
    values, grad = support_divergence(name, beta, coefficient, student, target)
    leaf = student.clone().requires_grad_()
    mask = torch.ones_like(leaf, dtype=torch.bool)
    student_sub, target_sub, mask = losses.restrict_gathered(leaf, target, mask, "renormalize")
    expected = losses.divergence(name, student_sub, target_sub, beta, mask)
    (coefficient * expected).sum().backward()
    torch.testing.assert_close(values, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)
