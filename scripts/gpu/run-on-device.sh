#!/usr/bin/env bash
# Runs on the GPU machine (through the device tool, from the repository root) what
# scripts/gpu/build.sh packed: the GPU kernel tests, the greedy check against the CPU path on
# SmolLM2, the device-to-device copy bandwidth, decode of a Llama-3.1-8B-shaped model with dummy
# weights at 1, 8 and 32 streams (`bench`), the full server at concurrency 1-256 with its
# start-up time (`serve`), and a checkpoint saved by transformers served against transformers'
# own greedy tokens and log-probabilities (`hf-parity`); prints a table last.
#
#   bash scripts/gpu/run-on-device.sh [tests] [linear] [bench] [parity] [profile] [profile-attention]
#                                     [attention] [decode-attention] [serve] [hf-parity] [ptx]
#                                     [a10g-plan] [structured] [overlap] [gemm] [replicas] [fp8] [spec]
#                                     [tp]
#                                                                        (default: tests bench parity)
#
# carry: gpu-pack (binaries, tokenizer). The GGUF comes in two more calls carrying gpu-smol1
# and gpu-smol (the machine keeps /tmp/lumen-gpu between warm calls):
#   call 1: bash scripts/gpu/run-on-device.sh tests bench serve   carry [gpu-pack]
# `bench` also runs 1 stream with LUMEN_CUDA_PDL=0 (plain launches), 8 with LUMEN_CUDA_PDL=all
# (dependent launches, which the default keeps to single-row steps) and 8 with
# LUMEN_CUDA_GEMV_MAX_ROWS=8 (the GEMV, not cuBLAS, for steps of 3-8 rows) for comparison.
# `linear` times the linear layers alone against cuBLAS. `attention` compares the tensor-core
# attention kernels with the CUDA-core ones (LUMEN_CUDA_ATTENTION=simt) offline at 32 and 256
# streams and for one prompt's first token. `ptx` runs the kernel tests on the JIT-compiled
# compute_80 PTX (LUMEN_CUDA_KERNEL_IMAGE=ptx, the code an A10G runs); `a10g-plan` logs the memory plan
# of the reference deployment's settings with --gpu-memory-limit 22.3GiB.
#   call 2: mkdir -p /tmp/lumen-gpu && cp gpu-smol1/* /tmp/lumen-gpu/   carry [gpu-smol1]
#   call 3: bash scripts/gpu/run-on-device.sh parity           carry [gpu-smol]
# `hf-parity` (scripts/gpu/hf_parity.py) needs only the `lumen` binary and the tokenizer of
# gpu-pack (python3 with torch and transformers is on the machine): transformers builds a
# Llama-3.1-8B-shaped model with random BF16 weights on the GPU, saves it (save_pretrained,
# safetensors: `rope_parameters`), records greedy tokens and top-5 log-probabilities (computed in
# f32 on the saved BF16 weights; its own BF16 run is reported as the noise floor) for prompts
# of 64, 300 and 2000 tokens; the page cache is dropped; `lumen serve` loads the directory (time
# from process start to ready, printed under the copy bandwidth) and must give the same tokens
# where transformers' top-1/top-2 margin exceeds 0.5 nats, >= 4 of the top 5, log-probabilities
# within 0.25 nats. About 5 minutes, 17 GB of disk:
#   bash scripts/gpu/run-on-device.sh hf-parity                carry [gpu-pack]
# Logs and JSON go to /tmp/lumen-gpu/out, packed into $OUT/lumen-gpu-logs.tgz when $OUT is set
# (the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=${*:-tests bench parity}
work=/tmp/lumen-gpu
model=$work/llama-3.1-8b-dummy
out=$work/out
mkdir -p "$work" "$out"
declare -a table=()
row() { table+=("$(printf '%-44s %s' "$1" "$2")"); }

# Unpack what this call carried; keep it in $work for later calls.
[ -f gpu-pack/lumen.xz ] && xz -dc gpu-pack/lumen.xz > "$work/lumen" && chmod +x "$work/lumen"
[ -f gpu-pack/worker-tests.xz ] && xz -dc gpu-pack/worker-tests.xz > "$work/worker-tests" && chmod +x "$work/worker-tests"
[ -f gpu-pack/linear-bench.xz ] && xz -dc gpu-pack/linear-bench.xz > "$work/linear-bench" &&
    chmod +x "$work/linear-bench"
[ -f gpu-pack/attention-bench.xz ] && xz -dc gpu-pack/attention-bench.xz > "$work/attention-bench" &&
    chmod +x "$work/attention-bench"
[ -f gpu-pack/gemm-bench.xz ] && xz -dc gpu-pack/gemm-bench.xz > "$work/gemm-bench" && chmod +x "$work/gemm-bench"
[ -f gpu-pack/overlap-bench.xz ] && xz -dc gpu-pack/overlap-bench.xz > "$work/overlap-bench" &&
    chmod +x "$work/overlap-bench"
[ -f gpu-pack/llama3.1-tokenizer.tar.xz ] && tar -C "$work" -xJf gpu-pack/llama3.1-tokenizer.tar.xz
for part in gpu-smol1/smollm2.part1 gpu-smol/smollm2.part2; do
    [ -f "$part" ] && cp "$part" "$work/"
done
if [ -f "$work/smollm2.part1" ] && [ -f "$work/smollm2.part2" ] && [ ! -f "$work/smollm2.gguf" ]; then
    cat "$work/smollm2.part1" "$work/smollm2.part2" > "$work/smollm2.gguf"
