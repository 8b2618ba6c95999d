"""Checkpoints that never destroy the last good one (issue #5, item 4).

Layout under ``<run_dir>/checkpoints``:

    step_00001000/        one DeepSpeed checkpoint (model, optimizer shards, client state)
    step_00001000/COMPLETE written by rank 0 after every rank finished writing
    latest                the tag of the newest COMPLETE checkpoint, replaced atomically

A save that dies part-way leaves a folder without COMPLETE; ``latest`` still names the
previous checkpoint, and ``--resume auto`` never picks an incomplete one. Old checkpoints
are pruned only after the new one is complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from .faults import maybe_die

log = logging.getLogger(__name__)

TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary name, then rename: a reader never sees a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete one."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / "COMPLETE").is_file():
            return tag
        log.warning("%s names %s, which is not complete; looking for the newest complete checkpoint", pointer, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, rank: int = 0, barrier=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = max(int(keep), 1)
        self.rank = rank
        self.barrier = barrier or (lambda: None)

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = tag_for(step)
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            stale = self.dir / tag
            if stale.exists() and not (stale / "COMPLETE").exists():
                shutil.rmtree(stale)  # leftovers of a save that died at this very step
        self.barrier()
        # save_latest=False: DeepSpeed would move its own pointer before we know every
        # rank has finished; we move ours after the barrier below.
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        maybe_die("in_save", step)
        self.barrier()
        if self.rank == 0:
            _atomic_write(self.dir / tag / "COMPLETE", f"{step}\n")
            _atomic_write(self.dir / "latest", tag + "\n")
            self._prune(tag)
        self.barrier()
        return tag

    def _prune(self, newest: str) -> None:
        tags = complete_tags(self.dir)
        for tag in tags[:-self.keep]:
            if tag != newest:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    def resolve(self, resume: str | None) -> tuple[str, str] | None:
        """(load_dir, tag) for ``resume``: "auto" (newest complete here, or None), "none", or
        a path to a checkpoint folder (``.../checkpoints/step_X``)."""
        if resume in (None, "none", ""):
            return None
        if resume == "auto":
            tag = latest_tag(self.dir)
            return (str(self.dir), tag) if tag else None
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        if not (path / "COMPLETE").is_file():
            raise ValueError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        return str(path.parent), path.name
