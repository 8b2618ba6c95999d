"""Fault injection for the resume and checkpoint-safety tests: ``ITPN_FAULT=POINT:STEP``
kills this process with SIGKILL (no cleanup, like a preempted node) when it reaches POINT
at optimizer step STEP. Points: ``after_step`` (after the step and its logging),
``in_save`` (after the checkpoint files are written, before the save is marked complete).
Unset in normal runs: a dictionary lookup per step."""

from __future__ import annotations

import os
import signal


def maybe_die(point: str, step: int) -> None:
    if os.environ.get("ITPN_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
