"""itpn-bench runs end to end on the CPU (tiny recipe) and reports every setting it ran:
synthetic batches, the real loader, a DeepSpeed engine (ZeRO-3 + CPU offload) and the
largest-batch search."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itpn.cli import bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "data"
    subprocess.run([sys.executable, "-m", "data_prep", "demo", str(out)], check=True, capture_output=True)
    return out / "train"


def test_bench_tiny_ladder(capsys, tmp_path):
    out = tmp_path / "b.jsonl"
    assert bench.main(["--recipe", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--ladder", "naive", "fused", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recipe tiny:" in text
    rows = [line.split()[0] for line in text.splitlines() if line.startswith(("naive", "fused"))]
    assert rows == ["naive", "fused"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for r in records:  # the phases of the split timing add up to 100%, and their total is reported
        assert abs(r["teacher_pct"] + r["student_pct"] + r["optimizer_pct"] - 100) < 1e-6
        assert r["split_ms"] > 0 and r["step_ms"] > 0


def test_bench_rows_count_dynamos_graphs_and_breaks(monkeypatch):
    """Each row says how many graphs dynamo made and how many breaks it hit (a GPU row with
    breaks prints them). Blocks compiled with dynamo + AOTAutograd only (no code generation,
    fast on the CPU): one forward and one backward graph per block signature, no break; an
    eager setting makes none. A break planted in a block's forward is counted."""
    cfg, cpu = bench.load_recipe("tiny"), torch.device("cpu")
    aot = {**bench.LADDER["fold"], "compile_options": {"backend": "aot_eager"}}
    row = bench.run_setting(cfg, "fold", aot, 2, 1, 0, cpu, split=False)
    from itpn.layers import Block
    model = bench.build_objective(cfg)
    signatures = len({tuple(p.shape for p in b.parameters()) for b in model.modules() if isinstance(b, Block)})
    assert row["graph_breaks"] == 0 and row["dynamo_graphs"] >= signatures > 0, row
    shown = {"speedup": 1.0, "tflops": 0.0, "mfu_pct": 0.0}
    assert "graph breaks" not in bench.format_row({**row, **shown})
    eager = bench.run_setting(cfg, "fused", bench.LADDER["fused"], 2, 1, 0, cpu, split=False)
    assert eager["dynamo_graphs"] == eager["graph_breaks"] == 0, eager
    forward = Block._forward

    def broken(self, *args):
        torch._dynamo.graph_break()
        return forward(self, *args)

    monkeypatch.setattr(Block, "_forward", broken)
    row = bench.run_setting(cfg, "fold", aot, 2, 1, 0, cpu, split=False)
    assert row["graph_breaks"] > 0, row
    assert bench.format_row({**row, **shown}).endswith(f"  {row['graph_breaks']} graph breaks")