fi
for f in lumen worker-tests; do
    [ -x "$work/$f" ] || { echo "missing $work/$f: carry gpu-pack (scripts/gpu/build.sh)"; exit 2; }
done

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
row "GPU" "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"

# Device-to-device copy bandwidth (bytes read + written), the decode roofline's numerator.
bandwidth=$(python3 - <<'PY' 2>"$out/bandwidth.err"
import torch
n = 4 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); e.synchronize()
    times.append(s.elapsed_time(e))
times.sort()
print(f"{2 * n / (times[len(times) // 2] / 1e3) / 1e9:.0f}")
PY
)
row "device-to-device copy (GB/s, median of 20)" "${bandwidth:-failed}"
bandwidth_row=${#table[@]}

if [[ " $steps " == *" tests "* ]]; then
    "$work/worker-tests" --test-threads=1 kernels::cuda model::llama_cuda::memory sampling:: \
        model::llama_cuda::tests::a_replayed_decode_step 2>&1 | tee "$out/kernel-tests.log"
    row "GPU kernel tests (vs CPU references)" "$(grep -E '^test result' "$out/kernel-tests.log" | tail -1)"
fi

if [[ " $steps " == *" ptx "* ]]; then
    # The kernels as an A10G (sm_86) runs them: the driver JIT-compiles the embedded compute_80
    # PTX instead of loading the sm_90a machine code.
    LUMEN_CUDA_KERNEL_IMAGE=ptx "$work/worker-tests" --test-threads=1 kernels::cuda 2>&1 | tee "$out/ptx-tests.log"
    row "GPU kernel tests, PTX JIT (sm_80 path)" "$(grep -E '^test result' "$out/ptx-tests.log" | tail -1)"
fi

if [[ " $steps " == *" linear "* ]]; then
    # Linear layers alone: our GEMV against cuBLAS and the read rate, 1-64 rows.
    "$work/linear-bench" --json "$out/linear.json" 2>&1 | tee "$out/linear.txt"
    row "linear layers: GEMV faster than cuBLAS at" "$(awk '$NF == "gemv" {print $1 " m=" $(NF-9)}' "$out/linear.txt" | tr '\n' ' ')"
    row "linear layers, m=1: bf16 / fp8 GEMV % of read rate" "$(awk '$(NF-9) == 1 && NF == 12 {print $1 " " $(NF-4) "/" $(NF-3)}' "$out/linear.txt" | tr '\n' ' ')"
fi

if [[ " $steps " == *" parity "* ]]; then
    if [ -f "$work/smollm2.gguf" ]; then
        LUMEN_GPU_TEST_MODEL="$work/smollm2.gguf" "$work/worker-tests" --test-threads=1 --nocapture \
            model::llama_cuda::tests 2>&1 | tee "$out/parity.log"
        row "greedy parity GPU vs CPU (SmolLM2, 8x16)" "$(grep -E '^test result' "$out/parity.log" | tail -1)"
        while read -r line; do row "  agreeing tokens per prompt" "$line"; done < <(grep -E '^  (f32|bf16)' "$out/parity.log")
    else
        row "greedy parity GPU vs CPU" "skipped: SmolLM2 GGUF not assembled (carry gpu-smol1, then gpu-smol)"
    fi
fi

if [[ " $steps " =~ " "(bench|profile|profile-attention|serve|attention|decode-attention|a10g-plan|structured|replicas|gemm|fp8|spec)" " ]]; then
    mkdir -p "$model"
    cp "$work"/llama3.1-tokenizer/tokenizer*.json "$model/"
    cat > "$model/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
 "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
 "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
 "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
 "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"}
JSON
fi

# Offline decode of the 8B shape (512 in / 256 out, 2 x concurrency prompts): tok/s printed.
dec() {  # name, env, concurrency, extra flags...
    env $2 "$work/lumen" bench offline --model "$model" --load-format dummy --device cuda --max-model-len 4096 \
        --input-len 512 --output-len 256 --num-prompts $((2 * $3)) --concurrency $3 --max-num-seqs 256 \
        --max-num-batched-tokens 8192 "${@:4}" --json "$out/$1.json" > "$out/$1.txt" 2> "$out/$1.ansi.log"
    sed 's/\x1b\[[0-9;]*m//g' "$out/$1.ansi.log" > "$out/$1.log" && rm "$out/$1.ansi.log"
    python3 -c "import json; print(round(json.load(open('$out/$1.json'))['output_tokens_per_s']))" 2>/dev/null || echo failed
}

if [[ " $steps " == *" decode-attention "* ]]; then
    # The decode attention kernel's copy schemes (LUMEN_CUDA_DECODE_ATTENTION: block; l2;
    # warp, the default; warp2, two stages; auto, warp2 for large launches; DECODE_VARIANTS
    # picks the offline ones): the kernel alone against the read rate at issue 22's shapes
    # (attention-bench), the attention kernel tests and the graph replay test under each, and
    # offline decode at 32 and 256 streams (512 in / 256 out) with per-operation GPU times.
    # DECODE_OFFLINE_ONLY=1 skips the kernel benchmark and tests.
    if [ -z "${DECODE_OFFLINE_ONLY:-}" ]; then
        "$work/attention-bench" --json "$out/attention-bench.json" 2>&1 | tee "$out/attention-bench.txt"
        row "attention-bench (variants agree)" "$([ "${PIPESTATUS[0]}" = 0 ] && echo yes || echo 'NO: see attention-bench.txt')"
        for v in block l2 warp2 auto; do
            LUMEN_CUDA_DECODE_ATTENTION=$v "$work/worker-tests" --test-threads=1 attention \
                model::llama_cuda::tests::a_replayed_decode_step > "$out/decode-tests-$v.log" 2>&1
            row "attention tests, $v" "$(grep -E '^test result' "$out/decode-tests-$v.log" | tail -1)"
        done
    fi
    for v in ${DECODE_VARIANTS:-warp warp2 auto}; do
        e="LUMEN_CUDA_DECODE_ATTENTION=$v"
        t32=$(dec "decode-$v-c32" "$e" 32)
        t256=$(dec "decode-$v-c256" "$e" 256)
        dec "decode-$v-c256-ops" "$e LUMEN_CUDA_OP_TIMING=1" 256 > /dev/null
        attn=$(grep -h 'decode step timing' "$out/decode-$v-c256-ops.log" | tail -1 | grep -oE 'attention=[0-9.]+')
        row "offline decode attention $v" "c=32 $t32 tok/s, c=256 $t256 tok/s (graphs); c=256 eager ${attn:-?} ms/step"
    done
