"""Named objectives (`dopd.objectives`): DOPD against the loss written out by hand from the spec's table, every
ablation option, the baselines, per-sequence averaging, metrics and the boundary checks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tiny import with_scope

from dopd import objectives, routing
from dopd.objectives import build_objective
from dopd.plain import compute_objective
from dopd.routing import HS, HT, INVALID, LH, LL
from dopd.terms import Cuts

V, K = 4, 2

# ------------------------------------------------------------------------------------- plain references


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def divergence(name, s, t, beta=0.5):
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return kl(s, t)
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return kl(t, s)
    b = 0.5 if name == "js" else beta
    m = [b * ti + (1 - b) * si for si, ti in zip(s, t)]
    return b * kl(t, m) + (1 - b) * kl(s, m)


def topk(name, s, t, k, beta=0.5):
    """Target's top-k support, both renormalized (the default)."""
    ids = sorted(range(len(t)), key=lambda i: -t[i])[:k]
    s_sub, t_sub = [s[i] for i in ids], [t[i] for i in ids]
    return divergence(name, [x / sum(s_sub) for x in s_sub], [x / sum(t_sub) for x in t_sub], beta)


def sampled(name, s, t, beta=0.5):
    """The single-sample integrand g(y) from the sampled token's probabilities."""
    if name == "reverse_kl":
        return math.log(s / t)
    if name == "forward_kl":
        return (t / s) * math.log(t / s)
    b = 0.5 if name == "js" else beta
    m = b * t + (1 - b) * s
    return b * (t / s) * math.log(t / m) + (1 - b) * math.log(s / m)


def entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def softmax(row):
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


# --------------------------------------------------------------------------------------- the hand batch

# (q_S, q_T, sampled id) per valid token; row 0 has 4 tokens, row 1 has 2 (then 2 padding positions).
# Gaps: ln 1.1, ln 1.2, ln 7, ln 6 | 0, ln 3 → Ā = their mean 0.852 (6 tokens: the 5% trim drops none).
# q̄_S + q̄_T = 1.8/6 + 2.37/6 = 0.695. Regimes: a LH (1.05), b LL (0.22), c HT, d HS | e LL (0.6), f HT.
TOKENS = [[(0.5, 0.55, 0), (0.1, 0.12, 1), (0.1, 0.7, 2), (0.6, 0.1, 3)], [(0.3, 0.3, 1), (0.2, 0.6, 2)]]
REGIMES = [[LH, LL, HT, HS], [LL, HT]]
SELF_REST, TEACHER_REST = [1.0, 2.0, 4.0], [3.0, 1.0, 2.0]
# The spec's table: regime -> (target, divergence, granularity, weight).
TABLE = {
    LH: ("teacher", "reverse_kl", "topk", 0.6),
    LL: ("self", "reverse_kl", "topk", 0.3),
    HT: ("teacher", "js", "full", 1.0),
    HS: ("self", "reverse_kl", "topk", 0.6),
}


def distribution(q, y, rest):
    """Probabilities over V with mass q on y and 1 − q spread over the other ids in proportion to `rest`."""
    p, others = [0.0] * V, [i for i in range(V) if i != y]
    for i, w in zip(others, rest):
        p[i] = (1 - q) * w / sum(rest)
    p[y] = q
    ordered = sorted(p, reverse=True)
    assert ordered[K - 1] != ordered[K]  # a strict top-K, no tie
    return p