def test_bench_real_loader_rows(capsys, tmp_path, demo_shards):
    out = tmp_path / "b.jsonl"
    assert bench.main(["--recipe", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu",
                       "--ladder", "fused", "--data", str(demo_shards), "--workers", "1", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["setting"] for r in rows] == ["loader", "fused", "fused+data"]
    assert all(r["img_s"] > 0 for r in rows)
    assert "the loader alone, 1 workers" in capsys.readouterr().out


def test_bench_deepspeed_zero3_offload(tmp_path):
    # In a subprocess: the DeepSpeed engine initialises a process group for the whole process.
    out = tmp_path / "b.jsonl"
    proc = subprocess.run([sys.executable, "-m", "itpn.cli.bench", "--recipe", "tiny", "--batch", "4", "--steps", "2",
                           "--warmup", "1", "--device", "cpu", "--ladder", "bf16", "--zero", "zero3_offload",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["setting"] == "bf16/zero3_offload" and row["img_s"] > 0
    assert row["zero_stage"] == 3 and row["optimizer"] == "DeepSpeedCPUAdam"
    assert row["offload_optimizer"] and row["offload_param"]


def test_largest_batch_search():
    calls = []

    def fits(limit):
        def probe(b):
            calls.append(b)
            return b <= limit
        return probe
    assert bench.largest_batch(fits(200), 32, 4096) == 200   # 32, 64, 128, 256 fail, bisect to 8s
    assert calls[:4] == [32, 64, 128, 256] and len(calls) <= 10
    assert bench.largest_batch(fits(10_000), 32, 1000) == 1000  # stops at the limit
    assert bench.largest_batch(fits(16), 32, 4096) == 0         # the start does not fit
    assert bench.largest_batch(fits(37), 32, 4096) == 32        # within the granularity of 8


def test_bench_keeps_going_past_a_failing_setting_and_writes_rows_as_they_finish(capsys, tmp_path, monkeypatch):
    """A GPU run cut off by its time limit, or one setting that breaks (a kernel's first
    compile, say), must not lose the rows already measured: each row is in the JSON file as
    soon as it is measured, a failing setting becomes a row with its error, the next setting
    still runs, and the exit status says something failed."""
    out = tmp_path / "b.jsonl"
    real = bench.run_setting
    seen_when_fused_ran = []

    def run_setting(cfg, name, setting, *args, **kwargs):
        if name == "fused":
            seen_when_fused_ran.extend(json.loads(line)["setting"] for line in out.read_text().splitlines())
            raise RuntimeError("triton: out of resources (planted)")
        return real(cfg, name, setting, *args, **kwargs)

    monkeypatch.setattr(bench, "run_setting", run_setting)
    assert bench.main(["--recipe", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--ladder", "naive", "fused", "bf16", "--json", str(out)]) == 1
    assert seen_when_fused_ran == ["naive"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["setting"] for r in records] == ["naive", "fused", "bf16"]
    assert records[1]["error"] == "RuntimeError: triton: out of resources (planted)"
    assert records[2]["img_s"] > 0 and records[2]["speedup"] > 0
    text = capsys.readouterr().out
    assert [ln.split()[1] for ln in text.splitlines() if ln.startswith("+ ")] == ["naive", "fused", "bf16"]
    (failed,) = [ln for ln in text.splitlines() if ln.startswith("fused")]
    assert "FAILED: RuntimeError: triton: out of resources (planted)" in failed


def test_bench_max_batch_cli(capsys):
    assert bench.main(["--recipe", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--ladder", "fused", "--max-batch", "--max-batch-limit", "8"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fused")]
    assert len(line) == 1 and line[0].split()[1] == "8" and line[0].endswith("largest batch")


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


def test_kernel_categories_of_h100_kernel_names():
    # Names as the H100 profile of the compiled CLIP-L step printed them (docs/performance.md).
    names = {
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention backward",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention forward",
        "flash_fwd_kernel": "attention forward",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMM",
        "triton_red_fused__to_copy_div_mul_sum_12": "reduction (Triton)",
        "triton_per_fused_native_layer_norm_3": "reduction (Triton)",
        "triton_poi_fused_gelu_7": "pointwise (Triton)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "collective",
        "Memcpy HtoD (Pinned -> Device)": "copy / cast / fill",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm / activation (eager)",
        "some_unknown_kernel": "other",
    }
    for name, category in names.items():
        assert bench.kernel_category(name) == category, name
    times = [100.0 * (i + 1) for i in range(len(names) - 1)] + [1e4]  # microseconds; the unknown kernel costliest
    rows, text = bench.profile_summary(list(zip(names, times, [2] * len(names))), steps=2)
    assert abs(sum(r["pct"] for r in rows) - 100) < 1e-6
    assert rows[0]["category"] == "other" and rows[0]["ms_per_step"] == pytest.approx(5.0)
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    assert sum(r["ms_per_step"] for r in rows) == pytest.approx(sum(times) / 2e3)
    assert "attention backward" in text


def test_bench_profile_cpu(tmp_path):
    out = tmp_path / "prof.txt"
    rows = tmp_path / "b.jsonl"
    assert bench.main(["--recipe", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--ladder", "fused", "--profile", str(out), "--json", str(rows)]) == 0
    text = out.read_text()
    assert text.startswith("# 3 profiled steps") and "GEMM" in text
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert {r["category"] for r in row["profile"]} >= {"GEMM", "optimizer"}


def test_bench_check_syncs_counts_host_reads(tmp_path):
    # The naive setting's GradScaler reads its inf flag on the host every step (fp16): seen.
    # The fused bf16 step reads nothing, also inside DeepSpeed ZeRO-1 (the trainer's engine;
    # in a subprocess, as it initialises a process group).
    out = tmp_path / "b.jsonl"
    assert bench.main(["--recipe", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                       "--ladder", "naive", "fused", "--check-syncs", "--json", str(out)]) == 0
    naive, fused = [json.loads(line) for line in out.read_text().splitlines()]
    assert naive["host_reads"] > 0 and "grad_scaler.py" in naive["sync_report"]
    assert fused["host_reads"] == 0, fused["sync_report"]
    proc = subprocess.run([sys.executable, "-m", "itpn.cli.bench", "--recipe", "tiny", "--batch", "4", "--steps", "1",
                           "--warmup", "1", "--device", "cpu", "--ladder", "fused", "--zero", "zero1", "--check-syncs",
                           "--json", str(tmp_path / "z.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "z.jsonl").read_text().splitlines()]
    # ... and DeepSpeed does not synchronise the device (its throughput timer did, twice a step)
    assert row["zero_stage"] == 1 and row["host_reads"] == 0 and row["accelerator_syncs"] == 0, row["sync_report"]
    # the baseline for our replacements: DeepSpeed's own methods, whose clip reads the norm
    proc = subprocess.run([sys.executable, "-m", "itpn.cli.bench", "--recipe", "tiny", "--batch", "4", "--steps", "1",
                           "--warmup", "1", "--device", "cpu", "--ladder", "fused", "--zero", "zero1",
                           "--deepspeed-loops", "--check-syncs", "--json", str(tmp_path / "d.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert row["setting"] == "fused/zero1+deepspeed-loops" and row["host_reads"] > 0, row
    assert "stage_1_and_2.py" in row["sync_report"] and "unscale_and_clip_grads" in row["sync_report"], row
    # fp32 weights under bf16 autocast without ZeRO: torch's fused AdamW, torch's clip, no sync
    proc = subprocess.run([sys.executable, "-m", "itpn.cli.bench", "--recipe", "tiny", "--batch", "4", "--steps", "1",
                           "--warmup", "1", "--device", "cpu", "--ladder", "fused", "--zero", "zero0", "--ds-precision",
                           "bf16_autocast", "--check-syncs", "--json", str(tmp_path / "a.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert row["setting"] == "fused/zero0+bf16_autocast" and row["zero_stage"] == 0 and row["optimizer"] == "AdamW"
    assert row["host_reads"] == 0 and row["accelerator_syncs"] == 0, row["sync_report"]


def test_count_host_syncs_counts_a_second_step_and_says_where_syncs_happen():
    # The first watched step may recompile compiled blocks (which synchronises): only the
    # second counts. A sync warning (CUDA's sync debug mode raises them from C++) is reported
    # with the Python stack that triggered it.
    import warnings
    calls = []

    def step():
        calls.append(len(calls))
        warnings.warn("called a synchronizing CUDA operation" if len(calls) == 2 else "other")
    row = bench.count_host_syncs(step, torch.device("cpu"))
    assert calls == [0, 1] and row["host_reads"] == 0 and row["cuda_syncs"] is None
    (line,) = row["sync_report"].splitlines()
    assert line.startswith("    1 x CUDA sync at test_bench.py:") and " step <- " in line


def _step_ops(*extra) -> dict:
    """Operations per step from benchmarks/count_step_ops.py: {label: (fwd+bwd, optimizer)},
    and {"loops": [lines]} the timings of --time-loops."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "count_step_ops.py"), "--steps", "0", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return {**{line[:40].strip(): tuple(int(n) for n in line[40:].split()[:2]) for line in lines
               if line.startswith(("plain", "DeepSpeed z"))},
            "loops": [line.strip() for line in lines if line.startswith("  DeepSpeed z")]}


def test_optimizer_steps_and_zero1_backward_issue_no_operation_per_parameter():
    # Operations outside the optimizer's own update (torch's fused AdamW in every row; the
    # tiny recipe has 176 parameters). The plain step and zero0 + bf16_autocast clip with
    # foreach_clip_grad_norm_, the same few operations. DeepSpeed's ZeRO-1 bf16 step issued a
    # norm loop of three operations per parameter and a re-pointing of the bf16 views of four;
    # with foreach_grad_norm and keep_bit16_views installed, none is left per parameter. Its
    # backward copied each gradient twice (about 11 operations per parameter); with
    # flat_zero1_reduction it issues about what the plain step's does.
    ours, deepspeeds = _step_ops("--time-loops", "2"), _step_ops("--deepspeed-loops")
    plain, zero1, autocast = (ours[k] for k in ("plain (torch fused AdamW, autocast)", "DeepSpeed zero1 + bf16",
                                                "DeepSpeed zero0 + bf16_autocast"))
    assert autocast[1] == plain[1] < 20, ours
    assert zero1[1] < 176, ours
    assert deepspeeds["DeepSpeed zero1 + bf16"][1] - zero1[1] >= 6 * 176, (ours, deepspeeds)
    assert zero1[0] - plain[0] < 176, ours
    assert deepspeeds["DeepSpeed zero1 + bf16"][0] - zero1[0] >= 10 * 176, (ours, deepspeeds)
    # --time-loops times the loops alone, DeepSpeed's against ours, for each ZeRO-1 engine
    # (and not with --deepspeed-loops, where ours are not installed); the flat reduction is
    # installed for bf16 weights, not for fp32 weights under DeepSpeed's torch_autocast, which
    # sends some gradients in bf16 and others in fp32
    assert [line.split(":")[0] for line in ours["loops"]] == ["DeepSpeed zero1 + bf16", "DeepSpeed zero1 + bf16_autocast"]
    loops = r"gradient norm: DeepSpeed \d+ us -> ours \d+ us, bf16 re-pointing: DeepSpeed \d+ us -> ours \d+ us"
    reduction = r", ZeRO-1 gradient reduction: DeepSpeed -?\d+ us -> ours -?\d+ us"
    assert re.search(loops + reduction + "$", ours["loops"][0]), ours["loops"]
    assert re.search(loops + "$", ours["loops"][1]), ours["loops"]
    assert deepspeeds["loops"] == []


def test_bench_teacher_has_the_recipes_activation_and_the_teacher_setting_compiles_it():
    """Random weights, but the activation the recipe's weights bring (OpenAI's tags: QuickGELU,
    three eager kernels where GELU is one); the `teacher` setting compiles its blocks."""
    assert bench.load_recipe("clip_l")["teacher"]["arch"] == "ViT-L-14-quickgelu"
    assert bench.load_recipe("clip_b")["teacher"]["arch"] == "ViT-B-16-quickgelu"
    assert bench.load_recipe("clip_l")["teacher"]["weights"] is None
    assert bench.load_recipe("tiny")["teacher"]["arch"] == "itpn-demo-tiny-clip"  # random weights already
    cfg, device = bench.load_recipe("tiny"), torch.device("cpu")
    fixed = bench.make_batch(cfg, 2, device)
    torch._dynamo.reset()
    for name, compiled in (("fold", False), ("teacher", True)):
        step = bench.TrainStep(cfg, bench.LADDER[name], 2, device, iter(lambda: fixed, None))
        blocks = step.teacher.tower.transformer.resblocks
        assert all((b._compiled_call_impl is not None) == compiled for b in blocks)
        targets = step.teacher_fwd()
        assert targets.shape == (2, fixed[1].shape[1], step.teacher.embed_dim) and torch.isfinite(targets).all()
    torch._dynamo.reset()


def test_bench_activation_memory_budget_is_set_and_labels_the_compiled_rows(monkeypatch, tmp_path, capsys,
                                                                            memory_budget_restored):
    import torch._functorch.config as functorch_config
    monkeypatch.setitem(bench.LADDER, "fold_aot", {**bench.LADDER["fold"], "compile_options": {"backend": "aot_eager"}})
    out = tmp_path / "b.jsonl"
    assert bench.main(["--recipe", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--ladder", "fused", "fold_aot", "--activation-memory-budget", "0.9", "--json", str(out)]) == 0
    assert functorch_config.activation_memory_budget == 0.9
    assert [json.loads(line)["setting"] for line in out.read_text().splitlines()] == ["fused", "fold_aot+budget0.9"]
    with pytest.raises(SystemExit):
        bench.main(["--recipe", "tiny", "--activation-memory-budget", "1.5"])
    assert "--activation-memory-budget must be a number in [0, 1], got 1.5" in capsys.readouterr().err