fi

if [[ " $steps " == *" replicas "* ]]; then
    # One replica per GPU on a multi-GPU machine (issue 16's placement, issue 17's machine):
    # `lumen serve --config` with a deployment of one replica per GPU (`num_gpus: 1`, `device:
    # cuda`); the worker advertises its GPUs and gives each replica its own. Passes when every
    # replica runs on a different cuda:N (from /api/cluster) and requests spread over them.
    gpus=$(nvidia-smi --list-gpus | wc -l)
    cat > "$work/replicas.yaml" <<YAML
applications:
  - name: llm
    route_prefix: /
    deployments:
      - name: llm
        num_replicas: $gpus
        ray_actor_options: {num_gpus: 1}
        model:
          source: $model
          served_model_name: llama-8b
          load_format: dummy
          device: cuda
          max_model_len: 4096
YAML
    "$work/lumen" serve --config "$work/replicas.yaml" --port 8300 --dashboard-port 8301 --grpc-port 0 \
        > "$out/replicas-serve.log" 2>&1 &
    server=$!
    python3 - "$gpus" > "$out/replicas.txt" <<'PY'
import json, sys, time, urllib.request
gpus = int(sys.argv[1])
deadline = time.time() + 300
while True:
    try:
        view = json.load(urllib.request.urlopen("http://127.0.0.1:8301/api/cluster", timeout=5))
        reps = [r for w in view["workers"] for r in w["replicas"] if r["state"] == "RUNNING"]
        if len(reps) == gpus:
            break
    except Exception:
        pass
    if time.time() > deadline:
        print(f"FAILED: {gpus} replicas never ran"); sys.exit(1)
    time.sleep(2)
