"""The pieces of HostSyncWatch and of our sync-free replacements for DeepSpeed's step code
that need no process group (the whole step: tests/integration/test_host_sync.py)."""

import torch

import pytest
from torch.profiler import ProfilerActivity, profile

from itpn.engine.host_sync import HostSyncWatch, _mask_invalid_norm, foreach_clip_grad_norm_, sync_free_norm_masking


def test_watch_records_host_data_sent_to_a_device_and_accelerator_syncs():
    import deepspeed  # noqa: F401  (the watch hooks DeepSpeed's accelerator once it is imported)
    from deepspeed.accelerator import get_accelerator
    t = torch.ones(2)
    with HostSyncWatch() as watch:
        torch.tensor(-1.0)  # stays on the host: nothing to record
        torch.as_tensor(t, device="cpu")  # a tensor already: a .to(), not host data
        torch.tensor(-1.0, device="cpu")
        torch.as_tensor([1.0, 2.0], device=torch.device("cpu"))
        get_accelerator().synchronize()
        t.sum().item()
    assert [(name, where) for name, _, where in watch.calls] == [
        ("tensor(host data, device=...)", "cpu"), ("as_tensor(host data, device=...)", "cpu"),
        ("accelerator.synchronize", "accelerator"), ("item", "cpu")]
    assert "synchronize" not in vars(get_accelerator())  # the hook is gone after the watch


def test_norm_masking_matches_deepspeeds_and_copies_nothing():
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.zero import stage_1_and_2
    sync_free_norm_masking()  # (again, if an engine was built in this process already)
    original = _mask_invalid_norm.replaces
    assert original.__module__ == ds_utils.__name__ and original is not _mask_invalid_norm
    for value in (float("nan"), float("inf"), -float("inf"), 2.5, 0.0):
        ours, theirs = torch.tensor(value), torch.tensor(value)
        _mask_invalid_norm(ours, device="cpu")
        original(theirs, device="cpu")
        assert torch.equal(ours, theirs), value
        assert ours.item() == (-1.0 if value != value or abs(value) == float("inf") else value)
    assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is _mask_invalid_norm
    with HostSyncWatch() as watch:
        stage_1_and_2.mask_nan_or_inf_with_val_inplace(torch.tensor(float("nan")), device="cpu")
    assert watch.calls == []


def _params_with_grads(seed, dtypes, scale):
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, dtype in enumerate(dtypes):
        p = torch.nn.Parameter(torch.zeros(3 + i, 5, dtype=dtype))
        p.grad = (torch.randn(3 + i, 5, generator=g) * scale).to(dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped, as torch skips it
    return params


@pytest.mark.parametrize("dtypes", [[torch.float32] * 6, [torch.bfloat16] * 4, [torch.float32, torch.bfloat16] * 3])
@pytest.mark.parametrize("scale", [0.01, 10.0, float("nan")])
def test_foreach_clip_is_torchs_bit_for_bit(dtypes, scale):
    # the same norm and clipped gradients as torch's clip_grad_norm_(foreach=True): below and
    # above max_norm, fp32, bf16 and both in one list (grouped by dtype), and a NaN gradient
    ours, theirs = _params_with_grads(0, dtypes, scale), _params_with_grads(0, dtypes, scale)
    if scale != scale:
        for params in (ours, theirs):
            params[0].grad[0, 0] = float("nan")
            params[1].grad.mul_(10.0)
    norm = foreach_clip_grad_norm_(ours, 1.0)
    ref = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
    assert torch.equal(norm, ref) or (norm.isnan() and ref.isnan())
    assert norm.dtype == ref.dtype
    for a, b in zip(ours[:-1], theirs[:-1]):
        assert a.grad.dtype == b.grad.dtype and torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
    assert ours[-1].grad is None


def test_foreach_clip_issues_no_operation_per_parameter():
    params = _params_with_grads(1, [torch.float32] * 40, 10.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        foreach_clip_grad_norm_(params, 1.0)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]  # top level
    assert ops.count("aten::_foreach_norm") == 1 and ops.count("aten::to") <= 1, ops
    assert len(ops) < 10, ops
