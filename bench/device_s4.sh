#!/bin/bash
# Session 4 (2026-11-25) on the 2-GPU machine: the runs still owed by issues 4, 5, 7 and 8, packed so that the
# host-light jobs share a call. Usage: bash bench/device_s4.sh call1|call2|call3. Logs go to $OUT/*.log.
#   call1: GPU0 OPT-175B on one GPU (4-bit, 40 60), then Llama-3-70B weights on CPU (bf16, or 4-bit if the host
#          lacks 225 GiB free); GPU1 the real serving engine on the Azure trace at 4 and 8 req/s, 3 schedulers.
#   call2: OPT-175B pipeline parallel 2 (offloaded and all-GPU); then GPU0 the planner's predicted-vs-measured
#          sweep, GPU1 the heavy-tailed Gamma serving run.
#   call3: OPT-30B under a 16 GiB GPU cap: --policy auto against the planner's best at other GPU batch sizes and
#          hand policies (FlexGen's README policy), alone on the machine.
source bench/device_env.sh >/dev/null
{ lscpu -e=CPU,CORE,SOCKET,NODE | head -40; free -g; } > $OUT/lscpu.txt
case ${1:-} in
  call1)
    (export CUDA_VISIBLE_DEVICES=0
     T=200 bash bench/device_offload.sh 175b-1gpu > $OUT/c1_175b_1gpu.log 2>&1
     AVAIL_GIB=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo); echo "MemAvailable ${AVAIL_GIB} GiB" >> $OUT/lscpu.txt
     S70=70b-cpu; [ "$AVAIL_GIB" -lt 225 ] && S70=70b-cpu4
     T=300 bash bench/device_offload.sh $S70 > $OUT/c1_70b.log 2>&1) &
    (export CUDA_VISIBLE_DEVICES=1
     RATE=4 N=200 T=290 bash bench/device_serve.sh azure > $OUT/c1_serve_r4.log 2>&1
     RATE=8 N=200 T=240 bash bench/device_serve.sh azure > $OUT/c1_serve_r8.log 2>&1) &
    wait ;;
  call2)
    T=170 bash bench/device_offload.sh 175b-pp2 175b-pp2-gpu > $OUT/c2_175b_pp2.log 2>&1
    (export CUDA_VISIBLE_DEVICES=0
     T=380 TAIL=40 run python3 bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 150 \
        --plot $OUT/planner_vs_measured.png > $OUT/c2_planner.log 2>&1) &
    (export CUDA_VISIBLE_DEVICES=1
     RATE=${HRATE:-12} N=${HN:-600} T=330 bash bench/device_serve.sh heavy > $OUT/c2_heavy.log 2>&1) &
    wait ;;
  call3)  # what the budget allows: the capped sweep split over the two GPUs (two CPU-attention runs at a time)
    P="python3 bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 140 --no-sweep --auto opt-30b \
       --gpu-mem 16GiB --cap-sweep"
    (export CUDA_VISIBLE_DEVICES=0; T=290 TAIL=30 run $P --cap-pick 0,2 > $OUT/c3_cap_a.log 2>&1) &
    (export CUDA_VISIBLE_DEVICES=1; T=290 TAIL=30 run $P --cap-pick 5,4 > $OUT/c3_cap_b.log 2>&1) &
    wait ;;
esac