devices = sorted((r.get("description") or "?").split(" ")[0] for r in reps)
body = json.dumps({"model": "llama-8b", "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
for _ in range(4 * gpus):
    req = urllib.request.Request("http://127.0.0.1:8300/v1/completions", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()
view = json.load(urllib.request.urlopen("http://127.0.0.1:8301/api/cluster", timeout=5))
ok = len(set(devices)) == gpus
print(f"{'ok' if ok else 'FAILED'}: {gpus} replicas on {', '.join(devices)}; {4 * gpus} completions served")
PY
    row "one replica per GPU" "$(tail -1 "$out/replicas.txt")"
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
fi

if [[ " $steps " == *" gemm "* ]]; then
    # The linear layers at 64-4096 rows: cuBLAS's default algorithm (the engine's call) against
    # every candidate cuBLASLt's heuristic offers, and the limit (weights / read rate, FLOPs /
    # the best rate at 4096 rows).
    # Then the engine through each library (LUMEN_CUDA_GEMM: cublas, the default; lt, cuBLASLt's
    # heuristic; lt-tuned, the fastest candidate per shape): the GEMM tests, offline decode at
    # 32, 128 and 256 streams. GEMM_LIBRARIES picks the libraries, GEMM_BENCH=0 skips the bench.
    if [ "${GEMM_BENCH:-1}" != 0 ]; then
        "$work/gemm-bench" --json "$out/gemm.json" 2>&1 | tee "$out/gemm.txt"
        while read -r line; do row "gemm: one step's linear layers" "$line"; done < <(sed -n '/^  rows/,$p' "$out/gemm.txt" | tail -n +2)
    fi
    "$work/worker-tests" --test-threads=1 own_gemm linear > "$out/gemm-tests.log" 2>&1
    row "gemm tests (cublas, lt, lt-tuned)" "$(grep -E '^test result' "$out/gemm-tests.log" | tail -1)"
    for lib in ${GEMM_LIBRARIES:-cublas lt lt-tuned}; do
        e="LUMEN_CUDA_GEMM=$lib"
        row "offline decode, gemm $lib" "c=32 $(dec "gemm-$lib-c32" "$e" 32), c=128 $(dec "gemm-$lib-c128" "$e" 128), c=256 $(dec "gemm-$lib-c256" "$e" 256) tok/s"
    done
fi

if [[ " $steps " == *" fp8 "* ]]; then
    # FP8 weights (issue 15): the FP8 kernel tests, then offline decode of the 8B shape with
    # `--quantization fp8` (linear layers quantized per channel as the dummy weights load)
    # against bf16 in the same run, at 1, 32, 128 and 256 streams; FP8_CONCURRENCY picks them.
    "$work/worker-tests" --test-threads=1 kernels::cuda::fp8 > "$out/fp8-tests.log" 2>&1
    row "fp8 kernel tests" "$(grep -E '^test result' "$out/fp8-tests.log" | tail -1)"
    for c in ${FP8_CONCURRENCY:-1 32 128 256}; do
        row "offline decode c=$c, bf16 / fp8 tok/s" "$(dec "fp8-bf16-c$c" "" "$c") / $(dec "fp8-c$c" "" "$c" --quantization fp8)"
    done
    grep -h "engine ready\|weights" "$out/fp8-c1.log" 2>/dev/null | head -3 > "$out/fp8-load.txt"
    # Where an FP8 step's time goes (eager, an event after every operation), against bf16, and
    # whether cuBLASLt put both scale vectors in its epilogue (FP8_OPS_CONCURRENCY, default 256).
    for c in ${FP8_OPS_CONCURRENCY:-256}; do
        for q in bf16 fp8; do
            flags=(); [ "$q" = fp8 ] && flags=(--quantization fp8)
            dec "fp8-ops-$q-c$c" "LUMEN_CUDA_OP_TIMING=1" "$c" "${flags[@]}" > /dev/null
            row "c=$c eager $q ms/step" "$(grep -h 'decode step timing' "$out/fp8-ops-$q-c$c.log" | tail -1 | sed "s/.*single-token batches)//" | cut -c1-400)"
        done
        row "c=$c cuBLASLt fp8 epilogue scales" "$(grep -ho 'scales_in_epilogue=[a-z]*' "$out/fp8-ops-fp8-c$c.log" | sort | uniq -c | tr '\n' ' ')"
    done
fi

if [[ " $steps " == *" spec "* ]]; then
    # Speculative decoding (issue 18): the ngram proposer against plain decoding in one run
    # (scripts/bench-speculative.sh: the edit and chat datasets, SPEC_CONCURRENCY streams) on the
    # 8B shape with dummy weights (`8b`; the acceptance is whatever random weights give, so read
    # it beside the speed) and on SmolLM2 (`smol`: real text; needs the parity carries), and
    # SmolLM2 drafting for itself (`smol-draft`, the draft model's path on the GPU: every draft
    # should hold; a draft as large as its target cannot be faster, so read the acceptance and
    # the controller turning it down).
    for m in ${SPEC_MODELS:-8b smol smol-draft}; do
        spec=""
        case $m in
            8b) mdl=$model; extra="--device cuda --load-format dummy --max-model-len 4096" ;;
            smol) [ -f "$work/smollm2.gguf" ] || continue; mdl=$work/smollm2.gguf; extra="--device cuda" ;;
            smol-draft)
                [ -f "$work/smollm2.gguf" ] || continue
                mdl=$work/smollm2.gguf; extra="--device cuda"
                spec="{\"model\": \"$mdl\", \"num_speculative_tokens\": 4}" ;;
            *) continue ;;
        esac
        SPEC=${spec:-${SPEC:-}} MODEL=$mdl LUMEN_BIN=$work/lumen EXTRA="$extra" CONCURRENCY="${SPEC_CONCURRENCY:-1 8 32}" \
            OUT="$out/spec-$m" bash scripts/bench-speculative.sh > "$out/spec-$m.txt" 2>&1
        while read -r line; do row "spec $m (plain / speculative tok/s)" "$line"; done < <(grep -E '^\| (edit|chat)' "$out/spec-$m.txt")
    done
fi

if [[ " $steps " == *" tp "* ]]; then
    # Tensor parallelism on GPUs (issues 16 and 17): NCCL's collectives as the ranks call them
    # (tp/nccl_tests.rs: sums and gathers over every GPU of the machine, in bf16 and f32, an
    # all-reduce captured into a graph and replayed, an aborted communicator refused) and the
    # ranks' collectives on model tensors (tp/gpu_comm_tests.rs: over NCCL, and staged through
    # the host for ranks sharing one GPU, an abort releasing a waiting rank). The
    # library: LUMEN_NCCL_LIBRARY when set, else the one PyTorch ships on the machine.
    nccl=${LUMEN_NCCL_LIBRARY:-$(python3 -c 'import glob, os, nvidia.nccl as n; print(glob.glob(os.path.join(list(n.__path__)[0], "lib", "libnccl.so*"))[0])' 2>/dev/null)}
    [ -n "$nccl" ] || nccl=$(find / -xdev -name 'libnccl.so*' 2>/dev/null | head -1)
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
    LUMEN_NCCL_LIBRARY=$nccl "$work/worker-tests" --test-threads=1 tp::nccl tp::gpu_comm > "$out/tp-tests.log" 2>&1
    row "NCCL collectives, $gpus GPU(s)" "$(grep -E '^test result' "$out/tp-tests.log" | tail -1) (${nccl:-no libnccl found})"
    # The split model (tp/cuda_tests.rs): on a generated model, three ranks sharing GPU 0
    # against the whole model, one NCCL rank with graphs bit for bit, a bad batch; and on
    # SmolLM2's GGUF (from the parity carries) three ranks against the whole model.
    LUMEN_NCCL_LIBRARY=$nccl "$work/worker-tests" --test-threads=1 tp::cuda::tests::generated \
        > "$out/tp-model-tests.log" 2>&1
    row "tensor-parallel model vs one GPU (generated)" "$(grep -E '^test result' "$out/tp-model-tests.log" | tail -1)"
    if [ -f "$work/smollm2.gguf" ]; then
        LUMEN_GPU_TEST_MODEL="$work/smollm2.gguf" "$work/worker-tests" --test-threads=1 tp::cuda::tests::smollm2 \
            > "$out/tp-smollm2-tests.log" 2>&1
        row "tensor-parallel model vs one GPU (SmolLM2)" "$(grep -E '^test result' "$out/tp-smollm2-tests.log" | tail -1)"
    fi
