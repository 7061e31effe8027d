#!/bin/bash
# Session 6's device calls (each under the 600 s per-call limit). Usage: bash bench/device_s6.sh A1|A2|A3|C|D|E|F|G
#   A1 (one H100 alone: CPU attention is host-memory bound): OPT-30B against FlexGen 0.1.8 at equal weight
#      placement (FlexGen's rule, now the default), then --policy auto under a 16 GiB cap (gen 8).
#   A2, A3: the rest of the measured sweep under the cap that the auto choice must come within 10% of.
#   C: the planner's nine-policy predicted-vs-measured sweep.
#   E: issue 7's heavy-tailed trace at ~85% load: FCFS, skip-join MLFQ, SRPT, and skip-join with the tail guard.
#   F: OPT-30B with FlexGen's policy but activations on the GPU, and at GPU batch 32: what serialises the step.
#   G: after the decode-activation fix and the refit: OPT-30B against FlexGen in one call, and the new auto.
#   D: after the planner's memory fixes, the new auto choice under the cap, and the sweep's two Llama cases.
source bench/device_env.sh >/dev/null
CAP="python3 bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 200 --no-sweep --auto opt-30b --gpu-mem 16GiB --cap-sweep"
case ${1:-} in
  A1) T=260 bash bench/device_offload.sh 30b-fs 30b-fg > $OUT/a1_30b.log 2>&1
      T=220 TAIL=30 run $CAP --cap-pick 0 > $OUT/a1_cap0.log 2>&1 ;;
  A2) T=590 TAIL=30 run $CAP --cap-pick 1,2,3 > $OUT/a2_cap123.log 2>&1 ;;
  A3) T=590 TAIL=30 run $CAP --cap-pick 4,5 > $OUT/a3_cap45.log 2>&1 ;;
  D)  T=250 TAIL=30 run $CAP --cap-pick 0 > $OUT/d_auto.log 2>&1  # the auto choice after the memory fixes
      T=300 TAIL=30 run python3 bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 150 \
        --sweep-pick 7,8 > $OUT/d_llama.log 2>&1 ;;
  E)  # issue 7 below saturation (~85% of the 8-seat engine's capacity): FCFS, skip-join MLFQ and the clairvoyant
      # SRPT reference, then skip-join MLFQ with the tail guard, same trace
      H="python3 -m flexserve.cli bench serve --json --launch --model dummy:llama-3-8b --dtype bfloat16 --trace gamma --cv 3 --rate 8 --num-requests 600 --prompt-len 256 --output-dist pareto --output-len 16 --max-num-seqs 8 --num-levels 8"
      T=330 TAIL=8 run $H --schedulers fcfs,skip-join-mlfq,srpt --plot $OUT/sched_heavy_r8.png > $OUT/e_heavy_r8.log 2>&1
      T=200 TAIL=8 run $H --schedulers skip-join-mlfq --tail-guard-s 4 --tail-guard-seats 4 > $OUT/e_heavy_r8_guard.log 2>&1 ;;
  F)  # which part of FlexGen's OPT-30B policy serialises CPU attention with the weight stream: activations on the
      # GPU instead of the CPU (same block), then the CPU-activation policy at GPU batch 32
      F="python3 -m flexserve.cli bench throughput --dtype float16 --prompt-len 512 --gen-len 32 --json --h2d-gbps 53.1 --model dummy:opt-30b --cpu-cache-compute"
      T=200 TAIL=12 run $F --percent 20 80 0 100 100 0 --gpu-batch-size 16 --num-gpu-batches 3 > $OUT/f_act_gpu.log 2>&1
      T=200 TAIL=12 run $F --percent 20 80 0 100 0 100 --gpu-batch-size 32 --num-gpu-batches 3 > $OUT/f_act_cpu_b32.log 2>&1 ;;
  G)  # after the decode-activation fix and the refit: both engines in one call, then the new auto choice
      T=250 bash bench/device_offload.sh 30b-fs 30b-fg > $OUT/g_30b_same_call.log 2>&1
      T=200 TAIL=30 run $CAP --cap-pick 0 > $OUT/g_auto.log 2>&1 ;;
  C)  T=590 TAIL=40 run python3 bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 200 \
        --plot $OUT/planner_vs_measured.png > $OUT/c_planner.log 2>&1 ;;
esac
