"""The weights the privileged student scores with (`objective.self_weights`): the paper writes sg[Π_S^priv] and
does not say which weights that is.

- `live`: the weights being trained, at each step (no copy).
- `frozen`: the student's weights at step 0.
- `ema`: an exponential moving average of the weights, `copy ← decay · copy + (1 − decay) · live` after every
  optimizer step (`objective.self_ema_decay`). The average is accumulated in float32: in half precision each
  `(1 − decay) · Δ` of an optimizer-sized step rounds away and the copy would stay at step 0 (the module's weights
  are bf16 under DeepSpeed ZeRO-1/2 with bf16, whose fp32 masters live in the optimizer). What is swapped in is
  the average cast to the module's dtype, once per step.
- `lagged`: the weights as they were at the last multiple of `objective.self_sync_every` optimizer steps.

Every term whose target is the privileged self (DOPD's LL and HS, `opsd`, `objective.target=self`) and the
routing's `q_S` read this pass, so they all see the same weights. Only the trainable tensors are copied: every
weight of a fully trained student, the adapters of a LoRA student (its frozen base is shared). During the
privileged-self pass the copy is swapped into the module in place of the live tensors and swapped back after it,
so the module, its engine wrapper and its optimizer stay the same objects. Each process holds the same copy: it is
made from the same initial weights and updated with the same (already reduced) weights after each step.

Under FSDP2 a parameter is a `DTensor`: the copy holds its local shard and the swap writes into that shard. A unit
that is already gathered is not gathered again, and accelerate's FSDP2 preparation keeps the final norm and the
output head (with the embeddings, for a tied student) gathered after a forward. So every FSDP2 unit is resharded
before the swap (the pass then gathers the copy) and again after it, the units that were gathered before are
gathered again with the live weights (so they are as they were found), and the privileged head, which the loss
reads long after the pass, is kept as a whole tensor of its own (`keep_head`, applied by `scoring.frozen_pass`
within the swap): the gathered storage it came from is freed by the reshard and refilled by later passes.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from .scoring import heads_kept
from .types import Head

logger = logging.getLogger("dopd")


def _local(tensor: Tensor) -> Tensor:
    """The tensor a process holds: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def fsdp2_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units (`fully_shard` modules) in `model`; empty when nothing is sharded by FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def _is_gathered(unit: torch.nn.Module) -> bool:
    """Whether an FSDP2 unit holds its parameters gathered now (torch's internal state: False where it moved)."""
    try:
        group = unit._get_fsdp_state()._fsdp_param_group
    except AttributeError:
        return False
    return bool(group is not None and getattr(group, "is_unsharded", False))