fi

if [[ " $steps " == *" overlap "* ]]; then
    # A mixed step's prompt rows and decode rows as one pass (the engine) or as two passes side
    # by side (two streams, priorities, green contexts): issue 22's item 6, whether it pays.
    "$work/overlap-bench" --json "$out/overlap.json" 2>&1 | tee "$out/overlap.txt"
    while read -r line; do row "overlap" "$line"; done < <(grep -E '^P ' "$out/overlap.txt" | grep 'best')
fi

if [[ " $steps " == *" profile "* ]]; then
    # Nsight Compute on steady-state decode steps (single stream, 8B shape): each kernel's time.
    ncu --clock-control none --csv --metrics gpu__time_duration.sum --launch-skip 4000 --launch-count 400 \
        "$work/lumen" bench offline --model "$model" --load-format dummy --device cuda --max-model-len 4096 \
        --input-len 128 --output-len 200 --num-prompts 1 > "$out/ncu.csv" 2> "$out/ncu.log"
    python3 - "$out/ncu.csv" > "$out/ncu-summary.txt" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; name_i = head.index("Kernel Name"); val_i = head.index("Metric Value")
times = collections.defaultdict(list)
for r in rows[1:]:
    times[r[name_i].split("(")[0][:60]].append(float(r[val_i].replace(",", "")) / 1000)
for k, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
    print(f"  {k:60s} n={len(v):4d} mean {sum(v)/len(v):8.2f} us  total {sum(v):9.1f} us")
PY
    cat "$out/ncu-summary.txt"
    while read -r line; do table+=("$line"); done < "$out/ncu-summary.txt"
fi

if [[ " $steps " == *" profile-attention "* ]]; then
    # Nsight Compute on the decode attention kernel of 32 streams (512-token prompts): time, DRAM
    # and SM throughput and achieved occupancy of a few steady launches.
    ncu --clock-control none --csv --kernel-name regex:paged_attention_bf16 --launch-skip 960 --launch-count 4 \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,lts__t_sector_hit_rate.pct \
        "$work/lumen" bench offline --model "$model" --load-format dummy --device cuda --max-model-len 4096 \
        --input-len 512 --output-len 64 --num-prompts 32 --concurrency 32 > "$out/ncu-attention.csv" 2> "$out/ncu-attention.log"
    python3 - "$out/ncu-attention.csv" > "$out/ncu-attention.txt" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; n, m, v = head.index("ID"), head.index("Metric Name"), head.index("Metric Value")
per = {}
for r in rows[1:]:
    per.setdefault(r[n], []).append(f"{r[m].split('.')[0].replace('__', ':')}={r[v]}")
for k, vals in per.items():
    print(f"  attention launch {k}: " + " ".join(vals))
PY
    while read -r line; do table+=("$line"); done < "$out/ncu-attention.txt"
fi

if [[ " $steps " == *" bench "* ]]; then
    bench() {  # name, then lumen bench offline arguments
        local name=$1; shift
        local started=$(date +%s.%N)
        "$work/lumen" bench offline --model "$model" --load-format dummy --device cuda --max-model-len 4096 \
            --json "$out/$name.json" "$@" >"$out/$name.txt" 2>"$out/$name.ansi.log"
        local rc=$?
        sed 's/\x1b\[[0-9;]*m//g' "$out/$name.ansi.log" > "$out/$name.log" && rm "$out/$name.ansi.log"
        echo "== $name (exit $rc, $(python3 -c "import time; print(f'{time.time() - $started:.1f}')") s)"; cat "$out/$name.txt"
        grep -E 'GPU memory plan|loaded model on the GPU|decode step timing|rror' "$out/$name.log" | cut -c1-400
        return $rc
    }
    # The first run also JIT-compiles candle's PTX (cached in ~/.nv/ComputeCache afterwards).
    bench decode-c1-cold --input-len 128 --output-len 64 --num-prompts 1 --concurrency 1
    bench decode-c1 --input-len 128 --output-len 512 --num-prompts 3 --concurrency 1
    LUMEN_CUDA_OP_TIMING=1 bench decode-c1-ops --input-len 128 --output-len 300 --num-prompts 1 --concurrency 1
    LUMEN_CUDA_PDL=0 bench decode-c1-no-pdl --input-len 128 --output-len 512 --num-prompts 3 --concurrency 1
    bench decode-c8 --input-len 512 --output-len 256 --num-prompts 16 --concurrency 8
    LUMEN_CUDA_PDL=all bench decode-c8-pdl --input-len 512 --output-len 256 --num-prompts 16 --concurrency 8
    LUMEN_CUDA_GEMV_MAX_ROWS=8 bench decode-c8-gemv8 --input-len 512 --output-len 256 --num-prompts 16 --concurrency 8
    bench decode-c16 --input-len 512 --output-len 256 --num-prompts 32 --concurrency 16
    bench decode-c32 --input-len 512 --output-len 256 --num-prompts 64 --concurrency 32
    LUMEN_CUDA_OP_TIMING=1 bench decode-c32-ops --input-len 512 --output-len 256 --num-prompts 32 --concurrency 32
    python3 - "$out" "${bandwidth:-0}" > "$out/bench-summary.txt" <<'PY'
