#!/bin/bash
# The runs still owed after session 4 (see bench/RESULTS.md), packed per call. Usage: bash bench/device_s5.sh A|B|C
#   A (one H100, nothing else on the host: CPU attention is host-memory bound): OPT-30B against FlexGen 0.1.8
#     at equal weight placement (FlexGen's rule is now the default), then --policy auto under a 16 GiB cap
#     against the planner's best at other batch sizes and FlexGen's README policy (issue 5's 10% check).
#   B (two GPUs of one kind, for a same-card scaling figure): OPT-175B 4-bit on one GPU, pipeline 2, and
#     FlexGen's own pipeline mode in the same call.
#   C (one GPU): the planner's nine-policy predicted-vs-measured sweep (~95 s a case on the H200 host).
source bench/device_env.sh >/dev/null
case ${1:-} in
  A)
    T=300 bash bench/device_offload.sh 30b-fs 30b-fg > $OUT/a_30b.log 2>&1
    T=560 TAIL=40 run python3 bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 200 --no-sweep \
        --auto opt-30b --gpu-mem 16GiB --cap-sweep > $OUT/a_cap.log 2>&1 ;;
  B)
    (export CUDA_VISIBLE_DEVICES=0; T=200 bash bench/device_offload.sh 175b-1gpu > $OUT/b_175b_1gpu.log 2>&1)
    T=200 bash bench/device_offload.sh 175b-pp2 175b-pp2-gpu 175b-fg-pp2 > $OUT/b_175b_pp2.log 2>&1 ;;
  C)
    T=580 TAIL=40 run python3 bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 200 \
        --plot $OUT/planner_vs_measured.png > $OUT/c_planner.log 2>&1 ;;
esac