def hand_batch(permute_self=False, permute_teacher=False):
    """Logits [2, 4, V] (float64) of the three passes, completion ids and mask, and the per-token probabilities.

    `permute_*` reverses that pass's non-sampled entries: q_S / q_T (hence the routing) stay, the rest moves."""
    generator = torch.Generator().manual_seed(0)
    student = 1.5 * torch.randn(2, 4, V, generator=generator, dtype=torch.float64)
    self_logits = 5.0 * torch.randn(2, 4, V, generator=generator, dtype=torch.float64)  # padding: garbage
    teacher_logits = 5.0 * torch.randn(2, 4, V, generator=generator, dtype=torch.float64)
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    probs = []
    for b, row in enumerate(TOKENS):
        for n, (q_s, q_t, y) in enumerate(row):
            self_rest = SELF_REST[::-1] if permute_self else SELF_REST
            teacher_rest = TEACHER_REST[::-1] if permute_teacher else TEACHER_REST
            p_self, p_teacher = distribution(q_s, y, self_rest), distribution(q_t, y, teacher_rest)
            self_logits[b, n] = torch.tensor(p_self, dtype=torch.float64).log()
            teacher_logits[b, n] = torch.tensor(p_teacher, dtype=torch.float64).log()
            ids[b, n], mask[b, n] = y, True
            probs.append((b, softmax(student[b, n].tolist()), p_self, p_teacher, y))
    return student, ids, mask, self_logits, teacher_logits, probs


def reference_loss(probs, terms, regimes=REGIMES, routed=True, keep=None, num_sequences=2, beta=0.5):
    """Σ over each token's applicable terms, averaged over the sequence's valid tokens, then over sequences.

    `terms`: {regime: (target, divergence, granularity, weight)}; `routed=False` applies every term to every
    token; `keep` [b][n] zeroes dropped tokens (they still count in |y|)."""
    flat_regimes = [r for row in regimes for r in row]
    lengths = [len(row) for row in TOKENS]
    total = 0.0
    for i, (b, s, p_self, p_teacher, y) in enumerate(probs):
        n = i - sum(lengths[:b])
        if keep is not None and not keep[b][n]:
            continue
        for regime, (target, name, granularity, weight) in terms.items():
            if routed and regime != flat_regimes[i]:
                continue
            t = p_self if target == "self" else p_teacher
            if granularity == "full":
                value = divergence(name, s, t, beta)
            elif granularity == "topk":
                value = topk(name, s, t, K, beta)
            else:
                value = sampled(name, s[y], t[y], beta)
            total += weight * value / lengths[b]
    return total / num_sequences


def run(config=None, batch=None, **kwargs):
    student, ids, mask, self_logits, teacher_logits, _ = batch or hand_batch()
    student = student.clone().requires_grad_()
    objective = build_objective({"top_k": K, **(config or {})})
    out = compute_objective(
        objective,
        student,
        ids,
        mask,
        self_logits_BTV=self_logits,
        teacher_logits_BTV=teacher_logits,
        **with_scope(kwargs),
    )
    return out, student


# ------------------------------------------------------------------------------------------------- DOPD


def test_dopd_equals_the_spec_table_by_hand():
    *_, probs = hand_batch()
    out, student = run()
    assert out.regime.tolist() == [[LH, LL, HT, HS], [LL, HT, INVALID, INVALID]]
    assert out.loss.item() == pytest.approx(reference_loss(probs, TABLE), rel=1e-10)
    out.loss.backward()
    assert (student.grad[1, 2:] == 0).all() and student.grad[0].abs().sum() > 0


def test_dopd_loss_is_per_sequence_mean_then_mean_over_sequences():
    *_, probs = hand_batch()
    out, _ = run()
    values = []
    for i, (_, s, p_self, p_teacher, _) in enumerate(probs):
        regime = [r for row in REGIMES for r in row][i]
        target, name, granularity, weight = TABLE[regime]
        t = p_self if target == "self" else p_teacher
        values.append(weight * (divergence(name, s, t) if granularity == "full" else topk(name, s, t, K)))
    per_sequence = (sum(values[:4]) / 4 + sum(values[4:]) / 2) / 2
    assert out.loss.item() == pytest.approx(per_sequence, rel=1e-10)
    assert out.loss.item() != pytest.approx(sum(values) / 6, rel=1e-3)  # not the mean over all tokens
    assert out.token_loss[out.regime != INVALID].tolist() == pytest.approx(values, rel=1e-10)
    assert (out.token_loss[~hand_batch()[2]] == 0).all()


def test_num_sequences_scales_the_loss():
    out, _ = run()
    scaled, _ = run(num_sequences=5)
    assert scaled.loss.item() == pytest.approx(out.loss.item() * 2 / 5, rel=1e-12)


