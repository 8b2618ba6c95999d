"""The pieces of HostSyncWatch and of our sync-free replacements for DeepSpeed's step code
that need no process group (the whole step: tests/integration/test_host_sync.py)."""

import torch

from itpn.engine.host_sync import HostSyncWatch, _mask_invalid_norm, sync_free_norm_masking


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
