"""The chunk loop of the chunked objective: the loss over N ordered tokens, a chunk at a time, with the
gradients of the student's hidden states and head assembled without autograd over [chunk, V]
(`kernels/chunked.py` says how; `logit_grads.py` holds the closed forms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..objectives import Objective, Term
from ..terms import sampled_values, topk_inputs, topk_values
from ..types import Head, TargetScores
from .logit_grads import full_divergence_, log_softmax_, log_softmax_rows_, rowdot, support_divergence
from .scores import Workspace, _detach, _logits_into


def _needs_full(objective: Objective, term: Term, target: TargetScores | None) -> bool:
    """Whether `term` reads its target's full log-probs: a full-vocabulary term, or a Top-K term whose support
    the target's scores do not hold (another support than the target's, or no top-K kept)."""
    if term.granularity == "full":
        return True
    if term.granularity == "topk":
        return objective.config.topk_support != "target" or target is None or target.topk_logprobs is None
    return False


class _LossRun:
    """The loss over N ordered tokens, chunk by chunk: its value, the per-token views and, into the given
    buffers, the gradients of the student's hidden states, head weight and bias.

    A chunk holds the student's log-probs and probs; the probs become the gradient with respect to the logits,
    `G = q − scale ⊙ s` plus the sparse entries of the Top-K and sampled-token terms; then `grad_h = G W` and
    `grad_W += Gᵀ h` (divided by the temperature, which divided the logits). The first `full_count` tokens also
    need a target's log-probs and the closed forms' `q` (and a second `q` when two full-vocabulary terms meet on
    one token), so their chunks are cut into four or five arrays instead of two.

    The N tokens are the call's valid tokens in the order `chunked._group_by_full_targets` gives. Arguments:
    `coefficients_JN`, each term's coefficient per token (`terms.route`); `scores`, each target's scores of the
    ordered tokens [N, ...]; `ids_N`, the sampled tokens; `index_N`, each ordered token's place in the call's
    B·T positions; `full_targets`, each target's head and the full log-probs [B, T, V] its scores kept (None:
    recomputed from the head where needed); `full_count`, how many tokens at the front read a target's full
    log-probs; `workspace`, the [rows, V] memory; `eos_ids`, the end-of-sequence ids whose probability is kept.

    After the call: `token_loss_N` (each token's Σ weighted term values, not length-normalized: the per-token
    view), `token_logprobs_N`, `entropy_N` and `eos_prob_N` (None without end-of-sequence ids) of the student."""

    def __init__(
        self,
        objective: Objective,
        *,
        coefficients_JN: Tensor,
        scores: dict[str, TargetScores],
        ids_N: Tensor,
        index_N: Tensor,
        full_targets: dict[str, tuple[Head, Tensor | None]],
        full_count: int,
        workspace: Workspace,
        eos_ids: tuple[int, ...] = (),
    ):
        self.objective, self.scores, self.ids_N, self.index_N = objective, scores, ids_N, index_N
        self.full_targets, self.full_count, self.workspace = full_targets, full_count, workspace
        self.temperature = objective.config.temperature
        self._group_terms(objective, coefficients_JN)
        self.full = [_needs_full(objective, term, scores.get(term.target)) for term in self.terms]
        full_vocabulary = sum(term.granularity == "full" for term in self.terms)
        self.full_arrays = 4 if full_vocabulary <= 1 else 5
        self.grad_enabled = torch.is_grad_enabled()
        dtype = workspace.pool.dtype
        self.token_loss_N = torch.zeros(ids_N.shape[0], dtype=dtype, device=ids_N.device)
        self.token_logprobs_N = torch.zeros_like(self.token_loss_N)
        self.entropy_N = torch.zeros_like(self.token_loss_N)
        self.eos_ids = [i for i in eos_ids if 0 <= i < workspace.pool.shape[-1]]
        self.eos_prob_N = torch.zeros_like(self.token_loss_N) if self.eos_ids else None  # a collapse sign

    def _group_terms(self, objective: Objective, coefficients_JN: Tensor) -> None:
        """Terms with the same target, divergence and granularity (DOPD's LL and HS) are evaluated as one, with
        the sum of their coefficients (the value is linear in it); `weights_GN` keeps each token's Σ weight of
        the terms that apply to it, for the per-token view."""
        groups: dict[tuple, list[int]] = {}
        for j, term in enumerate(objective.terms):
            groups.setdefault((term.target, term.divergence, term.granularity, term.tail), []).append(j)
        applies_JN = (coefficients_JN != 0).to(coefficients_JN.dtype)
        self.terms = [objective.terms[members[0]] for members in groups.values()]
        self.coefficients_GN = torch.stack([coefficients_JN[members].sum(0) for members in groups.values()])
        self.weights_GN = torch.stack(
            [sum(objective.terms[j].weight * applies_JN[j] for j in members) for members in groups.values()]
        )

    def chunks(self, count: int):
        """The chunks: the tokens that need full targets, then the others, each in the chunk size it allows."""
        for first, last, arrays in ((0, self.full_count, self.full_arrays), (self.full_count, count, 2)):
            step = self.workspace.rows_for(arrays)
            for start in range(first, last, step):
                yield slice(start, min(start + step, last)), arrays

    def __call__(self, hidden_NH, weight_VH, bias_V, grad_hidden, grad_weight, grad_bias) -> Tensor:
        total = torch.zeros((), dtype=self.token_loss_N.dtype, device=hidden_NH.device)
        scale = 1.0 / self.temperature
        for rows, arrays in self.chunks(hidden_NH.shape[0]):
            loss, grad_logits = self.chunk(rows, arrays, hidden_NH[rows], weight_VH, bias_V)
            total = total + loss
            if grad_logits is None:
                continue
            grad_logits = grad_logits.to(weight_VH.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight_VH).mul_(scale)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden_NH[rows], alpha=scale)
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0).to(grad_bias.dtype), alpha=scale)
        return total

    def chunk(self, rows: slice, arrays: int, hidden_CH: Tensor, weight_VH: Tensor, bias_V: Tensor | None):
        """The chunk's loss and its gradient with respect to the chunk's logits [C, V] (None when no term
        applies to any of its tokens); fills the per-token views."""
        n = rows.stop - rows.start
        logprobs, probs, *full_arrays = self.workspace.arrays(arrays, n)
        _logits_into(logprobs, hidden_CH, weight_VH, bias_V, self.temperature)
        log_softmax_(logprobs, probs)
        ids = self.ids_N[rows]
        self.token_logprobs_N[rows] = logprobs.gather(-1, ids[:, None]).squeeze(-1)
        self.entropy_N[rows] = -rowdot(probs, logprobs, self.workspace.scratch)
        if self.eos_prob_N is not None:
            self.eos_prob_N[rows] = probs[:, self.eos_ids].sum(-1)
        coefficients_GC = self.coefficients_GN[:, rows].to(probs.dtype)
        weights_GC = self.weights_GN[:, rows].to(probs.dtype)
        state = _ChunkState(self.token_loss_N[rows], torch.zeros(n, dtype=probs.dtype, device=probs.device))
        if not bool((coefficients_GC != 0).any()):
            return state.loss, None
        scores = {name: s.rows(rows) for name, s in self.scores.items()}
        for term, full, coefficient, weight in zip(self.terms, self.full, coefficients_GC, weights_GC):
            if not full:
                self._sparse_term(term, coefficient, weight, logprobs, ids, scores.get(term.target), state)
        q = None
        if full_arrays:
            q = self._full_terms(rows, coefficients_GC, weights_GC, logprobs, probs, scores, full_arrays, state)
        probs.mul_(-state.scale_C[:, None])
        if q is not None:
            probs.add_(q)
        for token_rows, entry_ids, grad in state.sparse:
            probs.index_put_((token_rows, entry_ids), grad, accumulate=True)
        return state.loss, probs

    def _sparse_term(self, term, coefficient_R, weight_R, logprobs_RV, ids_R, target, state, offset=0, full_RV=None):
        """A sampled-token or Top-K term on R rows, from the student's log-probs at the entries it reads only.
        `offset` is the first row's place in the chunk; `full_RV`, the target's full log-probs if needed."""
        applies = coefficient_R.nonzero().squeeze(-1)
        if applies.numel() == 0:
            return
        c = self.objective.config
        coefficient = coefficient_R[applies]
        if term.granularity == "sampled":
            entry_ids = ids_R[applies, None]
            target = None if target is None else target.rows(applies)
            values, grad = _by_autograd(
                lambda s: sampled_values(self.objective, term, s.squeeze(-1), target),
                logprobs_RV[applies[:, None], entry_ids],
                coefficient,
            )
        else:
            # The support of the run of rows from the first to the last the term applies to (views, no [R, V]
            # copy; the tokens are grouped by term), then of those rows.
            run = slice(int(applies[0]), int(applies[-1]) + 1)
            support = topk_inputs(self.objective, target.rows(run), lambda: full_RV[run], lambda: logprobs_RV[run])
            if applies.numel() == run.stop - run.start:  # the term applies to every row of its run
                entry_ids, support_mask, target_support = support
            else:
                entry_ids, support_mask, target_support = (tensor[applies - run.start] for tensor in support)
            student = logprobs_RV[applies[:, None], entry_ids]
            if (term.tail or c.topk_tail) == "renormalize" and c.topk_support != "union":  # the closed form
                values, grad = support_divergence(term.divergence, c.jsd_beta, coefficient, student, target_support)
            else:
                values, grad = _by_autograd(
                    lambda s: topk_values(self.objective, term, s, target_support, support_mask), student, coefficient
                )
        index = applies + offset
        state.add(index, values, coefficient, weight_R[applies])
        state.scale_C.index_add_(0, index, grad.sum(-1))
        state.sparse.append((index[:, None], entry_ids, grad))

    def _full_terms(self, rows, coefficients_GC, weights_GC, logprobs_CV, probs_CV, scores, arrays, state):
        """The terms that read a target's full log-probs, target by target: on the target's span of the chunk
        (`_target_span`), a Top-K term takes its support from the full log-probs there, and a full-vocabulary
        term runs on its own rows within the span (`_full_term_run`). Returns the closed forms' Σ q [C, V], or None
        if none ran."""
        target_lp_buffer, q_sum_CV, *q_term_buffer = arrays
        # Two full-vocabulary terms in one chunk: each writes its q apart, then adds it (one: into q_sum at once).
        q_term_CV = q_term_buffer[0] if q_term_buffer else None
        q_written = False
        for name in ("teacher", "self"):
            terms = [
                (term, coefficient, weight)
                for term, full, coefficient, weight in zip(self.terms, self.full, coefficients_GC, weights_GC)
                if full and term.target == name
            ]
            span = self._target_span(name, rows, [coefficient for _, coefficient, _ in terms], target_lp_buffer)
            if span is None:
                continue
            part, target_lp_PV = span
            for term, coefficient, weight in terms:
                coefficient, weight = coefficient[part], weight[part]
                if not bool((coefficient != 0).any()):
                    continue
                if term.granularity != "full":  # a Top-K term whose support needs the full distribution
                    self._sparse_term(
                        term,
                        coefficient,
                        weight,
                        logprobs_CV[part],
                        self.ids_N[rows][part],
                        scores[name].rows(part),
                        state,
                        part.start,
                        target_lp_PV,
                    )
                    continue
                if not q_written:
                    q_sum_CV.zero_()
                    q_written = True
                self._full_term_run(
                    term,
                    coefficient,
                    weight,
                    part.start,
                    logprobs_CV,
                    probs_CV,
                    target_lp_PV,
                    q_sum_CV,
                    q_term_CV,
                    state,
                )
        return q_sum_CV if q_written else None

    def _target_span(self, name: str, rows: slice, coefficients: list[Tensor], buffer_RV: Tensor):
        """The chunk's rows from the first to the last that a term reading `name`'s full log-probs applies to (one
        run: the tokens are grouped by target) as a slice P, and the target's full log-probs there [P, V], written
        into `buffer_RV`. None when no such term applies to any row of the chunk."""
        span = _nonzero_span(coefficients)
        if span is None:
            return None
        part = slice(*span)
        return part, self._target_logprobs(name, rows.start + part.start, buffer_RV[: part.stop - part.start])

    def _full_term_run(
        self, term, coefficient_P, weight_P, offset, logprobs_CV, probs_CV, target_lp_PV, q_sum_CV, q_term_CV, state
    ) -> None:
        """One full-vocabulary term on its own run of rows: the target's span (P rows from chunk row `offset`)
        also holds the tokens of its Top-K terms (DOPD's LH beside HT), where this term's coefficient is 0 and its
        full-vocabulary work would be wasted. Adds the term's values and its scale of `s` to `state`, and its
        closed form's q to `q_sum_CV` (directly, or through `q_term_CV` when another full-vocabulary term shares
        the chunk)."""
        first, last = _nonzero_span([coefficient_P])
        own = slice(offset + first, offset + last)
        coefficient, weight = coefficient_P[first:last], weight_P[first:last]
        q = q_sum_CV[own] if q_term_CV is None else q_term_CV[own]
        values, scale = full_divergence_(
            term.divergence,
            self.objective.config.jsd_beta,
            coefficient,
            logprobs_CV[own],
            probs_CV[own],
            target_lp_PV[first:last],
            q,
            self.workspace.scratch,
        )
        if q_term_CV is not None:
            q_sum_CV[own].add_(q)
        applies = coefficient.nonzero().squeeze(-1)
        state.add(applies + own.start, values[applies], coefficient[applies], weight[applies])
        state.scale_C[own] += scale

    def _target_logprobs(self, name: str, start: int, buffer_RV: Tensor) -> Tensor:
        """The target's full log-probs of the ordered tokens from `start` on, into the buffer: copied from the
        ones its scores kept, or recomputed from its head."""
        head, kept = self.full_targets[name]
        index = self.index_N[start : start + buffer_RV.shape[0]]
        if kept is not None:
            return torch.index_select(kept.flatten(0, 1), 0, index, out=buffer_RV)
        hidden = head.hidden.detach().flatten(0, 1)[index]
        _logits_into(buffer_RV, hidden, head.weight.detach(), _detach(head.bias), self.temperature)
        log_softmax_rows_(buffer_RV, self.workspace.scratch)
        return buffer_RV


def _nonzero_span(coefficients: list[Tensor]) -> tuple[int, int] | None:
    """First and last + 1 of the rows where any of the coefficients [R] is not 0 (None: no such row)."""
    if not coefficients:
        return None
    needs = coefficients[0] != 0
    for coefficient in coefficients[1:]:
        needs = needs | (coefficient != 0)
    where = needs.nonzero().squeeze(-1)
    return None if where.numel() == 0 else (int(where[0]), int(where[-1]) + 1)


def _by_autograd(values_of, student_RK: Tensor, coefficient_R: Tensor) -> tuple[Tensor, Tensor]:
    """(values [R], gradient of Σ coefficient·value with respect to the student's entries [R, K]) by autograd on
    those entries only; `student_RK` is a copy (advanced indexing), so it can become a leaf."""
    with torch.enable_grad():
        student = student_RK.requires_grad_()
        values = values_of(student)
        (grad,) = torch.autograd.grad((values * coefficient_R).sum(), student, allow_unused=True)
    if grad is None:  # no entry the term reads carries mass (e.g. all masked)
        grad = torch.zeros_like(student)
    return values.detach(), grad


@dataclass
class _ChunkState:
    """What the terms of one chunk add up: the loss, the token views, and the logit gradient's parts: a per-row
    scale of `s` and sparse entries (rows [R, 1], ids [R, K], values [R, K])."""

    token_loss_C: Tensor  # a view into the run's `token_loss_N`
    scale_C: Tensor
    sparse: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    loss: Tensor | None = None

    def __post_init__(self):
        self.loss = self.scale_C.new_zeros(())

    def add(self, index_R: Tensor, values_R: Tensor, coefficient_R: Tensor, weight_R: Tensor) -> None:
        """Values of a term group on some of the chunk's tokens, with their coefficients and Σ weights."""
        self.loss = self.loss + (values_R * coefficient_R).sum()
        self.token_loss_C.index_add_(0, index_R, values_R * weight_R)