def test_metrics_of_the_hand_batch():
    *_, probs = hand_batch()
    out, _ = run()
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m["frac/LH"] == pytest.approx(1 / 6) and m["frac/LL"] == pytest.approx(2 / 6)
    assert m["frac/HT"] == pytest.approx(2 / 6) and m["frac/HS"] == pytest.approx(1 / 6)
    assert sum(m[f"frac/{r}"] for r in routing.REGIMES) == pytest.approx(1.0)
    a, b, c, d, e, f = probs
    assert m["loss/LH"] == pytest.approx(0.6 * topk("reverse_kl", a[1], a[3], K), rel=1e-10)
    assert m["loss/LL"] == pytest.approx(
        0.3 * (topk("reverse_kl", b[1], b[2], K) + topk("reverse_kl", e[1], e[2], K)) / 2, rel=1e-10
    )
    assert m["loss/HT"] == pytest.approx((divergence("js", c[1], c[3]) + divergence("js", f[1], f[3])) / 2, rel=1e-10)
    assert m["loss/HS"] == pytest.approx(0.6 * topk("reverse_kl", d[1], d[2], K), rel=1e-10)
    gaps = [abs(math.log(q_t / q_s)) for row in TOKENS for q_s, q_t, _ in row]
    assert m["gap/mean"] == pytest.approx(sum(gaps) / 6, rel=1e-10)
    assert m["gap/threshold"] == pytest.approx(sum(gaps) / 6, rel=1e-10)  # 6 tokens: the trim drops none
    assert m["prob_sum/threshold"] == pytest.approx(1.8 / 6 + 2.37 / 6, rel=1e-10)
    assert m["entropy/student"] == pytest.approx(sum(entropy(t[1]) for t in probs) / 6, rel=1e-10)
    assert m["entropy/self"] == pytest.approx(sum(entropy(t[2]) for t in probs) / 6, rel=1e-10)
    assert m["entropy/teacher"] == pytest.approx(sum(entropy(t[3]) for t in probs) / 6, rel=1e-10)
    assert m["loss"] == pytest.approx(out.loss.item(), rel=1e-12)
    assert m["tokens"] == 6 and m["kept_fraction"] == 1.0


# ------------------------------------------------------------------------------------------- ablations


def test_regimes_subset_zeroes_the_disabled_regimes():
    *_, probs = hand_batch()
    out, _ = run({"regimes": ["LH", "HT"]})
    assert out.loss.item() == pytest.approx(reference_loss(probs, {LH: TABLE[LH], HT: TABLE[HT]}), rel=1e-10)
    assert out.regime.tolist() == [[LH, LL, HT, HS], [LL, HT, INVALID, INVALID]]  # routing unchanged
    disabled = (out.regime == LL) | (out.regime == HS)
    assert (out.token_loss[disabled] == 0).all() and (out.token_loss[out.regime == LH] > 0).all()
    assert float(out.metrics["loss/LL"]) == 0.0 and float(out.metrics["loss/HS"]) == 0.0


def test_target_teacher_is_independent_of_the_self_distribution():
    base, permuted = hand_batch(), hand_batch(permute_self=True)
    teacher_only = {"target": "teacher"}
    unchanged = run(teacher_only, permuted)[0].loss.item()
    assert run(teacher_only, base)[0].loss.item() == pytest.approx(unchanged, rel=1e-12)
    assert run(None, base)[0].loss.item() != pytest.approx(run(None, permuted)[0].loss.item(), rel=1e-6)
    expected = {r: ("teacher", *TABLE[r][1:]) for r in TABLE}
    assert run(teacher_only, base)[0].loss.item() == pytest.approx(reference_loss(base[-1], expected), rel=1e-10)


def test_target_self_is_independent_of_the_teacher_distribution():
    base, permuted = hand_batch(), hand_batch(permute_teacher=True)
    self_only = {"target": "self"}
    assert run(self_only, base)[0].loss.item() == pytest.approx(run(self_only, permuted)[0].loss.item(), rel=1e-12)
    assert run(None, base)[0].loss.item() != pytest.approx(run(None, permuted)[0].loss.item(), rel=1e-6)
    expected = {r: ("self", *TABLE[r][1:]) for r in TABLE}
    assert run(self_only, base)[0].loss.item() == pytest.approx(reference_loss(base[-1], expected), rel=1e-10)


