#!/usr/bin/env bash
# Builds Lumen with the `cuda` feature on a machine without a GPU and packs what the GPU machine
# runs into gpu-pack/ (list it in .git/info/exclude; pass it in the device tool's `carry`):
#   gpu-pack/lumen.xz                       the stripped `lumen` binary
#   gpu-pack/worker-tests.xz                the worker's unit tests (the GPU tests among them)
#   gpu-pack/linear-bench.xz                scripts/gpu/linear_bench.cu (our GEMV against cuBLAS
#                                           at 1-64 token rows)
#   gpu-pack/attention-bench.xz             scripts/gpu/attention_bench.cu (the decode attention
#                                           kernel's variants against the memory's read rate)
#   gpu-pack/gemm-bench.xz                  scripts/gpu/gemm_bench.cu (cuBLAS's default algorithm
#                                           against cuBLASLt's candidates at 64-4096 rows)
#   gpu-pack/overlap-bench.xz               scripts/gpu/overlap_bench.cu (a mixed step's decode
#                                           and prompt rows as one pass or side by side)
#   gpu-pack/llama3.1-tokenizer.tar.xz      for the Llama-3.1-8B-shaped benchmark
#   gpu-smol1/smollm2.part1, gpu-smol/smollm2.part2
#                                           SmolLM2-135M's GGUF for the greedy check, split in two
#                                           because one call carries at most 64 MiB (with the
#                                           checkout): three calls, gpu-pack, gpu-smol1, gpu-smol
#
#   bash scripts/gpu/build.sh
#
# Needs the CUDA 13.0 toolchain of ../shared/gpu/cuda-toolchain.sh (CUDA_TOOLCHAIN to point
# elsewhere). Builds into target-cuda/ (CARGO_TARGET_DIR) so CPU builds are not disturbed.
set -euo pipefail
cd "$(dirname "$0")/../.."
toolchain=${CUDA_TOOLCHAIN:-../shared/gpu/cuda-toolchain.sh}
bash "$toolchain" setup >/dev/null
eval "$(bash "$toolchain" env)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}

nice -n 15 cargo build --release --features cuda --bin lumen
tests=$(nice -n 15 cargo test --release --features cuda -p lumen-worker --lib --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')

mkdir -p gpu-pack gpu-smol
nice -n 15 nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o gpu-pack/linear-bench \
    scripts/gpu/linear_bench.cu -L"$CUDA_ROOT/lib64" -lcublas
nice -n 15 nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o gpu-pack/attention-bench \
    scripts/gpu/attention_bench.cu -L"$CUDA_ROOT/lib64"
nice -n 15 nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o gpu-pack/gemm-bench \
    scripts/gpu/gemm_bench.cu -L"$CUDA_ROOT/lib64" -lcublas -lcublasLt
nice -n 15 nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o gpu-pack/overlap-bench \
    scripts/gpu/overlap_bench.cu -L"$CUDA_ROOT/lib64" -L"$CUDA_ROOT/lib64/stubs" -lcublas -lcuda
strip -o gpu-pack/lumen "$CARGO_TARGET_DIR/release/lumen"
strip -o gpu-pack/worker-tests "$tests"
xz -T2 -6 -f gpu-pack/lumen gpu-pack/worker-tests gpu-pack/linear-bench gpu-pack/attention-bench gpu-pack/overlap-bench gpu-pack/gemm-bench
tar -C models -cJf gpu-pack/llama3.1-tokenizer.tar.xz llama3.1-tokenizer
# The binaries (~30 MiB) travel alone; the ~95 MiB GGUF in two parts of ~46 MiB, each call
# under 64 MiB with the checkout.
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p gpu-smol1
rm -f gpu-pack/smollm2.part1 gpu-smol/smollm2.part1
first=${GGUF_FIRST_BYTES:-48000000}
head -c "$first" "$gguf" > gpu-smol1/smollm2.part1
tail -c +"$((first + 1))" "$gguf" > gpu-smol/smollm2.part2
du -ch gpu-pack/* gpu-smol1/* gpu-smol/*