import json, sys, os
out, bw = sys.argv[1], float(sys.argv[2]) * 1e9
# Llama-3.1-8B in BF16: all weights, and what one decode step reads (all but the embeddings).
total = 2 * (2 * 128256 * 4096 + 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336) + 33 * 4096)
streamed = total - 2 * 128256 * 4096
for name in ["decode-c1-cold", "decode-c1", "decode-c1-ops", "decode-c1-no-pdl", "decode-c8", "decode-c8-pdl",
             "decode-c8-gemv8", "decode-c16", "decode-c32"]:
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p):
        print(f"{name:44s} failed"); continue
    r = json.load(open(p))
    line = f"out {r['output_tokens_per_s']:.0f} tok/s, per stream {r['decode_tokens_per_s_per_stream']:.1f} tok/s, TTFT p50 {r['ttft_ms']['p50']:.0f} ms"
    if r["concurrency"] == 1 and bw:
        s = r["decode_tokens_per_s_per_stream"]
        line += f", roofline {bw / total:.0f} (all weights) / {bw / streamed:.0f} (streamed): {100 * s * total / bw:.0f}% / {100 * s * streamed / bw:.0f}%"
    print(f"{name:44s} {line}")
PY
    while read -r line; do table+=("$line"); done < "$out/bench-summary.txt"
    startup=$(grep -h 'loaded model on the GPU' "$out/decode-c1.log" | grep -oE 'total_s=[0-9.]+' | head -1)
    row "start-up (warm JIT cache), 8B dummy" "${startup:-?}"
    timing=$(grep -h 'decode step timing' "$out/decode-c1.log" | tail -1 | grep -oE '(wall|host|gpu)_ms=[0-9.]+' | tr '\n' ' ')
    row "decode step, c=1 (mean)" "${timing:-?}"
    ops=$(grep -h 'decode step timing' "$out/decode-c1-ops.log" | tail -1 | grep -oE 'ops_ms=.*$')
    row "decode step GPU ms by op (events), c=1" "${ops:-?}"
    for name in decode-c8 decode-c8-pdl decode-c8-gemv8 decode-c16 decode-c32; do
        timing=$(grep -h 'decode step timing' "$out/$name.log" | tail -1 | grep -oE '(wall|host|gpu)_ms=[0-9.]+' | tr '\n' ' ')
        row "decode step, ${name#decode-} (mean)" "${timing:-?}"
    done
    ops=$(grep -h 'decode step timing' "$out/decode-c32-ops.log" | tail -1 | grep -oE 'ops_ms=.*$')
    row "decode step GPU ms by op (events), c=32" "${ops:-?}"
fi

if [[ " $steps " == *" a10g-plan "* ]]; then
    # The reference deployment's memory plan (deploy/kubernetes/overlays/gpu-a10g/serve.yaml) as
    # on its A10G: 22.3 GiB usable x 0.9, the 8B shape, max_model_len 8192, 64 sequences, 8192
    # batched tokens. vLLM's on the A10G: weights 14.99 GiB, activations 0.85 GiB, KV 4.17 GiB.
    "$work/lumen" bench offline --model "$model" --load-format dummy --device cuda --gpu-memory-limit 22.3GiB \
        --gpu-memory-utilization 0.9 --max-model-len 8192 --max-num-seqs 64 --max-num-batched-tokens 8192 \
        --input-len 16 --output-len 4 --num-prompts 1 > "$out/a10g-plan.txt" 2> "$out/a10g-plan.ansi.log"
    sed 's/\x1b\[[0-9;]*m//g' "$out/a10g-plan.ansi.log" > "$out/a10g-plan.log"
    plan=$(grep -h 'GPU memory plan' "$out/a10g-plan.log" | grep -oE 'plan=.*' | head -1)
    row "A10G plan (--gpu-memory-limit 22.3GiB)" "${plan:-failed (see a10g-plan.log)}"
fi

if [[ " $steps " == *" structured "* ]]; then
    # Structured outputs on the 8B shape (dummy weights), offline: 0, 50 and 100% of the
    # requests under the benchmark's JSON schema at 1 and 64 streams (512 in / 256 out); output
    # tok/s and the mask's compute time per token (p50/p99). The masks are applied in the
    # device's row reduction (greedy). STRUCTURED_CONCURRENCY="64" runs one of them.
    for c in ${STRUCTURED_CONCURRENCY:-1 64}; do
        n=$(( c == 1 ? 4 : 128 ))
        for f in 0 0.5 1; do
            name=so-c$c-f$f
            "$work/lumen" bench offline --model "$model" --load-format dummy --device cuda --max-model-len 4096 \
                --input-len 512 --output-len 256 --num-prompts $n --concurrency $c --structured-fraction $f \
                --json "$out/$name.json" > "$out/$name.txt" 2> "$out/$name.ansi.log"
            echo "== $name: exit $?"; tail -3 "$out/$name.txt"
            sed 's/\x1b\[[0-9;]*m//g' "$out/$name.ansi.log" > "$out/$name.log" && rm "$out/$name.ansi.log"
        done
    done
    python3 - "$out" > "$out/structured-summary.txt" <<'PY'
import json, os, sys
out = sys.argv[1]
for c in [int(c) for c in os.environ.get("STRUCTURED_CONCURRENCY", "1 64").split()]:
    base = None
    for f in ("0", "0.5", "1"):
        p = os.path.join(out, f"so-c{c}-f{f}.json")
        if not os.path.exists(p):
            print(f"structured c={c:<3d} {float(f):4.0%} constrained   failed"); continue
        r = json.load(open(p))
        tps = r["output_tokens_per_s"]; base = base or tps
        mask = r.get("mask_ms")
        m = f"mask p50 {mask[0]:.3f} / p99 {mask[1]:.3f} ms" if mask else "no masks"
        print(f"structured c={c:<3d} {float(f):4.0%} constrained   {tps:7.0f} tok/s ({tps / base:.3f}x); {m}")
