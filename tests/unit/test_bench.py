"""itpn-bench runs end to end on the CPU (tiny recipe) and reports every setting it ran."""

from itpn.cli import bench


def test_bench_tiny_ladder(capsys, tmp_path):
    out = tmp_path / "b.jsonl"
    assert bench.main(["--recipe", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--ladder", "naive", "fused", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recipe tiny:" in text
    rows = [line.split()[0] for line in text.splitlines() if line.startswith(("naive", "fused"))]
    assert rows == ["naive", "fused"]
    assert len(out.read_text().splitlines()) == 2


def test_vit_flops_formula_matches_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from itpn.models.flops import vit_forward_flops
    from itpn.objectives.clip_teacher import CLIPTeacher, register_tiny_config

    teacher = CLIPTeacher(register_tiny_config(), None, image_size=64, dtype=torch.float32)
    # The fused MHA fast path is invisible to the counter; count the unfused ops.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as c:
            teacher(torch.randn(1, 3, 64, 64))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    expect = vit_forward_flops(teacher.width, teacher.layers, teacher.patch_size, 64, teacher.embed_dim)
    # CPU SDPA kernels are not counted either: add attention's two matmuls per layer.
    n = (64 // teacher.patch_size) ** 2 + 1
    counted = c.get_total_flops() + teacher.layers * 4 * n * n * teacher.width
    assert abs(counted - expect) / expect < 0.005, (counted, expect)
