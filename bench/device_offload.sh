#!/bin/bash
# Issue 4 benchmarks on the GPU machine: flexserve and FlexGen 0.1.8 in the same run, same dummy OPT weights,
# fp16, prompt 512, generation 32. Usage: bash bench/device_offload.sh STAGE...
# (stages: attn, 6.7b, 6.7b-fs, 30b-fs, 30b-bf16, 30b-fg, 30b-fg48, 30b-auto, 30b-prof, llama, 70b-cpu, 70b-cpu4, tp2-70b,
#  175b-1gpu, 175b-pp2, 175b-fg-pp2, 175b-pp2-gpu, 70b-1gpu-tp, 6.7b-paged, sweep, profile)
# Needs the FlexGen wheels in .whl/ and run_flexgen.py in .peers/ (copied from ../shared/peers/).
source bench/device_env.sh
FS="python3 -m flexserve.cli bench throughput --dtype float16 --prompt-len 512 --gen-len 32 --json --h2d-gbps 53.1"
FG="python3 .peers/run_flexgen.py --prompt-len 512 --gen-len 32"
for stage in "$@"; do case $stage in
  attn) run python3 bench/cpu_attention_layouts.py ;;
  6.7b)
    run $FS --model dummy:opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1
    run $FS --model dummy:opt-6.7b --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4
    run $FG --model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1
    run $FG --model facebook/opt-6.7b --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4 ;;
  6.7b-fs)
    run $FS --model dummy:opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1
    run $FS --model dummy:opt-6.7b --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4 ;;
  30b-prof) TAIL=60 run $FS --model dummy:opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute --gen-len 6 --profile $OUT/trace30.json ;;
  30b-fs) run $FS --model dummy:opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute ;;
  30b-bf16) run $FS --model dummy:opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute --cpu-attention-dtype bfloat16 ;;
  30b-fg) run $FG --model facebook/opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute ;;
  30b-fg48) run $FG --model facebook/opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu-cache-compute ;;
  30b-auto) TAIL=8 run python3 bench/planner_validation.py --hardware h100 --gen-len 32 --no-sweep --auto opt-30b --gpu-mem 16GiB ;;
  70b-cpu) run $FS --model dummy:llama-3-70b --dtype bfloat16 --percent 0 100 100 0 100 0 --gpu-batch-size 16 --num-gpu-batches 2 --gen-len 8 ;;
  70b-cpu4) run $FS --model dummy:llama-3-70b --dtype bfloat16 --percent 0 100 100 0 100 0 --gpu-batch-size 16 --num-gpu-batches 2 --gen-len 8 --compress-weight ;;
  tp2-70b) run torchrun --nproc-per-node 2 bench/parallel_throughput.py --model dummy:llama-3-70b --dtype bfloat16 -tp 2 --batch 16 --prompt-len 512 --gen-len 32 ;;
  175b-1gpu) run python3 bench/parallel_throughput.py --model dummy:opt-175b --dtype float16 --batch 8 --prompt-len 512 --gen-len 8 --percent 40 60 100 0 100 0 --compress-weight ;;
  175b-pp2) run torchrun --nproc-per-node 2 bench/parallel_throughput.py --model dummy:opt-175b --dtype float16 -pp 2 --batch 8 --prompt-len 512 --gen-len 8 --percent 80 20 100 0 100 0 --compress-weight ;;
  175b-fg-pp2)  # FlexGen 0.1.8's own pipeline mode, same model and placement flags (its block: 4 x 1 x 2 ranks = 8)
    run torchrun --nproc-per-node 2 bench/peer_flexgen_dist.py --model facebook/opt-175b --percent 80 20 100 0 100 0 \
      --compress-weight --gpu-batch-size 4 --num-gpu-batches 1 --prompt-len 512 --gen-len 8 ;;
  175b-pp2-gpu) run torchrun --nproc-per-node 2 bench/parallel_throughput.py --model dummy:opt-175b --dtype float16 -pp 2 --batch 8 --prompt-len 512 --gen-len 8 --percent 100 0 100 0 100 0 --compress-weight ;;
  70b-1gpu-tp) run python3 bench/parallel_throughput.py --model dummy:llama-3-70b --dtype bfloat16 --batch 16 --prompt-len 512 --gen-len 8 --percent 0 100 100 0 100 0 ;;
  6.7b-paged)  # the all-GPU case on the serving engine (paged kernel, CUDA graphs) against FlexGen, same call
    run $FS --engine paged --model dummy:opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1
    run $FS --model dummy:opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1
    run $FG --model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1 ;;
  llama)
    run $FS --model dummy:llama-3-8b --dtype bfloat16 --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 4
    run $FS --model dummy:llama-3-70b --dtype bfloat16 --percent 0 100 100 0 100 0 --gpu-batch-size 16 --num-gpu-batches 2 --compress-weight ;;
  sweep)  # extra policies for the planner's predicted-vs-measured check (gen 8 keeps them short)
    run $FS --model dummy:opt-6.7b --percent 50 50 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --gen-len 8
    run $FS --model dummy:opt-6.7b --percent 0 100 0 100 100 0 --gpu-batch-size 16 --num-gpu-batches 2 --gen-len 8
    run $FS --model dummy:opt-6.7b --percent 0 100 0 100 100 0 --gpu-batch-size 16 --num-gpu-batches 2 --gen-len 8 --cpu-cache-compute
    run $FS --model dummy:opt-13b --percent 30 70 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --gen-len 8 ;;
  profile) TAIL=40 run $FS --model dummy:opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1 --gen-len 8 --profile $OUT/trace.json ;;
esac; done
