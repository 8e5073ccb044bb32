"""DOPD's router (`dopd.routing`): trimmed thresholds and the four regimes on hand-built batches, degenerate
batches, normalization, the Figure 4 drop masks and thresholds gathered over processes."""

from __future__ import annotations

import math

import pytest
import torch

from dopd import objectives, routing
from dopd.plain import compute_objective
from dopd.routing import HS, HT, INVALID, LH, LL

# (q_S, q_T) of 20 valid tokens. Token 0 is an outlier (gap ln(0.9e6) ≈ 13.7) that the 5% trim drops from Ā;
# with it, Ā would be 1.53 and the ln 4 / ln 3 tokens would be low-gap. Token 6 (sum 0.75) lies between the
# trimmed (0.742) and the untrimmed (0.795) probability thresholds.
HAND_TOKENS = [
    (1e-6, 0.9),
    (0.8, 0.8), (0.6, 0.6), (0.5, 0.5), (0.1, 0.1), (0.05, 0.05), (0.35, 0.4),
    (0.4, 0.8), (0.8, 0.4), (0.1, 0.2), (0.2, 0.1),
    (0.2, 0.8), (0.8, 0.2), (0.05, 0.2), (0.2, 0.05),
    (0.1, 0.8), (0.8, 0.1), (0.3, 0.9), (0.9, 0.3), (0.05, 0.4),
]  # fmt: skip
HAND_REGIMES = [
    HT,
    LH, LH, LH, LL, LL, LH,
    LH, LH, LL, LL,
    HT, HS, HT, HS,
    HT, HS, HT, HS, HT,
]  # fmt: skip


