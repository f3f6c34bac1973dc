#!/usr/bin/env bash
# The GPU measurements of the open issues, as one script for a machine with one CUDA GPU whose python3 has
# torch, lightning, transformers and torchmetrics but not deepspeed (the `device` machine of our workplace).
#
#   bash benchmarks/gpu/run.sh [PART ...]      # parts: throughput strategies pruning rollouts maxmodel seqgan
#
# DeepSpeed (for `strategies` and `maxmodel`) installs from wheels carried in .whl/ beside the repository
# root: the deepspeed sdist and the wheels of hjson, pydantic, pydantic_core, annotated_types,
# typing_inspection (Python 3.12, manylinux x86_64), and ninja (DeepSpeed's CPU Adam is JIT-built for
# ZeRO-Offload). Every part writes JSON/PNG under benchmarks/results/ and, when $OUT is set, copies its
# log and results there. Budget (one H100/H200): throughput ~4 min, strategies ~4 min, pruning ~1 min
# (speed part only), rollouts ~1 min, maxmodel ~10+ min, seqgan (the paper run) the rest.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/lit_bigmodel_gpu}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(throughput strategies pruning rollouts)

install_deepspeed() {
    python3 -c "import deepspeed" 2>/dev/null && return 0
    local site=/tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || return 1
    (cd /tmp && tar xzf "$OLDPWD"/.whl/deepspeed-*.tar.gz && cd deepspeed-*/ &&
        DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .) || return 1
    export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"
}

for part in "${parts[@]}"; do
    t0=$SECONDS
    case "$part" in
    throughput)
        python3 benchmarks/throughput.py --model gpt2 --loss-curves
        python3 benchmarks/throughput.py --model llama1b --curve-steps 0 ;;
    strategies)
        install_deepspeed || echo "deepspeed could not be installed: only ddp, fsdp, fsdp2"
        for s in ddp fsdp fsdp2 deepspeed_stage_2 deepspeed_stage_3; do
            python3 benchmarks/throughput.py --model gpt2 --strategy "$s" --steps 20
        done ;;
    pruning) python3 benchmarks/pruning.py --skip-accuracy ;;
    rollouts) python3 benchmarks/seqgan_rollouts.py --device cuda ;;
    maxmodel) install_deepspeed && python3 benchmarks/max_model.py ;;
    seqgan) python3 benchmarks/seqgan_oracle.py --oracle ../shared/data/seqgan_oracle_lstm.npz ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
    esac 2>&1 | tee "$OUT/$part.log"
    echo "== $part: $((SECONDS - t0)) s"
done
cp benchmarks/results/*cuda*.json benchmarks/results/*cuda*.png "$OUT"/ 2>/dev/null || true