PY
    while read -r line; do table+=("$line"); done < "$out/structured-summary.txt"
fi

if [[ " $steps " == *" attention "* ]]; then
    # Tensor-core attention (the default for bf16) against the CUDA-core kernels
    # (LUMEN_CUDA_ATTENTION=simt), offline, same binary and machine: decode at 32 and 256 streams
    # (512 in / 256 out, per-operation GPU time by events), and one 512-token prompt's time to
    # first token.
    attn() {  # name, env, then lumen bench offline arguments
        local name=$1 env=$2; shift 2
        env $env "$work/lumen" bench offline --model "$model" --load-format dummy --device cuda --max-model-len 4096 \
            --json "$out/$name.json" "$@" >"$out/$name.txt" 2>"$out/$name.ansi.log"
        echo "== $name ($env): exit $?"; tail -4 "$out/$name.txt"
        sed 's/\x1b\[[0-9;]*m//g' "$out/$name.ansi.log" > "$out/$name.log" && rm "$out/$name.ansi.log"
    }
    # ATTENTION_KINDS=mma skips the CUDA-core runs.
    for kind in ${ATTENTION_KINDS:-mma simt}; do
        e="LUMEN_CUDA_ATTENTION=$kind LUMEN_CUDA_OP_TIMING=1"
        attn "attn-c32-$kind" "$e" --input-len 512 --output-len 256 --num-prompts 64 --concurrency 32
        attn "attn-c256-$kind" "$e" --input-len 512 --output-len 256 --num-prompts 512 --concurrency 256 \
            --max-num-seqs 256 --max-num-batched-tokens 8192
        attn "attn-prefill-$kind" "LUMEN_CUDA_ATTENTION=$kind" --input-len 512 --output-len 1 --num-prompts 16 --concurrency 1
        attn "attn-prefill2k-$kind" "LUMEN_CUDA_ATTENTION=$kind" --input-len 2048 --output-len 1 --num-prompts 8 --concurrency 1
    done
    # The split's target: one wave of the decode kernel (default) against 4 CTAs per multiprocessor.
    e="LUMEN_CUDA_OP_TIMING=1"
    attn attn-c8-mma "$e" --input-len 512 --output-len 256 --num-prompts 16 --concurrency 8
    attn attn-c8-split4 "$e LUMEN_CUDA_SPLIT_CTAS_PER_SM=4" --input-len 512 --output-len 256 --num-prompts 16 --concurrency 8
    attn attn-c32-split4 "$e LUMEN_CUDA_SPLIT_CTAS_PER_SM=4" --input-len 512 --output-len 256 --num-prompts 64 --concurrency 32
    attn attn-prefill2k-ops "$e" --input-len 2048 --output-len 1 --num-prompts 8 --concurrency 1
    # Prefill tiles of 128 rows (two row tiles per warp) against the default 64.
    t="LUMEN_CUDA_PREFILL_TILES=128"
    attn attn-prefill-tall "$t" --input-len 512 --output-len 1 --num-prompts 16 --concurrency 1
    attn attn-prefill2k-tall "$t" --input-len 2048 --output-len 1 --num-prompts 8 --concurrency 1
    attn attn-prefill2k-tall-ops "$t $e" --input-len 2048 --output-len 1 --num-prompts 8 --concurrency 1
    attn attn-c256-auto "LUMEN_CUDA_PREFILL_TILES=auto $e" --input-len 512 --output-len 256 --num-prompts 512 \
        --concurrency 256 --max-num-seqs 256 --max-num-batched-tokens 8192
    python3 - "$out" > "$out/attention-summary.txt" <<'PY'
import json, os, re, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
def step(name, what="decode"):
    p = os.path.join(out, name + ".log")
    lines = [l for l in open(p) if what + " step timing" in l] if os.path.exists(p) else []
    if not lines:
        return f"no {what} timing"
    l = lines[-1]
    g = lambda k: (re.search(r"\b" + k + r"=([0-9.]+)", l) or [None, "nan"])[1]
    ops = (re.search(r"ops_ms=(.*)$", l.strip()) or [None, ""])[1]
    extra = f"; {ops}" if what == "prefill" else ""
    return f"step GPU {float(g('gpu_ms')):.2f} ms, attention {g('attention')} ms, wall {float(g('wall_ms')):.2f}{extra}"
names = [f"attn-{case}-{kind}" for case in ["c32", "c256", "prefill", "prefill2k"] for kind in ["mma", "simt"]]
extra = ["attn-c8-mma", "attn-c8-split4", "attn-c32-split4", "attn-prefill2k-ops", "attn-prefill-tall",
         "attn-prefill2k-tall", "attn-prefill2k-tall-ops", "attn-c256-auto"]
for name in names + extra:
    r = load(name)
    if r is None:
        ran = os.path.exists(os.path.join(out, name + ".txt"))
        print(f"{name:44s} {'failed' if ran else 'not run'}"); continue
    if name.endswith("-ops") and "prefill" in name:
        print(f"{name:44s} {step(name, 'prefill')}")
    elif "prefill" in name:
        print(f"{name:44s} TTFT p50 {r['ttft_ms']['p50']:.1f} ms")
    else:
        print(f"{name:44s} out {r['output_tokens_per_s']:.0f} tok/s; {step(name)}")
PY
    while read -r line; do table+=("$line"); done < "$out/attention-summary.txt"
fi

