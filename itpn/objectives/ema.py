"""Exponential-moving-average teacher for masked feature modeling (iTPN paper, sections
3.3-3.4: "the teacher is a momentum-updated copy of the student", momentum 0.996).

The EMA copy is held outside the student's module tree on purpose: it must never enter an
optimizer, a ZeRO partition or the student's checkpoint, and it stays in fp32 whatever the
training precision (a 0.996 momentum update is below bf16's resolution, so a bf16 EMA would
mostly stop moving).

How the engine must call ``update`` (after every optimizer step that was not skipped):

    objective.ema.update(objective.encoder, momentum, gather=gather)

``gather`` is None when the student's parameters are whole (single device, DDP, ZeRO-1/2:
ZeRO-1/2 shard optimizer state and gradients, never the fp16/bf16 parameters). Under
ZeRO-3, pass a context-manager factory that materialises a list of parameters, i.e.
``lambda params: deepspeed.zero.GatheredParameters(params)``. The update then gathers one
module's own parameters at a time (a block's linears, a LayerNorm), so at most one module
is ever whole in memory.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

Gather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def momentum_schedule(step: int, total_steps: int, base: float = 0.996, final: float | None = None) -> float:
    """Momentum at ``step``: constant ``base``, or a cosine ramp from base to ``final``
    (BYOL's schedule) when ``final`` is given."""
    if final is None or total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


class EMATeacher:
    """An fp32, frozen, eval-mode copy of ``student``; ``module`` is the copy."""

    def __init__(self, student: nn.Module):
        self.module = copy.deepcopy(student).float().eval()
        self.module.requires_grad_(False)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def to(self, device) -> "EMATeacher":
        self.module.to(device)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float, gather: Gather | None = None) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        pairs = _module_pairs(student, self.module)
        for s_mod, t_mod in pairs:
            s_params, t_params = _own_params(s_mod), _own_params(t_mod)
            if not s_params:
                continue
            ctx = gather(s_params) if gather is not None else contextlib.nullcontext()
            with ctx:
                for sp, tp in zip(s_params, t_params):
                    tp.lerp_(sp.detach().to(device=tp.device, dtype=tp.dtype), 1.0 - momentum)

    @torch.no_grad()
    def copy_from(self, student: nn.Module, gather: Gather | None = None) -> None:
        """Reset the teacher to the student's current weights (momentum 0)."""
        self.update(student, 0.0, gather)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def _module_pairs(student: nn.Module, teacher: nn.Module) -> Iterable[tuple[nn.Module, nn.Module]]:
    s_named, t_named = dict(student.named_modules()), dict(teacher.named_modules())
    if s_named.keys() != t_named.keys():
        raise ValueError("EMA teacher and student have different module structures")
    return [(s_named[k], t_named[k]) for k in s_named]
