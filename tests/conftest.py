import contextlib
import fcntl
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "official_itpn")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def memory_budget_restored():
    """torch's activation memory budget (process-wide, set by the code under test) put back."""
    import torch._functorch.config as functorch_config
    before = functorch_config.activation_memory_budget
    yield
    functorch_config.activation_memory_budget = before


SHM = "/dev/shm"
DS_SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _ds_shm_buffers() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(DS_SHM_PREFIX)} if os.path.isdir(SHM) else set()


@pytest.fixture(scope="session")
def _ds_shm_before_session() -> set[str]:
    return _ds_shm_buffers()


def _ds_shm_mapped() -> set[str]:
    """The DeepSpeed buffers some live process maps (its test is still running)."""
    mapped = set()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if DS_SHM_PREFIX in line:
                        mapped.add(os.path.basename(line.split(None, 5)[-1].strip().removesuffix(" (deleted)")))
        except OSError:  # gone, or another user's
            continue
    return mapped


@pytest.fixture(autouse=True)
def _release_deepspeed_shm(_ds_shm_before_session):
    """DeepSpeed's CPU shared-memory all-reduce (0.19.8) leaves a buffer file in /dev/shm per
    rank; its processes exit without unlinking them. Over a day of test runs they held 15 GB of
    this VM's 24 GB of memory. ``init_distributed`` now unlinks them (``release_shm_buffer``);
    this stays as a net for a process that dies before it gets there.
    After each test, the files that appeared since the session began are removed (also those a
    module-scoped fixture made), unless a run may still be using them, e.g. in the other
    pytest-xdist worker: a file some live process maps, or one made in the last minute (its
    creator writes it before mapping it). Its other ranks may not have opened it yet, and
    unlinking it would leave them waiting for it."""
    yield
    now = time.time()
    leftover = set()
    for name in _ds_shm_buffers() - _ds_shm_before_session:
        with contextlib.suppress(FileNotFoundError):
            if now - os.stat(os.path.join(SHM, name)).st_mtime > 60:
                leftover.add(name)
    for name in leftover - _ds_shm_mapped() if leftover else ():
        try:
            os.unlink(os.path.join(SHM, name))
        except FileNotFoundError:
            pass


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory):
    """``once_per_run(name, make)``: the folder ``make(folder)`` filled, made once per test
    run. pytest-xdist workers share it (the first makes it under a lock while the others
    wait), so an expensive module-scoped fixture does not run again in each worker that gets
    some of its module's tests."""
    return lambda name, make: _once(tmp_path_factory, name, make)


def _once(tmp_path_factory, name: str, make) -> Path:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture
def fixtures_dir():
    path = os.environ.get("ITPN_FIXTURES", FIXTURES)
    if not os.path.isdir(path):
        pytest.fail(f"reference fixtures not found at {path} (set ITPN_FIXTURES)")
    return path


def _interpreter_cannot_take_scalars(version: str) -> bool:
    """Triton before 3.7 (e.g. the GPU image's 3.6) with NumPy 2.4 or later: every kernel with
    a runtime loop bound fails in the interpreter."""
    if tuple(int(part) for part in version.split(".")[:2]) >= (3, 7):
        return False
    try:
        int(np.zeros(1))
    except TypeError:
        return True
    return False


@pytest.fixture
def triton_interpreter():
    """Skips unless Triton's interpreter can run our kernels here."""
    triton = pytest.importorskip("triton")
    if _interpreter_cannot_take_scalars(triton.__version__):
        pytest.skip(f"Triton {triton.__version__}'s interpreter turns scalar arguments into Python ints "
                    f"with int() of a 1-element array, which NumPy {np.__version__} rejects (fixed in "
                    "Triton 3.7); the compiled kernels are checked by tests/gpu")


@pytest.fixture
def run_interpreted(triton_interpreter):
    """Runs a test file of tests/unit in a subprocess with Triton's interpreter switched on
    (it has to be set before Triton is imported) and fails with its output unless every test
    in it passed, none skipped."""
    root = os.path.join(os.path.dirname(__file__), "..")

    def run(name: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               os.path.join(root, "tests", "unit", name)],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout
    return run
