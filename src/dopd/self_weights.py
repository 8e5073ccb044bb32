"""The weights the privileged student scores with (`objective.self_weights`): the paper writes sg[Π_S^priv] and
does not say which weights that is.

- `live`: the weights being trained, at each step (no copy).
- `frozen`: the student's weights at step 0.
- `ema`: an exponential moving average of the weights, `copy ← decay · copy + (1 − decay) · live` after every
  optimizer step (`objective.self_ema_decay`).
- `lagged`: the weights as they were at the last multiple of `objective.self_sync_every` optimizer steps.

Every term whose target is the privileged self (DOPD's LL and HS, `opsd`, `objective.target=self`) and the
routing's `q_S` read this pass, so they all see the same weights. Only the trainable tensors are copied: every
weight of a fully trained student, the adapters of a LoRA student (its frozen base is shared). During the
privileged-self pass the copy is swapped into the module in place of the live tensors and swapped back after it,
so the module, its engine wrapper and its optimizer stay the same objects. Each process holds the same copy: it is
made from the same initial weights and updated with the same (already reduced) weights after each step. A
sharded parameter (an FSDP2 `DTensor`) is copied and swapped as its local shard.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import Tensor

MODES = ("live", "frozen", "ema", "lagged")
logger = logging.getLogger("dopd")


def _local(tensor: Tensor) -> Tensor:
    """The tensor a process holds: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class SelfWeights:
    """The privileged-self weights of a run: none to keep for `live`, else a copy of the trainable tensors.

    `model`: the unwrapped student (its trainable parameters are those the copy mirrors, in `named_parameters`
    order)."""

    def __init__(self, mode: str, model: torch.nn.Module, ema_decay: float = 0.99, sync_every: int = 1):
        if mode not in MODES:
            raise ValueError(f"objective.self_weights = {mode!r} is unknown; known: {', '.join(MODES)}")
        self.mode, self.ema_decay, self.sync_every = mode, ema_decay, sync_every
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [name for name, _ in trainable], [p for _, p in trainable]
        self.copy: list[Tensor] = []
        if mode != "live":
            with torch.no_grad():
                self.copy = [_local(p).detach().clone() for p in self.params]

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

    def nbytes(self) -> int:
        """Bytes of the copy on this process (0 for `live`)."""
        return sum(t.numel() * t.element_size() for t in self.copy)

    def describe(self) -> str:
        if self.is_live:
            return "privileged self: the live training weights (objective.self_weights=live; no copy)"
        what = {
            "frozen": "a frozen copy of the student's weights at step 0",
            "ema": f"an EMA of the student's weights (decay {self.ema_decay:g} per optimizer step)",
            "lagged": f"the student's weights synced every {self.sync_every} optimizer steps",
        }[self.mode]
        return (
            f"privileged self: {what} (objective.self_weights={self.mode}): {len(self.copy)} tensors, "
            f"{self.nbytes() / 2**20:.1f} MiB per process"
        )

    @contextmanager
    def swapped_in(self):
        """Within the block the module computes with the copy; the live tensors are back after it, also after an
        exception. A plain tensor is swapped by reference (no copy, no extra memory); a sharded one by value."""
        if self.is_live:
            yield
            return
        saved = []
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
            yield
        finally:
            with torch.no_grad():
                for param, live in zip(self.params, saved):
                    if hasattr(param, "to_local"):
                        param.to_local().copy_(live)
                    else:
                        param.data = live

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        """Update the copy after optimizer step number `steps_done` (1 for the first)."""
        if self.mode == "ema":
            for param, copy in zip(self.params, self.copy):
                copy.lerp_(_local(param).detach().to(copy.dtype), 1.0 - self.ema_decay)
        elif self.mode == "lagged" and steps_done % self.sync_every == 0:
            for param, copy in zip(self.params, self.copy):
                copy.copy_(_local(param).detach())

    def state_dict(self) -> dict[str, Tensor]:
        """The copy by parameter name (empty for `live`), for checkpoints."""
        return {name: tensor.detach().cpu() for name, tensor in zip(self.names, self.copy)}

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
            for name, copy in zip(self.names, self.copy):
                copy.copy_(state[name].to(copy.device, copy.dtype))