class SelfWeights:
    """The privileged-self weights of a run: none to keep for `live`, else a copy of the trainable tensors.

    `mode`: one of `objectives.SELF_WEIGHTS`, checked with the objective's options. `model`: the unwrapped student
    (its trainable parameters are those the copy mirrors, in `named_parameters` order)."""

    def __init__(self, mode: str, model: torch.nn.Module, ema_decay: float = 0.99, sync_every: int = 1):
        self.mode, self.ema_decay, self.sync_every = mode, ema_decay, sync_every
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [name for name, _ in trainable], [p for _, p in trainable]
        self.model = model
        self.units = fsdp2_units(model) if mode != "live" else []
        self.copy: list[Tensor] = []  # what is swapped in, in the module's dtype
        self.average: list[Tensor] = []  # ema: the float32 accumulator (the copy itself where that is float32)
        self.version = 0  # counts the changes of the copy (ema: every step; lagged: every sync)
        self._head: tuple[int, Tensor, Tensor | None] | None = None  # (version, weight, bias) kept under FSDP2
        if mode != "live":
            with torch.no_grad():
                self.copy = [_local(p).detach().clone() for p in self.params]
        if mode == "ema":
            self.average = [c if c.dtype == torch.float32 else c.float() for c in self.copy]

    @classmethod
    def for_run(cls, objective, model: torch.nn.Module, log: bool = True) -> SelfWeights | None:
        """The run's privileged-self weights (`objective.self_weights`), copied from `model` as it is now (its
        step-0 weights; a resumed run then loads the copy from its checkpoint), or None when no pass reads them.
        `log`: say in the log which weights and how much memory the copy takes."""
        if not objective.needs_self:
            return None
        c = objective.config
        weights = cls(c.self_weights, model, c.self_ema_decay, c.self_sync_every)
        if log:
            logger.info(weights.describe())
        return weights

    @property
    def is_live(self) -> bool:
        return self.mode == "live"

    @property
    def sharded(self) -> bool:
        return bool(self.units)

    def nbytes(self) -> int:
        """Bytes of the copy on this process (0 for `live`), the float32 average of `ema` included."""
        tensors = self.copy + [a for a, c in zip(self.average, self.copy) if a is not c]
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        if self.is_live:
            return "privileged self: the live training weights (objective.self_weights=live; no copy)"
        what = {
            "frozen": "a frozen copy of the student's weights at step 0",
            "ema": f"an EMA of the student's weights (decay {self.ema_decay:g} per optimizer step, kept in float32)",
            "lagged": f"the student's weights synced every {self.sync_every} optimizer steps",
        }[self.mode]
        sharded = ", plus a whole output head while scoring (FSDP2)" if self.sharded else ""
        return (
            f"privileged self: {what} (objective.self_weights={self.mode}): {len(self.copy)} tensors, "
            f"{self.nbytes() / 2**20:.1f} MiB per process{sharded}"
        )

    def _reshard(self) -> None:
        for unit in self.units:
            unit.reshard()

    @contextmanager
    def swapped_in(self):
        """Within the block the module computes with the copy; the live tensors are back after it, also after an
        exception. A plain tensor is swapped by reference (no copy, no extra memory); a sharded one by value, with
        every FSDP2 unit resharded before and after so that no pass reads weights gathered on the other side of
        the swap, and the units found gathered gathered again after it (into the same storage, so a head a student
        pass read before the swap reads the live weights again); a `scoring.frozen_pass` of the model inside the
        block returns a head kept by `keep_head`."""
        if self.is_live:
            yield
            return
        saved = []
        gathered = [unit for unit in self.units if _is_gathered(unit)]
        self._reshard()
        with torch.no_grad():
            for param, copy in zip(self.params, self.copy):
                if hasattr(param, "to_local"):
                    live = param.to_local()
                    saved.append(live.clone())
                    live.copy_(copy)
                else:
                    saved.append(param.data)
                    param.data = copy
        try:
            with heads_kept(self.model, self.keep_head) if self.sharded else nullcontext():
                yield
        finally:
            self._reshard()
            with torch.no_grad():
                for param, live in zip(self.params, saved):
                    if hasattr(param, "to_local"):
                        param.to_local().copy_(live)
                    else:
                        param.data = live
            for unit in gathered:  # as found: a live head read before the swap (a student pass) reads live again
                unit.unshard()

    def keep_head(self, head: Head) -> Head:
        """`head` (a pass run inside `swapped_in`) with weights that stay valid after the block. A plain head is a
        view of the copy's own tensors already; a head gathered by FSDP2 is copied once per version of the copy
        and kept, so every micro-batch of a step shares one whole head."""
        if not self.sharded:
            return head
        if self._head is None or self._head[0] != self.version:
            self._head = None  # free the old head before the new one is made
            bias = None if head.bias is None else head.bias.detach().clone()
            self._head = (self.version, head.weight.detach().clone(), bias)
        return Head(head.hidden, self._head[1], self._head[2])

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        """Update the copy after optimizer step number `steps_done` (1 for the first)."""
        if self.mode == "ema":
            for param, average, copy in zip(self.params, self.average, self.copy):
                average.lerp_(_local(param).detach().float(), 1.0 - self.ema_decay)
                if copy is not average:
                    copy.copy_(average)
            self.version += 1
        elif self.mode == "lagged" and steps_done % self.sync_every == 0:
            for param, copy in zip(self.params, self.copy):
                copy.copy_(_local(param).detach())
            self.version += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The copy by parameter name (empty for `live`; the float32 average for `ema`), for checkpoints."""
        tensors = self.average if self.mode == "ema" else self.copy
        return {name: tensor.detach().cpu() for name, tensor in zip(self.names, tensors)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the copy from `state_dict()`; the names must be those of this run's trainable tensors."""
        if self.is_live:
            return
        missing = [name for name in self.names if name not in state]
        if missing or len(state) != len(self.names):
            raise ValueError(
                f"the checkpoint's privileged-self copy does not match the student's trainable tensors "
                f"({len(state)} saved, {len(self.names)} expected; first missing: {missing[:1]})"
            )
        # A checkpoint written with sharded weights (FSDP2) holds the main process's shards only.
        shapes = [(name, tuple(state[name].shape), tuple(c.shape)) for name, c in zip(self.names, self.copy)]
        wrong = [item for item in shapes if item[1] != item[2]]
        if wrong:
            name, saved, expected = wrong[0]
            raise ValueError(
                f"the checkpoint's privileged-self copy of {name} has shape {saved}, this run's {expected} "
                f"({len(wrong)} tensors differ): it was written by a run with other sharding"
            )
        with torch.no_grad():
            for index, (name, copy) in enumerate(zip(self.names, self.copy)):
                if self.average and self.average[index] is not copy:
                    self.average[index].copy_(state[name].to(copy.device, torch.float32))
                copy.copy_(state[name].to(copy.device, copy.dtype))
        self.version += 1
