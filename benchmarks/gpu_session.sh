#!/usr/bin/env bash
# One lent-GPU session's measurements for the speed work, as one command that ends within 10 minutes.
#
# Here, once (needs PyPI):   bash benchmarks/gpu_session.sh --fetch      # wheels into .whl/ (git-ignored)
# On the GPU machine:        bash benchmarks/gpu_session.sh              # carry .whl; results in $OUT
#
# In order of what is still unmeasured (the first H200 session, 2026-11-30, measured sd15-anime once, the
# eager profile and the CUDA checks), each part under its own time limit so the later ones never starve:
#   1. train_profile.py on the factory benchmark's dataset (200 images in 30 buckets, long captions) at the
#      factory's batch of 4, the default (cuDNN's attention kept out of training) beside cuDNN's attention
#      allowed: the factory's steps took 312 ms at batch 4 and its GPU was mostly idle, while one bucket at
#      batch 8 took 205 ms with the GPU busy; this says whether the changing shapes are the cause, and
#      whether cuDNN's attention (it plans every new shape) is: warm-up, step time, the GPU's busy share;
#   2. train_profile.py, four variants side by side (alternated, repeated): as today; without autocast
#      (train.autocast=false: half-precision working copies of float32 masters, no casts: the casts were the
#      profile's most frequent operators and its largest copy time); channels-last convolutions
#      (train.channels_last: no layout conversions); both;
#   3. factory_throughput.py for sd15-anime, two models in turn in one process, as a fleet's resident GPU
#      worker runs them: the first model pays the process's one-time costs, the second shows the steady state;
#   3a. attention_shapes.py: what cuDNN's attention costs on each new shape against flash and
#      memory-efficient attention, over SD1.5's attention calls in the classic buckets (the mechanism behind
#      part 1's answer); then cuDNN alone under TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (torch's opt-in to reuse
#      a plan across sequence lengths): whether that keeps cuDNN's kernels without the per-shape cost;
#   4. factory_throughput.py for sd15-anime with every candidate not yet a default on (no autocast,
#      channels-last training, merged-LoRA and channels-last rendering): against part 3's first model, what
#      they give end to end;
#   5. factory_throughput.py for sd15-anime, three models at once on the GPU (the trainer left the GPU mostly
#      idle; against part 3's first model, decides what `fleet run --jobs-per-gpu` should say);
#   6. render_variants.py: evaluation rendering with the LoRA computed beside the base layers (as today),
#      merged into them, in channels-last layout, and compiled (evaluate.compile, inductor), each variant's
#      first render (the compile) apart (rendering ran at full load, far below the matrix rate);
#   7. attention_shapes.py for SDXL's attention calls;
#   8. factory_throughput.py for sdxl-anime;
#   9. compile_graphs.py: what inductor's compile costs on the factory's buckets with sizes symbolic from the
#      first step (train.compile_dynamic, the default) and without (each size compiled as a constant until it
#      changes): on CPU it compiled 3 graphs against 7 at SD1.5's widths; this times them, each in a fresh process;
#   10. factory_throughput.py for sd15-anime with train.compile and evaluate.compile, two models in turn in one
#      process: the compiles' warm-up (a later model in the process reuses the compiled graphs) against the
#      faster steps and renders, beside part 3;
#   11. train_profile.py with train.compile (regional torch.compile, inductor), and
#   12. gpu_train_check.py: CUDA correctness (bf16/fp16 with and without autocast, resume, diffusers loading,
#      no host sync in a step).
# One session does not reach them all: PARTS="..." picks what an earlier session left. About 570 s a session:
# first PARTS="profile_sd15_factory profile_sd15 factory_sd15_in_turn", then
# PARTS="attention_shapes attention_shapes_cudnn_reuse factory_sd15_candidates render_variants", then
# PARTS="factory_sd15_concurrent attention_shapes_sdxl factory_sdxl", then
# PARTS="compile_graphs factory_sd15_compiled", then the rest.
# GPU load and memory are sampled every second into environment.txt, beside each part's start and end times.
# The session stops when a part crashes within a minute (a broken environment), so that it can be rerun.
# Without --fetch run it from the repository root; it writes to $OUT (default benchmarks/results/gpu-session).
# PARTS="factory_sdxl gpu_train_check" runs only the parts named (e.g. what a first session had no time for).
set -uo pipefail
if [ "${1:-}" = "--fetch" ]; then
    mkdir -p .whl
    grep -q '^/.whl/$' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl -r benchmarks/gpu_wheels.txt
fi
OUT=${OUT:-benchmarks/results/gpu-session}
WORK=${WORK:-/tmp/lorafactory-gpu}
mkdir -p "$OUT" "$WORK"
started=$SECONDS
left() { echo $(( ${BUDGET:-570} - (SECONDS - started) )); }
if [ -z "${TINY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU image's wheels, not this machine's
    rm -rf /tmp/site  # a machine still warm from an earlier call keeps that call's install
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    nvidia-smi
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    python3 -c "from importlib.metadata import version as v
for name in 'diffusers transformers peft accelerate huggingface_hub safetensors onnxruntime numpy dghs-imgutils'.split():
    print(name, v(name))"
} > "$OUT/environment.txt" 2>&1
if [ -z "${TINY:-}" ] && command -v nvidia-smi >/dev/null; then
    echo "gpu load, every second: time, utilisation %, memory used" >> "$OUT/environment.txt"
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 \
        >> "$OUT/environment.txt" 2>&1 &
    sampler=$!