def test_no_routing_applies_every_term_to_every_token():
    *_, probs = hand_batch()
    out, _ = run({"routing": False})
    assert out.loss.item() == pytest.approx(reference_loss(probs, TABLE, routed=False), rel=1e-10)
    assert out.regime.tolist() == [[LH, LL, HT, HS], [LL, HT, INVALID, INVALID]]  # still reported
    assert out.loss.item() > run()[0].loss.item()


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js", "jsd"])
@pytest.mark.parametrize("granularity", ["sampled", "topk", "full"])
def test_one_divergence_one_granularity_on_all_tokens(name, granularity):
    *_, probs = hand_batch()
    config = {"regimes": ["HT"], "routing": False, "divergence": name, "granularity": granularity, "jsd_beta": 0.3}
    out, _ = run(config)
    expected = reference_loss(probs, {HT: ("teacher", name, granularity, 1.0)}, routed=False, beta=0.3)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)


def test_routed_overrides_keep_targets_and_weights():
    *_, probs = hand_batch()
    out, _ = run({"divergence": "forward_kl", "granularity": "full"})
    expected = {r: (target, "forward_kl", "full", weight) for r, (target, _, _, weight) in TABLE.items()}
    assert out.loss.item() == pytest.approx(reference_loss(probs, expected), rel=1e-10)


@pytest.mark.parametrize("mode,dropped", [("lowest_gap", {(1, 0), (0, 0)}), ("highest_gap", {(0, 2), (0, 3)})])
def test_gap_drop_modes_drop_the_right_tokens(mode, dropped):
    *_, probs = hand_batch()
    out, _ = run({"drop_fraction": 1 / 3, "drop_mode": mode})  # round(6 / 3) = 2 tokens
    keep = [[(b, n) not in dropped for n in range(len(row))] for b, row in enumerate(TOKENS)]
    assert out.loss.item() == pytest.approx(reference_loss(probs, TABLE, keep=keep), rel=1e-10)
    assert float(out.metrics["kept_fraction"]) == pytest.approx(4 / 6)
    assert out.regime.tolist() == [[LH, LL, HT, HS], [LL, HT, INVALID, INVALID]]


def test_random_drop_mode_uses_the_generator():
    student, ids, mask, self_logits, teacher_logits, probs = hand_batch()
    config = {"drop_fraction": 0.5, "drop_mode": "random"}
    out, _ = run(config, generator=torch.Generator().manual_seed(1))
    keep_BT = routing.drop_mask(None, None, mask, 0.5, "random", generator=torch.Generator().manual_seed(1))
    keep = [[bool(keep_BT[b, n]) for n in range(len(row))] for b, row in enumerate(TOKENS)]
    assert 0 < sum(map(sum, keep)) < 6
    assert out.loss.item() == pytest.approx(reference_loss(probs, TABLE, keep=keep), rel=1e-10)
    again, _ = run(config, generator=torch.Generator().manual_seed(1))
    assert again.loss.item() == out.loss.item()


def test_explicit_thresholds_override_the_batch_ones():
    *_, probs = hand_batch()
    # Ā = 0: every token is high-gap: HT where q_T ≥ q_S (a, b, c, e, f), HS for d.
    out, _ = run(cuts=Cuts(routing.Thresholds(gap=0.0, prob_sum=0.0)))
    assert out.regime.tolist() == [[HT, HT, HT, HS], [HT, HT, INVALID, INVALID]]
    regimes = [[HT, HT, HT, HS], [HT, HT]]
    assert out.loss.item() == pytest.approx(reference_loss(probs, TABLE, regimes=regimes), rel=1e-10)


# ------------------------------------------------------------------------------------------- baselines


