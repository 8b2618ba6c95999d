#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (deepspeed, open_clip_torch, webdataset, simplejpeg and
# their small dependencies), downloaded here into .whl/ (git-ignored) for Python 3.12 x86-64,
# so that a GPU run can carry them: name .whl in the run's carry; benchmarks/gpu_suite.sh
# installs them into /tmp/site when it finds the folder. The four packages take their pins from
# requirements-dev.txt; their dependencies, the versions pip resolved beside those pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mapfile -t pkgs < <(grep -E '^(deepspeed|open_clip_torch|webdataset|simplejpeg)==' requirements-dev.txt)
[ "${#pkgs[@]}" -eq 4 ] || { echo "requirements-dev.txt: expected == pins of deepspeed, open_clip_torch, webdataset, simplejpeg" >&2; exit 1; }
pkgs+=(hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
       ftfy==6.3.1 wcwidth==0.9.4 braceexpand==0.1.7)
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for pkg in "${pkgs[@]}"; do
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d .whl "$pkg" 2>/dev/null; then
    # pure-Python packages published only as sdists (deepspeed, hjson, braceexpand, ...): build the wheel here
    "$PY" -m pip wheel -q --no-deps -w .whl "$pkg"
  fi
done
ls -l .whl
du -sh .whl
