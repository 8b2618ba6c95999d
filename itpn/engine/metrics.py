"""Logging and metrics (style habit 9): stdlib logging where one helper decides which rank
speaks, and metric sinks (TensorBoard, JSON lines) that always receive throughput, MFU and
memory alongside the loss terms. Only rank 0 writes metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("itpn")

#: Dense bf16 tensor-core peaks (TFLOP/s, datasheet) used for MFU in training logs; the
#: benchmark measures the achievable matmul peak instead (docs/performance.md).
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def setup_logging(rank: int, run_dir: str | os.PathLike | None = None) -> None:
    """Rank 0 logs INFO to stderr (and to run_dir/train.log); other ranks only warnings."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0 and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


class JsonlSink:
    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def scalars(self, step: int, values: dict) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(str(path))

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.w.add_scalar(k, v, step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        self.w.add_image(tag, image, step)  # (3, H, W) in [0, 1]

    def close(self) -> None:
        self.w.close()


class MetricLogger:
    """Collects per-step metrics; rank 0 writes them to every sink."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, tensorboard: bool = True):
        self.rank = rank
        self.sinks = []
        if rank == 0:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
            if tensorboard:
                self.sinks.append(TensorBoardSink(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        for s in self.sinks:
            s.scalars(step, values)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        for s in self.sinks:
            s.image(step, tag, image)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class Throughput:
    """Images/s, data-wait fraction and ETA over the last logging window."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.step0 = total_steps, start_step
        self.t_window = time.perf_counter()
        self.wait = 0.0
        self.images = 0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.wait += data_wait

    def window(self, step: int) -> dict:
        now = time.perf_counter()
        dt = max(now - self.t_window, 1e-9)
        img_s = self.images / dt
        steps_left = self.total - step
        per_step = dt / max(self.steps_in_window(step), 1)
        out = {"img_s": img_s, "data_wait_frac": self.wait / dt, "eta_min": steps_left * per_step / 60}
        self.t_window, self.wait, self.images, self.step0 = now, 0.0, 0, step
        return out

    def steps_in_window(self, step: int) -> int:
        return step - self.step0
