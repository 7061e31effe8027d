#!/bin/bash
# Session 7's device calls (a 2-GPU machine; each call under the 600 s limit). Usage: bash bench/device_s7.sh M1|M2
#   Issue 7 in FastServe's regime: 64 seats but a KV pool of only 192 blocks (3,072 tokens), so KV memory, not
#   seats, limits the batch. The heavy-tailed trace (Gamma arrivals CV 3, Pareto outputs) at 8 req/s, 3,000
#   requests; one policy per GPU, the two GPUs of a call at the same time, a fresh engine each.
#   M1: FCFS | skip-join MLFQ (default: four levels).   M2: skip-join MLFQ with FastServe's eight levels | SRPT.
#   M3: after the block-major host pool (swaps without host copies): the swap tests on the GPU, then M1 again.
source bench/device_env.sh >/dev/null
H="python3 -m flexserve.cli bench serve --json --launch --model dummy:llama-3-8b --dtype bfloat16 --trace gamma --cv 3
   --rate 8 --num-requests 3000 --prompt-len 256 --output-dist pareto --output-len 16 --max-context 3072
   --max-num-seqs 64 --num-gpu-blocks 192 --num-cpu-blocks 4096"
pair() {  # pair LABEL0 "FLAGS0" LABEL1 "FLAGS1": one run per GPU, at the same time
  CUDA_VISIBLE_DEVICES=0 T=570 TAIL=8 run $H $2 --records $OUT/mem_$1.csv > $OUT/mem_$1.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 T=570 TAIL=8 run $H $4 --records $OUT/mem_$3.csv > $OUT/mem_$3.log 2>&1 &
  wait
}
case ${1:-} in
  M1) pair fcfs "--schedulers fcfs" sj4 "--schedulers skip-join-mlfq" ;;
  M3) T=100 TAIL=6 run python3 -m pytest -q -p no:cacheprovider tests/engine/test_paged_swap.py \
        tests/engine/test_serving.py -k "swap or copy_stream" > $OUT/m3_gpu_tests.log 2>&1
      pair fcfs "--schedulers fcfs" sj4 "--schedulers skip-join-mlfq" ;;
  M2) pair sj8 "--schedulers skip-join-mlfq --num-levels 8" srpt "--schedulers srpt" ;;
esac
