#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md, in parts that each finish within ~10 minutes
# on one H100 (run them in this order when GPU time is short):
#
#   benchmarks/gpu_suite.sh first     for a short lease (one call, ~9 minutes): iTPN-L + CLIP-L/14@196
#                                     naive -> fused -> compiled + folded -> our Triton attention ->
#                                     our fused MLP (kernel profile of the last), the GPU tests, the
#                                     folded step inside DeepSpeed ZeRO-1 with its host-sync count,
#                                     FP8 linears, the attention microbenchmark
#   benchmarks/gpu_suite.sh fifth     the next lease after 2026-12-04's fourth session (~10 minutes): the
#                                     trainer's ZeRO-1 step with its sync count and against DeepSpeed's
#                                     own methods (--deepspeed-loops), the DeepSpeed GPU
#                                     tests, zero0 + bf16_autocast, the ZeRO-1 step's kernel profile (second, third, fourth: what
#                                     that day's leases ran, kept for their commands)
#   benchmarks/gpu_suite.sh teacher   after `fifth` (~6 minutes): the teacher's blocks compiled against eager
#                                     (OpenAI's QuickGELU, folded into SiLU), CLIP-L and CLIP-B
#   benchmarks/gpu_suite.sh check     GPU tests: fast paths vs naive, compiled (+ checkpointed)
#                                     blocks vs eager, no host sync in the step; the attention
#                                     microbenchmark (bias-gradient cost, cuDNN backend)
#   benchmarks/gpu_suite.sh clip_l    the ladder for iTPN-L + CLIP-L/14@196, whole-model compile,
#                                     and the step inside DeepSpeed ZeRO-1 (the trainer's setting);
#                                     kernel-time profiles by category of both compiled steps
#   benchmarks/gpu_suite.sh memory    largest batch without activation checkpointing (compiled)
#   benchmarks/gpu_suite.sh memory_ckpt  ... with checkpointing on every block (compiled)
#   benchmarks/gpu_suite.sh offload24 ZeRO-3 + CPU offload (+ checkpointing) under a 24 GiB cap
#   benchmarks/gpu_suite.sh recompute  the ZeRO-1 step with deepspeed.activation_memory_budget 0.9 against 1.0, and its largest batch
#   benchmarks/gpu_suite.sh loader    the step fed by the real loader (ImageNet-like JPEG shards
#                                     made on the spot), and the loader alone
#   benchmarks/gpu_suite.sh clip_b    the ladder for iTPN-B + CLIP-B/16
#   benchmarks/gpu_suite.sh pixel_l   pixel MIM iTPN-L
#   benchmarks/gpu_suite.sh infer     classifier inference at 224 (iTPN vs ViT)
#   benchmarks/gpu_suite.sh autotune  compiled blocks with max-autotune (long compilation)
#   benchmarks/gpu_suite.sh regions   a compiled region per residual branch against one per block,
#                                     with SDPA and with our kernels
#
# Results are appended as JSON lines to ${OUT:-.}/bench.jsonl; the tables go to stdout.
#
# The GPU machine's image lacks deepspeed, open_clip_torch, webdataset and simplejpeg: make
# .whl/ here with benchmarks/gpu_wheels.sh and carry it; this script installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
PY=${PYTHON:-python3}  # the GPU image's python3 is the one with PyTorch; a plain `python` may not exist
if [ -d .whl ] && [ ! -d /tmp/site/deepspeed ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # benchmarks/*.py import itpn from this checkout
export PYTHONUNBUFFERED=1
bench() { echo "+ itpn-bench $*"; "$PY" -m itpn.cli.bench --json "$OUT/bench.jsonl" "$@"; }
# `limited SECONDS CMD...`: run CMD (a function too) under a time limit; a failure or a timeout is
# reported and the part goes on with its next command.
limited() {
  local s=$1; shift
  if [ "$(type -t "$1")" = function ]; then
    timeout -k 10 "$s" bash -c "$(declare -f bench); PY=$(printf %q "$PY") OUT=$(printf %q "$OUT"); $(printf '%q ' "$@")"
  else
    timeout -k 10 "$s" "$@"
  fi || echo "FAILED or timed out (limit ${s}s, status $?): $*"
}

# `gpu_tests SECONDS [PER_TEST]`: tests/gpu on 8 workers, each test's name and result printed as it ends
# (-v) and each test stopped after PER_TEST s (default 45) (pytest-timeout, in the GPU image), so that a limit
# that cuts the run short still says which tests failed; the full log is $OUT/gpu_tests.txt.
# (The two leases of 2026-12-04 ran them with -q under a limit and learnt only "4 failed".)
gpu_tests() {
  limited "$1" "$PY" -m pytest -v -n 8 --timeout "${2:-45}" -p no:benchmark -rfE --tb=short tests/gpu \
    > "$OUT/gpu_tests.txt" 2>&1
  grep -E "(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|Error" "$OUT/gpu_tests.txt" | tail -60 || true
}

case "${1:?part: first | second | third | fourth | fifth | teacher | check | clip_l | memory | memory_ckpt | offload24 | loader | clip_b | pixel_l | infer | autotune | regions}" in
  first)  # one short lease (one call of <= 10 minutes): the headline numbers first. Each command has
    # its own time limit, so that one that hangs or compiles too long leaves time to the next; the
    # benchmark writes every row to bench.jsonl as it is measured and goes on past a failing setting.
    # <= 10 minutes in all: run(carry=[".whl"], timeout_s=600, command="benchmarks/gpu_suite.sh first 2>&1 | tee $OUT/log.txt").
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
    limited 290 bench --recipe clip_l --batch 128 --steps 10 --ladder naive fused fold triton mlp \
      --profile "$OUT/profile_clip_l_mlp.txt"
    gpu_tests 130
    limited 90 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1 --check-syncs
    limited 70 bench --recipe clip_l --batch 128 --steps 10 --ladder fp8
    limited 35 "$PY" benchmarks/bench_attention.py ;;
  second)  # after the first lease of 2026-12-04 (docs/performance.md): the settings that failed there,
    # fixed since (ZeRO-1 + compiled blocks: misaligned parameters; our attention kernel: padded
    # bias rows), and the GPU tests. ~5.3 minutes: run(carry=[".whl"], timeout_s=320, ...).
    limited 85 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1 --check-syncs
    limited 115 bench --recipe clip_l --batch 128 --steps 10 --ladder triton
    gpu_tests 70
    limited 45 bench --recipe clip_l --batch 128 --steps 10 --ladder mlp ;;
  third)  # the next lease after `second` (~9.5 minutes: run(carry=[".whl"], timeout_s=600, ...)): the
    # GPU tests by name, the trainer's setting (ZeRO-1 + compiled blocks) with time to compile,
    # the fused-MLP row with the compiled step's kernel profile, and iTPN-B + CLIP-B/16
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
    gpu_tests 180 150
    limited 170 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1 --check-syncs
    limited 120 bench --recipe clip_l --batch 128 --steps 10 --ladder mlp --profile "$OUT/profile_clip_l_mlp.txt"
    limited 95 bench --recipe clip_b --batch 256 --steps 10 --ladder fold ;;
  fourth)  # what `third` leaves, if the machine is still warm (~2 minutes)
    limited 110 bench --recipe pixel_l --batch 256 --steps 8 --ladder fold ;;
  fifth)  # after `third` (2026-12-04): the ZeRO-1 step without DeepSpeed's device syncs, with the
    # fp32 bias-table gather, the foreach norm, the kept bf16 views and the flat ZeRO-1 reduction
    # (2026-12-05), against the same step with DeepSpeed's own methods; the GPU tests that failed
    # there; the same step with fp32 weights under autocast without ZeRO; and the ZeRO-1 step's
    # kernel profile, last, cut short if the call's limit comes first (~10 minutes:
    # run(carry=[".whl"], timeout_s=590, ...))
    limited 140 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1 --check-syncs
    limited 110 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1 --deepspeed-loops
    limited 150 "$PY" -m pytest -v -n 4 --timeout 140 -p no:benchmark -rfE --tb=short tests/gpu -k "deepspeed or fp8_gemms"
    limited 120 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero0 --ds-precision bf16_autocast \
      --check-syncs
    limited 120 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1 \
      --profile "$OUT/profile_clip_l_zero1.txt" ;;
  teacher)  # 2026-12-07: CLIPTeacher.compile_blocks (teacher.compile) against the eager teacher, with the
    # QuickGELU activation of the recipes' OpenAI weights, folded into SiLU in both since the third session
    # of that day (run(carry=[".whl"], timeout_s=400, ...))
    limited 190 bench --recipe clip_l --batch 128 --steps 10 --ladder fold teacher
    limited 190 bench --recipe clip_b --batch 256 --steps 10 --ladder fold teacher ;;
  check)
    gpu_tests 540
    "$PY" benchmarks/bench_attention.py ;;
  clip_l)
    bench --recipe clip_l --batch 128 --steps 10 --profile "$OUT/profile_clip_l_compile.txt"
    bench --recipe clip_l --batch 128 --steps 10 --ladder compile_model mlp_model
    bench --recipe clip_l --batch 128 --steps 10 --ladder fused fold --zero zero1 \
      --profile "$OUT/profile_clip_l_compile_zero1.txt" ;;
  memory)  # every probe recompiles (static shapes): start near the known answer (192 fits, 65 GiB;
    # itpn-memory predicts 224 compiled, 208 eager, within 90% of 80 GB)
    bench --recipe clip_l --batch 192 --steps 3 --warmup 1 --ladder fold --max-batch --max-batch-limit 320 ;;
  memory_ckpt)  # eager checkpointing fitted batch 384 in 33.7 GiB (itpn-memory predicts 992 compiled, 944 eager, within 90% of 80 GB)
    bench --recipe clip_l --batch 384 --steps 3 --warmup 1 --ladder fold --ckpt-every 1 --max-batch \
      --max-batch-limit 1536 ;;
  offload24)  # itpn-memory predicts batch 408 with checkpointing (72 without) within 90% of 24 GiB
    bench --recipe clip_l --batch 32 --steps 3 --warmup 1 --ladder bf16 --ckpt-every 1 --zero zero3_offload \
      --memory-gib 24 --max-batch --max-batch-limit 512
    # compiled blocks under ZeRO-3 (one gathering hook per block since 2026-12-07), at batch 32
    bench --recipe clip_l --batch 32 --steps 3 --warmup 1 --ladder fold --ckpt-every 1 --zero zero3_offload \
      --memory-gib 24 ;;
  recompute)  # 2026-12-08: deepspeed.activation_memory_budget 0.9 (LayerNorm and GELU outputs recomputed
    # in the backward): the trainer's ZeRO-1 step with and without it, in one process each (the budget
    # is process-wide). itpn-memory predicts 41.84 -> 28.40 GiB at batch 128, itpn-roofline a 2.9% lower
    # ceiling (866 -> 841 img/s); then the largest batch with it (~10 minutes: run(carry=[".whl"], ...))
    limited 120 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1
    limited 120 bench --recipe clip_l --batch 128 --steps 10 --ladder fold --zero zero1 --activation-memory-budget 0.9
    limited 300 bench --recipe clip_l --batch 320 --steps 3 --warmup 1 --ladder fold --zero zero1 \
      --activation-memory-budget 0.9 --max-batch --max-batch-limit 512 ;;
  loader)
    data=${DATA:-/tmp/itpn_bench_shards}
    if [ ! -f "$data/train/manifest.json" ]; then
      "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_loader import make_images; \
make_images('$data/images', 5120)"
      "$PY" -m data_prep folder "$data/images" "$data/train" --shard-samples 512 --no-progress
    fi
    bench --recipe clip_l --batch 128 --steps 20 --ladder fold --data "$data/train" --workers "${WORKERS:-12}"
    bench --recipe clip_b --batch 256 --steps 20 --ladder fold --data "$data/train" --workers "${WORKERS:-12}" ;;
  clip_b)
    bench --recipe clip_b --batch 256 --steps 10
    bench --recipe clip_b --batch 256 --steps 10 --ladder triton mlp
    bench --recipe clip_b --batch 256 --steps 10 --ladder compile_model ;;
  pixel_l)
    bench --recipe pixel_l --batch 256 --steps 8 --ladder fused compile fold triton mlp compile_model ;;
  infer)
    bench --infer --batch 256 --steps 10 ;;
  autotune)
    bench --recipe clip_l --batch 128 --steps 10 --ladder fold compile_autotune flex_autotune ;;
  regions)
    bench --recipe clip_l --batch 128 --steps 10 --ladder fold branch mlp mlp_branch ;;
  *)
    echo "unknown part $1" >&2; exit 2 ;;
esac