if [[ " $steps " == *" serve "* ]]; then
    # The full server: `lumen serve` (head + in-process worker) on the 8B shape, driven over HTTP
    # by `lumen bench serve` (512 in / 256 out, ignore_eos, greedy) at each concurrency; first the
    # time from process start to the first served token.
    port=8100
    SERVE_FLAGS=${SERVE_FLAGS:---max-num-seqs 256 --max-num-batched-tokens 8192}
    python3 - "$work/lumen" "$model" "$port" "$out/serve.log" $SERVE_FLAGS > "$out/serve-start.txt" <<'PY' &
import json, subprocess, sys, time, urllib.request
lumen, model, port, log = sys.argv[1:5]
started = time.time()
proc = subprocess.Popen([lumen, "serve", "--model", model, "--served-model-name", "llama-8b", "--load-format", "dummy",
                         "--device", "cuda", "--max-model-len", "4096", "--port", port, "--dashboard-port", "0",
                         "--grpc-port", "0", *sys.argv[5:]], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
for line in proc.stdout:
    if '"event":"ready"' in line.replace(" ", ""):
        break
ready = time.time()
body = json.dumps({"model": "llama-8b", "prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=600).read()
except Exception as e:
    print(f"failed: {e} (exit {proc.poll()}; see serve.log)", flush=True)
    print(proc.pid, flush=True)
    proc.kill()
    sys.exit(1)
first = time.time()
print(f"ready {ready - started:.2f} s, first token {first - started:.2f} s", flush=True)
print(proc.pid, flush=True)
proc.stdout.read()  # keep the pipe drained until the server is stopped
PY
    starter=$!
    for _ in $(seq 240); do [ "$(wc -l < "$out/serve-start.txt")" -ge 2 ] && break; sleep 0.5; done
    row "serve: process start -> ready / first token" "$(head -1 "$out/serve-start.txt")"
    server=$(sed -n 2p "$out/serve-start.txt")
    grep -q '^failed' "$out/serve-start.txt" && tail -20 "$out/serve.log"
    for c in ${SERVE_CONCURRENCY:-1 8 32 128 256}; do
        n=$((c < 8 ? 8 : (c < 128 ? 4 * c : 2 * c)))
        timeout 150 "$work/lumen" bench serve --base-url "http://127.0.0.1:$port" --model llama-8b \
            --input-len 512 --output-len 256 --num-prompts "$n" --concurrency "$c" --json "$out/serve-c$c.json" \
            > "$out/serve-c$c.txt" 2>&1
        echo "== serve c=$c (exit $?)"; tail -25 "$out/serve-c$c.txt"
        line=$(python3 - "$out/serve-c$c.json" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
t, i = r["ttft_ms"], r["itl_ms"]
print(f"{r['output_tokens_per_s']:7.0f} tok/s  TTFT p50/p99 {t['p50']:6.0f}/{t['p99']:6.0f} ms  "
      f"ITL p50/p99 {i['p50']:5.1f}/{i['p99']:6.1f} ms  TPOT {r['tpot_ms']['mean']:5.1f} ms  failed {r['failed']}")
PY
)
        row "serve c=$c ($n x 512/256)" "${line:-failed}"
    done
    timing=$(grep -h 'decode step timing' "$out/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -1 | grep -oE '(wall|host|gpu)_ms=[0-9.]+' | tr '\n' ' ')
    row "serve: last logged decode step" "${timing:-?}"
    phases=$(grep -h 'engine step phases' "$out/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -1 | grep -oE '(rows|gap_ms|schedule_ms|forward_ms|post_ms)=[0-9.]+' | tr '\n' ' ')
    row "serve: last logged engine step phases" "${phases:-?}"
    [ -n "$server" ] && kill "$server" 2>/dev/null
    wait "$starter" 2>/dev/null
fi

if [[ " $steps " == *" hf-parity "* ]]; then
    # transformers saves a random 8B Llama-3.1 checkpoint and records its greedy steps; the page
    # cache is dropped so Lumen's load is from disk; then Lumen serves it and is compared.
    hf=$work/hf-llama-8b
    python3 scripts/gpu/hf_parity.py make --dir "$hf" --tokenizer "$work/llama3.1-tokenizer" \
        --out "$out/hf-parity-transformers.json" 2>&1 | tee "$out/hf-parity-make.log"
    sync
    if (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null; then cache="page cache dropped"; else cache="page cache NOT dropped"; fi
    python3 scripts/gpu/hf_parity.py check --lumen "$work/lumen" --dir "$hf" --port 8200 \
        --reference "$out/hf-parity-transformers.json" --log "$out/hf-parity-serve.log" \
        --rows "$out/hf-parity-rows.txt" 2>&1 | tee "$out/hf-parity-check.log"
    [ -s "$out/hf-parity-rows.txt" ] || printf 'hf-parity\tfailed (see hf-parity-make.log / -check.log)\n' > "$out/hf-parity-rows.txt"
    first=1
    while IFS=$'\t' read -r name value; do
        if [ "$first" = 1 ]; then
            # The load time goes under the copy bandwidth: both are rates of moving the weights.
            table=("${table[@]:0:$bandwidth_row}" "$(printf '%-44s %s' "$name" "$value ($cache)")" "${table[@]:$bandwidth_row}")
            first=0
        else
            row "$name" "$value"
        fi
    done < "$out/hf-parity-rows.txt"
    rm -rf "$hf"
fi

[ -n "${OUT:-}" ] && tar -C "$work" -czf "$OUT/lumen-gpu-logs.tgz" out
echo
echo "==================== summary ===================="
printf '%s\n' "${table[@]}"