def hand_batch():
    """[2, 11]: ten tokens per row and one padding column whose values would move every threshold."""
    log_self = torch.full((2, 11), -50.0, dtype=torch.float64)
    log_teacher = torch.zeros((2, 11), dtype=torch.float64)
    mask = torch.ones((2, 11), dtype=torch.bool)
    mask[:, 10] = False
    for i, (q_s, q_t) in enumerate(HAND_TOKENS):
        log_self[i // 10, i % 10] = math.log(q_s)
        log_teacher[i // 10, i % 10] = math.log(q_t)
    return log_self, log_teacher, mask


def test_trimmed_thresholds_of_hand_batch():
    log_self, log_teacher, mask = hand_batch()
    thresholds = routing.compute_thresholds(log_self, log_teacher, mask)
    # Gaps of the 19 kept tokens: five 0, ln(8/7), four ln 2, four ln 4, three ln 8, two ln 3 (the outlier dropped).
    gap = (math.log(8 / 7) + 4 * math.log(2) + 4 * math.log(4) + 3 * math.log(8) + 2 * math.log(3)) / 19
    # q_S without its largest (0.9), q_T without one of its two 0.9.
    q_self = (1e-6 + 4 * 0.8 + 0.6 + 0.5 + 0.35 + 0.4 + 0.3 + 3 * 0.2 + 3 * 0.1 + 3 * 0.05) / 19
    q_teacher = (4 * 0.8 + 0.6 + 0.5 + 3 * 0.1 + 2 * 0.05 + 3 * 0.4 + 3 * 0.2 + 0.9 + 0.3) / 19
    assert thresholds.gap == pytest.approx(gap, rel=1e-12)
    assert thresholds.prob_sum == pytest.approx(q_self + q_teacher, rel=1e-12)
    assert thresholds.gap == pytest.approx(0.88878, abs=1e-5)
    assert thresholds.prob_sum == pytest.approx(0.742105, abs=1e-6)
    assert thresholds.num_tokens == 20
    assert thresholds.as_metrics() == {"gap/threshold": thresholds.gap, "prob_sum/threshold": thresholds.prob_sum}


def test_regimes_of_hand_batch():
    log_self, log_teacher, mask = hand_batch()
    thresholds = routing.compute_thresholds(log_self, log_teacher, mask)
    regime = routing.assign_regimes(log_self, log_teacher, mask, thresholds)
    assert regime[:, :10].flatten().tolist() == HAND_REGIMES
    assert regime[:, 10].tolist() == [INVALID, INVALID]
    fractions = routing.regime_fractions(regime)
    assert {k: float(v) for k, v in fractions.items()} == pytest.approx(
        {"frac/LH": 6 / 20, "frac/LL": 4 / 20, "frac/HT": 6 / 20, "frac/HS": 4 / 20}
    )


def test_without_trim_the_outlier_moves_the_regimes():
    log_self, log_teacher, mask = hand_batch()
    thresholds = routing.compute_thresholds(log_self, log_teacher, mask, trim=0.0)
    regime = routing.assign_regimes(log_self, log_teacher, mask, thresholds)[:, :10].flatten().tolist()
    assert regime[6] == LL  # sum 0.75 < untrimmed threshold 0.795
    assert regime[11:15] == [LH, LH, LL, LL]  # gap ln 4 < untrimmed Ā 1.53
    assert regime != HAND_REGIMES


def test_trimmed_mean_hand_cases():
    assert routing.trimmed_mean(torch.tensor([3.5]), 0.05) == 3.5
    assert routing.trimmed_mean(torch.arange(1.0, 21.0), 0.05) == pytest.approx(10.0)  # 20 dropped: mean(1..19)
    assert routing.trimmed_mean(torch.arange(1.0, 20.0), 0.05) == pytest.approx(10.0)  # 19 values: none dropped
    assert routing.trimmed_mean(torch.tensor([5.0, 1.0, 100.0, 3.0]), 0.5) == pytest.approx(2.0)  # keeps 1 and 3
    assert routing.trimmed_mean(torch.tensor([]), 0.05) == 0.0
    assert routing.trimmed_mean(torch.tensor([2.0, 9.0]), 0.99) == 2.0  # at least one value is kept


def test_trimmed_mean_of_equal_values_is_that_value():
    for value in (0.1, 0.7, 2.9, 0.123456789):
        for n in (3, 7, 20, 100):
            assert routing.trimmed_mean(torch.full((n,), value, dtype=torch.float64), 0.05) == value


# --------------------------------------------------------------------------------------- degenerate batches


def test_one_token_batch():
    log_self = torch.tensor([[math.log(0.3)]], dtype=torch.float64)
    log_teacher = torch.tensor([[math.log(0.6)]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    thresholds = routing.compute_thresholds(log_self, log_teacher, mask)
    assert thresholds.gap == pytest.approx(math.log(2.0), rel=1e-12)
    assert thresholds.prob_sum == pytest.approx(0.9, rel=1e-12)
    # A = Ā: the high-gap side, and the teacher is more confident: HT.
    assert routing.assign_regimes(log_self, log_teacher, mask, thresholds).tolist() == [[HT]]


def test_all_gaps_equal_routes_every_token_to_the_high_gap_side():
    # Dyadic log-probs so that every |log q_T − log q_S| is exactly 0.5 (the mean may round above it).
    log_self = torch.tensor([[-1.0, -2.0, -1.5, -0.75, -3.0, -1.25, -2.5]], dtype=torch.float64)
    direction = torch.tensor([[1, -1, 1, 1, -1, 1, -1]], dtype=torch.float64)
    log_teacher = log_self + direction * 0.5
    mask = torch.ones_like(log_self, dtype=torch.bool)
    thresholds = routing.compute_thresholds(log_self, log_teacher, mask)
    assert math.isfinite(thresholds.gap) and math.isfinite(thresholds.prob_sum)
    regime = routing.assign_regimes(log_self, log_teacher, mask, thresholds)
    assert regime.tolist() == [[HT, HS, HT, HT, HS, HT, HS]]


def test_all_tokens_masked():
    log_self = torch.randn(2, 3, dtype=torch.float64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    thresholds = routing.compute_thresholds(log_self, log_self - 1.0, mask, normalization="zscore")
    assert (thresholds.gap, thresholds.prob_sum, thresholds.num_tokens) == (0.0, 0.0, 0)
    assert math.isfinite(thresholds.q_self_scale) and math.isfinite(thresholds.q_teacher_shift)
    regime = routing.assign_regimes(log_self, log_self - 1.0, mask, thresholds)
    assert (regime == INVALID).all()
    assert all(float(v) == 0.0 for v in routing.regime_fractions(regime).values())


@pytest.mark.parametrize("case", ["one_token", "equal_gaps", "all_masked"])
def test_degenerate_batches_give_finite_dopd_loss_and_gradients(case):
    generator = torch.Generator().manual_seed(0)
    vocab = 5
    if case == "one_token":
        shape, mask = (1, 1), torch.ones(1, 1, dtype=torch.bool)
    elif case == "equal_gaps":
        shape, mask = (2, 3), torch.ones(2, 3, dtype=torch.bool)
    else:
        shape, mask = (2, 3), torch.zeros(2, 3, dtype=torch.bool)
    student = torch.randn(*shape, vocab, generator=generator, requires_grad=True)
    self_logits = torch.randn(*shape, vocab, generator=generator)
    teacher = self_logits.clone() if case == "equal_gaps" else torch.randn(*shape, vocab, generator=generator)
    ids = torch.randint(0, vocab, shape, generator=generator)
    objective = objectives.build_objective({"top_k": 3})
    out = compute_objective(objective, student, ids, mask, self_logits_BTV=self_logits, teacher_logits_BTV=teacher)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(student.grad).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    valid_regimes = out.regime[mask]
    assert ((valid_regimes >= 0) & (valid_regimes <= 3)).all() and (out.regime[~mask] == INVALID).all()
    if case == "all_masked":
        assert out.loss.item() == 0.0 and (student.grad == 0).all()
    else:
        assert out.loss.item() > 0.0
    if case == "equal_gaps":  # every gap is 0 = Ā and q_T = q_S: all HT, a JS term on every token
        assert (out.regime == HT).all()


# ------------------------------------------------------------------------------------------ normalization


def normalization_batch():
    # (q_S, q_T): gaps ln 5, ln 2.5, ln 3, ln 4; Ā = mean (no trim with 4 tokens) = 1.2525...
    q_self = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    q_teacher = torch.tensor([[0.5, 0.5, 0.9, 0.1]], dtype=torch.float64)
    return q_self.log(), q_teacher.log(), torch.ones(1, 4, dtype=torch.bool)


def test_normalization_none_zscore_minmax_hand_case():
    log_self, log_teacher, mask = normalization_batch()
    none = routing.compute_thresholds(log_self, log_teacher, mask)
    assert none.prob_sum == pytest.approx(0.25 + 0.5, rel=1e-12)
    assert (none.q_self_shift, none.q_self_scale) == (0.0, 1.0)

    zscore = routing.compute_thresholds(log_self, log_teacher, mask, normalization="zscore")
    assert zscore.q_self_shift == pytest.approx(0.25, rel=1e-12)
    assert zscore.q_self_scale == pytest.approx(math.sqrt((0.15**2 + 0.05**2 + 0.05**2 + 0.15**2) / 4), rel=1e-12)
    assert zscore.q_teacher_shift == pytest.approx(0.5, rel=1e-12)
    assert zscore.q_teacher_scale == pytest.approx(math.sqrt((0.4**2 + 0.4**2) / 4), rel=1e-12)
    assert zscore.prob_sum == pytest.approx(0.0, abs=1e-12)  # z-scores have mean 0

    minmax = routing.compute_thresholds(log_self, log_teacher, mask, normalization="minmax")
    assert (minmax.q_self_shift, minmax.q_self_scale) == pytest.approx((0.1, 0.3), rel=1e-12)
    assert (minmax.q_teacher_shift, minmax.q_teacher_scale) == pytest.approx((0.1, 0.8), rel=1e-12)
    # self → [0, 1/3, 2/3, 1] (mean 1/2), teacher → [1/2, 1/2, 1, 0] (mean 1/2)
    assert minmax.prob_sum == pytest.approx(1.0, rel=1e-12)

    for thresholds in (none, zscore, minmax):
        regime = routing.assign_regimes(log_self, log_teacher, mask, thresholds)
        assert thresholds.gap == pytest.approx((math.log(5) + math.log(2.5) + math.log(3) + math.log(4)) / 4)
        # token 1: low gap, 0.2 + 0.5 below every threshold (none 0.75; z −0.447 + 0 < 0; minmax 1/3 + 1/2 < 1)
        assert regime.tolist() == [[HT, LL, LH, HS]]
    with pytest.raises(ValueError, match="none, zscore, minmax"):
        routing.compute_thresholds(log_self, log_teacher, mask, normalization="rank")


def test_normalization_changes_a_regime():
    # One token of q_S + q_T = 0.5 against a batch with q_S around 0.3 and q_T spread out: z-scoring flips it.
    q_self = torch.tensor([[0.30, 0.31, 0.29, 0.30, 0.30]], dtype=torch.float64)
    q_teacher = torch.tensor([[0.2, 0.3, 0.35, 0.25, 0.9]], dtype=torch.float64)
    log_self, log_teacher, mask = q_self.log(), q_teacher.log(), torch.ones(1, 5, dtype=torch.bool)
    plain = routing.assign_regimes(log_self, log_teacher, mask, routing.compute_thresholds(log_self, log_teacher, mask))
    zscore = routing.compute_thresholds(log_self, log_teacher, mask, normalization="zscore")
    normed = routing.assign_regimes(log_self, log_teacher, mask, zscore)
    # token 1: gap ln(0.31/0.3) small; none: 0.61 < 0.3 + 0.4 = 0.7 → LL; z: (0.01/σ_S) + (−0.1/σ_T) > 0 → LH
    assert plain[0, 1].item() == LL and normed[0, 1].item() == LH


# ---------------------------------------------------------------------------------------------- drop mask


def test_random_drop_mask_fraction_and_determinism():
    mask = torch.ones(40, 50, dtype=torch.bool)
    mask[:, 45:] = False
    keep = routing.drop_mask(None, None, mask, 0.2, "random", generator=torch.Generator().manual_seed(3))
    again = routing.drop_mask(None, None, mask, 0.2, "random", generator=torch.Generator().manual_seed(3))
    other = routing.drop_mask(None, None, mask, 0.2, "random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    assert not keep[~mask].any()
    assert keep[mask].double().mean().item() == pytest.approx(0.8, abs=0.03)
    assert torch.equal(routing.drop_mask(None, None, mask, 0.0, "random"), mask)


@pytest.mark.parametrize("mode,dropped", [("lowest_gap", {3, 7}), ("highest_gap", {0, 5})])
def test_gap_drop_masks_drop_exact_tokens(mode, dropped):
    gaps = [2.0, 0.5, 0.9, 0.1, 1.1, 1.7, 0.6, 0.2, 1.3, 0.8]
    log_self = torch.tensor([[-0.1] * 10 + [-30.0]], dtype=torch.float64)  # padding gap 29.9 ignored
    log_teacher = log_self - torch.tensor([gaps + [0.0]], dtype=torch.float64)
    log_teacher[0, 10] = -0.1 + 29.9 - 30.0
    mask = torch.tensor([[True] * 10 + [False]])
    thresholds = routing.compute_thresholds(log_self, log_teacher, mask, drop_fraction=0.2, drop_mode=mode)
    keep = routing.drop_mask(log_self, log_teacher, mask, 0.2, mode, thresholds)
    assert {i for i in range(10) if not keep[0, i]} == dropped
    assert not keep[0, 10]
    with pytest.raises(ValueError, match="needs both privileged passes"):
        routing.drop_mask(None, None, mask, 0.2, mode, thresholds)


# --------------------------------------------------------------------------------------------------- gather


class FakeAccelerator:
    """Emulates process 0 of two: `gather` appends what process 1 contributes to the same collective call.

    `peer_values` lists process 1's 1-D tensors in the order `make_gather` is called on them."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, peer_values: list[torch.Tensor]):
        self.peer_values = list(peer_values)
        self.calls = 0

    def _peer(self) -> torch.Tensor:
        return self.peer_values[0]

    def pad_across_processes(self, tensor, dim=0):
        length = max(tensor.shape[0], self._peer().shape[0])
        return torch.cat([tensor, tensor.new_zeros(length - tensor.shape[0])])

    def gather(self, tensor):
        self.calls += 1
        if tensor.dtype == torch.long:  # the lengths
            return torch.cat([tensor, torch.tensor([self._peer().numel()])])
        peer = self.peer_values.pop(0)
        padded = torch.cat([peer, peer.new_zeros(tensor.shape[0] - peer.shape[0])])
        return torch.cat([tensor, padded])


def test_make_gather_identity_without_accelerator():
    values = torch.tensor([1.0, 2.0])
    assert routing.make_gather(None)(values) is values


def test_make_gather_concatenates_and_removes_padding():
    accelerator = FakeAccelerator([torch.tensor([7.0, 8.0, 9.0, 10.0])])
    gathered = routing.make_gather(accelerator)(torch.tensor([1.0, 2.0]))
    assert gathered.tolist() == [1.0, 2.0, 7.0, 8.0, 9.0, 10.0]
    accelerator = FakeAccelerator([torch.tensor([7.0])])
    assert routing.make_gather(accelerator)(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0, 7.0]
    assert accelerator.calls == 2


@pytest.mark.parametrize("normalization", ["none", "zscore"])
def test_thresholds_over_a_split_batch_equal_the_whole_batch(normalization):
    log_self, log_teacher, mask = hand_batch()
    mask[1, 7:] = False  # process 1 has fewer tokens: padding in the gather
    whole = routing.compute_thresholds(
        log_self, log_teacher, mask, normalization=normalization, drop_fraction=0.2, drop_mode="lowest_gap"
    )
    peer = [log_self[1:][mask[1:]], log_teacher[1:][mask[1:]]]
    split = routing.compute_thresholds(
        log_self[:1],
        log_teacher[:1],
        mask[:1],
        normalization=normalization,
        gather=routing.make_gather(FakeAccelerator(peer)),
        drop_fraction=0.2,
        drop_mode="lowest_gap",
    )
    assert split == whole
    local = routing.compute_thresholds(log_self[:1], log_teacher[:1], mask[:1], normalization=normalization)
    assert local.gap != whole.gap  # the gather matters
