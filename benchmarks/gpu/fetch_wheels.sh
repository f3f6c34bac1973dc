#!/usr/bin/env bash
# Fill .whl/ (repository root, kept out of git by .git/info/exclude) with what benchmarks/gpu/run.sh installs on a
# GPU machine whose python3 (3.12, x86_64) lacks DeepSpeed: the deepspeed sdist and the wheels it needs there, and
# bitsandbytes (the `peft` part's QLoRA; 43 MB) and torchao (the `quant` part).
#
#   bash benchmarks/gpu/fetch_wheels.sh      # then: run(command="bash benchmarks/gpu/run.sh ...", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
DEEPSPEED=${DEEPSPEED:-deepspeed==0.19.8}
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl "$DEEPSPEED"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
    platforms+=(--platform "$tag")
done
for name in hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions psutil msgpack einops py-cpuinfo ninja; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$name" ||
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$name"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "${BITSANDBYTES:-bitsandbytes==0.50.2}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "${TORCHAO:-torchao==0.18.0}"  # the `quant` part
ls -la .whl
du -sh .whl