fi

log="$OUT/session.log"  # every part's output, in one file (the machine returns at most 8 files)
part() {  # part NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (and what the budget has left)
    local name=$1 limit=$2; shift 2
    if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then return; fi
    local budget; budget=$(left)
    (( budget < limit )) && limit=$budget
    if (( limit < 30 )); then echo "== skipped $name: no time left" | tee -a "$log"; return; fi
    echo "== $name (limit ${limit}s) at $(date +%T)" | tee -a "$log"
    local begun=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/part.log" 2>&1
    local code=$?
    grep -v -e 'Warning' -e 'warnings.warn' -e 'it/s]' "$OUT/part.log" >> "$log"
    rm -f "$OUT/part.log"
    echo "== $name: exit $code after $((SECONDS - started))s, at $(date +%T)" | tee -a "$log"
    if failed_fast "$code" $((SECONDS - begun)); then
        echo "== stopping: $name failed fast, which means a broken environment; fix it and rerun" | tee -a "$log"
        finish 3
    fi
}
failed_fast() {  # failed_fast CODE SECONDS: a part crashed within a minute
    [ -n "${TINY:-}" ] && return 1
    (( $1 != 0 && $1 != 124 && $1 != 137 && $2 < 60 ))
}
finish() {
    [ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null
    ls -la "$OUT"
    exit "$1"
}

tiny=${TINY:+--tiny}  # TINY=1: the same parts on the tiny models on CPU, to check this script here
few=${TINY:+--images 24 --steps 10 --repeats 1}  # later flags win: a quick pass
part profile_sd15_factory 220 python3 benchmarks/train_profile.py --factory-dataset 200 --batch 4 --warmup 40 \
    --timed 10 --repeats 3 --steps 3 --variant default= --variant cudnn=train.cudnn_attention=true --tag factory \
    --out "$OUT" --work "$WORK" $tiny ${TINY:+--factory-dataset 24 --warmup 3 --timed 2 --repeats 1 --steps 1}
part profile_sd15 150 python3 benchmarks/train_profile.py --batch 8 --warmup 5 --timed 10 --repeats 3 --steps 3 \
    --variant autocast= --variant half=train.autocast=false --variant nhwc=train.channels_last=true \
    --variant half-nhwc=train.autocast=false,train.channels_last=true --out "$OUT" --work "$WORK" $tiny \
    ${TINY:+--timed 2 --repeats 1 --steps 1 --batch 2}
part factory_sd15_in_turn 220 python3 benchmarks/factory_throughput.py --preset sd15-anime --steps 200 \
    --repeats 1 --models-per-process 2 --tag in-turn --out "$OUT" --work "$WORK" $tiny $few
part attention_shapes 80 python3 benchmarks/attention_shapes.py --buckets 3 --repeats 2 --out "$OUT" \
    ${TINY:+--cpu --repeats 1}
part attention_shapes_cudnn_reuse 50 env TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 benchmarks/attention_shapes.py \
    --buckets 3 --repeats 2 --backends cudnn --out "$OUT" ${TINY:+--cpu --repeats 1 --backends flash}
part factory_sd15_candidates 200 python3 benchmarks/factory_throughput.py --preset sd15-anime --steps 200 \
    --repeats 1 --set train.autocast=false --set train.channels_last=true --set evaluate.merge_lora=true \
    --set evaluate.channels_last=true --tag candidates --out "$OUT" --work "$WORK" $tiny $few
part factory_sd15_concurrent 250 python3 benchmarks/factory_throughput.py --preset sd15-anime --steps 200 \
    --repeats 1 --concurrent 3 --tag concurrent --out "$OUT" --work "$WORK" $tiny $few ${TINY:+--concurrent 2}
part render_variants 150 python3 benchmarks/render_variants.py --repeats 3 --out "$OUT" --work "$WORK" $tiny \
    ${TINY:+--repeats 1 --compile-backend aot_eager}
part attention_shapes_sdxl 60 python3 benchmarks/attention_shapes.py --sdxl --buckets 2 --repeats 2 --out "$OUT" \
    ${TINY:+--cpu --repeats 1}
part factory_sdxl 240 python3 benchmarks/factory_throughput.py --preset sdxl-anime --steps 100 --repeats 1 \
    --out "$OUT" --work "$WORK" $tiny $few
part compile_graphs 240 python3 benchmarks/compile_graphs.py --images 200 --steps 30 --repeats 1 --out "$OUT" \
    --work "$WORK" ${TINY:+--tiny --images 24 --steps 6 --backend aot_eager}
part factory_sd15_compiled 400 python3 benchmarks/factory_throughput.py --preset sd15-anime --steps 200 \
    --repeats 1 --models-per-process 2 --set train.compile=true --set evaluate.compile=true --tag compiled \
    --out "$OUT" --work "$WORK" $tiny $few
part profile_sd15_compiled 110 python3 benchmarks/train_profile.py --batch 8 --warmup 5 --steps 5 --out "$OUT" \
    --work "$WORK" --set train.compile=true --tag compiled $tiny
part gpu_train_check 240 python3 benchmarks/gpu_train_check.py "$WORK/check"
finish 0