def test_opd_value_and_policy_gradient_by_hand():
    student, ids, mask, _, teacher_logits, probs = hand_batch()
    student = student.clone().requires_grad_()
    out = compute_objective(build_objective("opd"), student, ids, mask, teacher_logits_BTV=teacher_logits)
    lengths = [4, 2]
    assert out.loss.item() == pytest.approx(
        sum(math.log(s[y] / t[y]) / lengths[b] for b, s, _, t, y in probs) / 2, rel=1e-10
    )
    out.loss.backward()
    expected = torch.zeros(2, 4, V, dtype=torch.float64)
    for i, (b, s, _, t, y) in enumerate(probs):
        n = i - (4 if b else 0)
        advantage = math.log(t[y]) - math.log(s[y])  # sg(log q_T − log s(y_n))
        for v in range(V):  # −A ∇ log s(y) with ∇_logit_v log s(y) = 1[v = y] − s_v
            expected[b, n, v] = -advantage * ((v == y) - s[v]) / (lengths[b] * 2)
    torch.testing.assert_close(student.grad, expected, rtol=1e-10, atol=1e-14)


def test_longer_sequence_does_not_weigh_more():
    """Sequence B repeats sequence A's tokens twice: [A, B] has the loss of [A, A]."""
    student, ids, mask, _, teacher, _ = hand_batch()
    a = slice(0, 2)
    doubled = (
        torch.cat([student[0, a], student[0, a]]),
        torch.cat([ids[0, a], ids[0, a]]),
        torch.cat([teacher[0, a], teacher[0, a]]),
    )
    student_2 = torch.stack([torch.cat([student[0, a], student[0, a].new_zeros(2, V)]), doubled[0]])
    ids_2 = torch.stack([torch.cat([ids[0, a], ids[0, a].new_zeros(2)]), doubled[1]])
    teacher_2 = torch.stack([torch.cat([teacher[0, a], teacher[0, a]]), doubled[2]])
    mask_2 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    opd = build_objective("opd")
    both = compute_objective(opd, student_2, ids_2, mask_2, teacher_logits_BTV=teacher_2).loss.item()
    only_a = compute_objective(opd, student[:1, a], ids[:1, a], mask[:1, a], teacher_logits_BTV=teacher[:1, a])
    assert both == pytest.approx(only_a.loss.item(), rel=1e-12)
    values = [math.log(s[y] / t[y]) for _, s, _, t, y in hand_batch()[-1][:2]]
    assert both == pytest.approx(sum(values) / 2, rel=1e-12)


@pytest.mark.parametrize("method,target,name", [("gkd", "teacher", "jsd"), ("opsd", "self", "jsd")])
def test_gkd_and_opsd_values(method, target, name):
    *_, probs = hand_batch()
    out, _ = run({"method": method, "jsd_beta": 0.3})
    terms = {HT: (target, name, "full", 1.0)}
    assert out.loss.item() == pytest.approx(reference_loss(probs, terms, routed=False, beta=0.3), rel=1e-10)
    assert out.regime is None


def test_eopd_adds_forward_kl_on_high_teacher_entropy_tokens():
    *_, probs = hand_batch()
    out, _ = run({"method": "eopd"})
    entropies = [entropy(t[3]) for t in probs]
    cut = sorted(entropies)[4]  # the 0.8 quantile of 6 values (linear interpolation): the 5th smallest
    lengths = [4, 2]
    expected = sum((kl(s, t) + (kl(t, s) if entropy(t) >= cut else 0.0)) / lengths[b] for b, s, _, t, _ in probs) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "method,needs_self,needs_teacher",
    [
        ("dopd", True, True),
        ("dopd-rkl", True, True),
        ("opd", False, True),
        ("opd-priv", False, True),
        ("opsd", True, False),
        ("gkd", False, True),
        ("eopd", False, True),
    ],
)
def test_every_method_builds(method, needs_self, needs_teacher):
    objective = build_objective(method)
    assert objective.config.method == method and objective.terms
    assert (objective.needs_self, objective.needs_teacher) == (needs_self, needs_teacher)
    assert (
        objective.teacher_privileged
        == {"dopd": True, "dopd-rkl": True, "opd": False, "opd-priv": True, "opsd": None, "gkd": False, "eopd": False}[
            method
        ]
    )


