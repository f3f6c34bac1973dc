#!/usr/bin/env bash
# The GPU measurements of the open issues, as one script for a machine with one CUDA GPU whose python3 has
# torch, lightning, transformers and torchmetrics but not deepspeed (the `device` machine of our workplace).
#
#   bash benchmarks/gpu/run.sh [PART ...]      # parts: gputests throughput strategies pruning rollouts dstep maxmodel seqgan peft quant
#
# DeepSpeed (for `strategies` and `maxmodel`) installs from wheels carried in .whl/ in the repository root
# (ignored by git): the deepspeed sdist and the wheels of hjson, pydantic, pydantic_core, annotated_types,
# typing_inspection, psutil, msgpack, einops, py-cpuinfo, ninja (DeepSpeed's CPU Adam is JIT-built for
# ZeRO-Offload) and, if the machine lacks it, accelerate (transformers' ZeRO-3 loading checks for it);
# Python 3.12, manylinux x86_64. `bash benchmarks/gpu/fetch_wheels.sh` downloads them (5.6 MB). The `seqgan` part reads the oracle from $ORACLE (default
# shared/data/seqgan_oracle_lstm.npz inside the checkout: copy ../shared/data there, ignored, and carry it).
# Every part writes JSON/PNG under benchmarks/results/ and copies its log and results to $OUT. Budget (one H100/H200): gputests <1 min (the
# `gpu`-marked tests: CUDA-graph D updates against eager ones, 16-mixed), throughput ~4 min, strategies ~4 min, pruning ~1 min (speed part
# only), rollouts ~1 min, dstep ~1 min (one D update: eager vs CUDA graph), maxmodel ~10+ min, seqgan: a one-minute check of every phase
# (--preset quick), then the paper run (goal <= 10 min; needs a command limit of 10 min to itself); peft ~3 min (the
# `gpu` QLoRA test, then benchmarks/peft.py --llama1b: full bf16 vs LoRA vs QLoRA; bitsandbytes from .whl/); quant ~4 min
# (benchmarks/quantization.py --gpu: int8 weight-only decode vs bf16, fp8 vs bf16 training; torchao from .whl/).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/lit_bigmodel_gpu}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(gputests throughput strategies pruning rollouts dstep)
for part in "${parts[@]}"; do
    case "$part" in gputests | throughput | strategies | pruning | rollouts | dstep | maxmodel | seqgan | peft | quant) ;;
    *) echo "unknown part '$part': one of gputests throughput strategies pruning rollouts dstep maxmodel seqgan peft quant" >&2; exit 2 ;;
    esac
done

install_deepspeed() {  # into /tmp/site, once, in this shell (not in a pipeline's subshell)
    python3 -c "import deepspeed" 2>/dev/null && return 0
    local site=/tmp/site root=$PWD
    ls .whl/*.whl .whl/deepspeed-*.tar.gz >/dev/null 2>&1 || { echo "no .whl/ with deepspeed: see the header" >&2; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || return 1
    (cd /tmp && tar xzf "$root"/.whl/deepspeed-*.tar.gz && cd deepspeed-*/ &&
        DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .) || return 1
    export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"
    python3 -c "import deepspeed, accelerate; print('deepspeed', deepspeed.__version__)"
}

install_wheel() {  # install_wheel NAME: .whl/NAME-*.whl into /tmp/site-NAME, once, in this shell
    python3 -c "import $1" 2>/dev/null && return 0
    ls .whl/"$1"-*.whl >/dev/null 2>&1 || { echo "no .whl/$1-*.whl: see the header" >&2; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target "/tmp/site-$1" .whl/"$1"-*.whl || return 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site-$1"
    python3 -c "import $1; print('$1', $1.__version__)"
}

case " ${parts[*]} " in *" quant "*) install_wheel torchao > >(tee "$OUT/install_torchao.log") 2>&1 ;; esac
case " ${parts[*]} " in *" peft "*) install_wheel bitsandbytes > >(tee "$OUT/install_bitsandbytes.log") 2>&1 ;; esac

case " ${parts[*]} " in
*" strategies "* | *" maxmodel "*)
    install_deepspeed > >(tee "$OUT/install.log") 2>&1 ;;  # not a pipeline: its exports stay in this shell
esac

for part in "${parts[@]}"; do
    t0=$SECONDS
    case "$part" in
    gputests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_graphs.py tests/test_precision.py ;;
    throughput)
        python3 benchmarks/throughput.py --model gpt2 --loss-curves
        python3 benchmarks/throughput.py --model llama1b --curve-steps 0 ;;
    strategies)
        python3 -c "import deepspeed" 2>/dev/null || echo "deepspeed is not installed: its two runs will fail"
        for s in ddp fsdp fsdp2 deepspeed_stage_2 deepspeed_stage_3; do
            python3 benchmarks/throughput.py --model gpt2 --strategy "$s" --steps 20
        done ;;
    pruning) python3 benchmarks/pruning.py --skip-accuracy ;;
    rollouts) python3 benchmarks/seqgan_rollouts.py --device cuda ;;
    dstep)
        python3 benchmarks/seqgan_dstep.py --matmul-precision high
        python3 benchmarks/seqgan_dstep.py --matmul-precision highest --out benchmarks/results/seqgan_dstep_cuda_fp32.json ;;
    maxmodel) python3 benchmarks/max_model.py ;;
    peft)
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_qlora.py
        python3 benchmarks/peft.py --llama1b --out benchmarks/results/peft_llama1b_cuda.json ;;
    quant) python3 benchmarks/quantization.py --gpu --out benchmarks/results/quantization_cuda.json ;;
    seqgan)
        oracle=${ORACLE:-shared/data/seqgan_oracle_lstm.npz}
        # D's convolutions as the dstep part measured fastest under a graph, if it ran; else CNNDiscriminator's "auto"
        impl=$(python3 -c "import json; r = json.load(open('benchmarks/results/seqgan_dstep_cuda.json'))['ms_per_update']
print(min(('conv', 'unfold'), key=lambda i: r['graph_' + i]))" 2>/dev/null || echo auto)
        echo "D implementation: $impl"
        python3 benchmarks/seqgan_oracle.py --oracle "$oracle" --preset quick --matmul-precision high --d-impl "$impl" \
            --out "$OUT/seqgan_quick" &&
            python3 benchmarks/seqgan_oracle.py --oracle "$oracle" --matmul-precision high --d-impl "$impl" \
                --out "$OUT/seqgan_oracle" ;;
    esac 2>&1 | tee "$OUT/$part.log"
    echo "== $part: $((SECONDS - t0)) s"
done
cp benchmarks/results/*cuda*.json benchmarks/results/*cuda*.png "$OUT"/ 2>/dev/null || true
