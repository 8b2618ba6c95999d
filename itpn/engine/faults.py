"""Fault injection for the resume and checkpoint-safety tests: ``ITPN_FAULT=POINT:STEP``
kills this process with SIGKILL (no cleanup, like a preempted node) when it reaches POINT
at optimizer step STEP. Points: ``after_step`` (after the step and its logging),
``in_save`` (after the checkpoint files are written, before the save is marked complete).
``inf_grad:STEP`` instead makes the gradients of step STEP infinite while its loss stays
finite (a diverging step that only the gradient shows).
Unset in normal runs: a dictionary lookup per step."""

from __future__ import annotations

import os
import signal

import torch


class _InfGrad(torch.autograd.Function):
    """Identity forward; the backward returns +inf for every element."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def maybe_inf_grad(loss: torch.Tensor, step: int) -> torch.Tensor:
    if os.environ.get("ITPN_FAULT") == f"inf_grad:{step}":
        return _InfGrad.apply(loss)
    return loss


def maybe_die(point: str, step: int) -> None:
    if os.environ.get("ITPN_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