def test_dopd_terms_are_the_spec_table():
    terms = {t.applies_to: (t.target, t.divergence, t.granularity, t.weight) for t in build_objective("dopd").terms}
    terms = {routing.REGIMES.index(name): term for name, term in terms.items()}  # TABLE is keyed by regime code
    assert terms == TABLE


def test_dopd_rkl_is_dopd_with_reverse_kl_on_ht():
    """The named variant: the spec table with reverse KL in place of JS on HT, the same routing and weights, and
    the same loss as `dopd` with `objective.divergence=reverse_kl` (which changes only HT's divergence)."""
    terms = {t.applies_to: (t.target, t.divergence, t.granularity, t.weight) for t in build_objective("dopd-rkl").terms}
    terms = {routing.REGIMES.index(name): term for name, term in terms.items()}
    assert terms == {**TABLE, HT: ("teacher", "reverse_kl", "full", 1.0)}
    *_, probs = hand_batch()
    named, override, paper = run({"method": "dopd-rkl"}), run({"divergence": "reverse_kl"}), run()
    assert named[0].regime.tolist() == paper[0].regime.tolist()
    assert named[0].loss.item() == pytest.approx(override[0].loss.item(), rel=1e-12)
    assert named[0].loss.item() == pytest.approx(reference_loss(probs, {**TABLE, HT: terms[HT]}), rel=1e-10)
    assert named[0].loss.item() != pytest.approx(paper[0].loss.item())
    objective = build_objective("dopd-rkl")
    assert objective.uses_routing and objective.needs_self and objective.teacher_privileged


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="objective.method") as error:
        build_objective("distill")
    for name in objectives.METHODS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="unknown objective option"):
        build_objective({"methd": "dopd"})


def test_beta_w_not_below_beta_l_warns_for_dopd_only():
    with pytest.warns(UserWarning, match="beta_w"):
        build_objective({"beta_w": 0.6, "beta_l": 0.6})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_objective({"method": "gkd", "beta_w": 0.9, "beta_l": 0.6})
        build_objective("dopd")


def test_top_k_larger_than_vocabulary_raises():
    student, ids, mask, self_logits, teacher_logits, _ = hand_batch()
    with pytest.raises(ValueError, match=r"top_k = 8 is larger than the vocabulary \(4\)"):
        compute_objective(
            build_objective({"top_k": 8}),
            student,
            ids,
            mask,
            self_logits_BTV=self_logits,
            teacher_logits_BTV=teacher_logits,
        )
    # A method without a Top-K term does not care about K.
    gkd = build_objective({"method": "gkd", "top_k": 8})
    assert compute_objective(gkd, student, ids, mask, teacher_logits_BTV=teacher_logits).loss.item() > 0


def test_mismatched_vocabulary_names_both_sizes_and_the_tokenizer():
    student, ids, mask, self_logits, teacher_logits, _ = hand_batch()
    wider = torch.cat([teacher_logits, teacher_logits[..., :1]], dim=-1)
    with pytest.raises(ValueError, match=r"student has 4 and the teacher has 5.*tokenizer"):
        compute_objective(
            build_objective({"top_k": K}), student, ids, mask, self_logits_BTV=self_logits, teacher_logits_BTV=wider
        )


def test_mismatched_sequence_lengths_raise():
    student, ids, mask, self_logits, teacher_logits, _ = hand_batch()
    objective = build_objective({"top_k": K})
    with pytest.raises(ValueError, match="sequence lengths differ.*teacher"):
        compute_objective(
            objective, student, ids, mask, self_logits_BTV=self_logits, teacher_logits_BTV=teacher_logits[:, :3]
        )
    with pytest.raises(ValueError, match="sequence lengths differ"):
        compute_objective(
            objective, student, ids[:, :3], mask[:, :3], self_logits_BTV=self_logits, teacher_logits_BTV=teacher_logits
        )


def test_missing_pass_raises():
    student, ids, mask, self_logits, _, _ = hand_batch()
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        compute_objective(build_objective({"top_k": K}), student, ids, mask, self_logits_BTV=self_logits)
