#!/bin/bash
# One call on the 2-GPU machine that packs several issues' runs (session 3, 2026-11-25): phases run the
# host-light GPU jobs side by side and keep CPU-attention runs away from the serving runs (on this machine
# CPUs 0-15 and 16-31 may be SMT siblings, so "separate cores" still share physical cores).
# Phase 1: GPU0 serving (peer and flexserve, same call; GPU kernel/graph/swap tests; swap profile),
#          GPU1 OPT-175B on one GPU. Phase 2: OPT-175B pipeline-parallel 2. Phase 3: GPU0 Llama-3-70B weights
#          on CPU, GPU1 OPT-30B CPU attention. Logs go to $OUT/*.log.
source bench/device_env.sh >/dev/null
{ lscpu -e=CPU,CORE,SOCKET,NODE | head -40; free -g; } > $OUT/lscpu.txt
(export CUDA_VISIBLE_DEVICES=0
 T=150 bash bench/device_serve.sh peer batch-ep > $OUT/p1_serve.log 2>&1
 T=90 TAIL=20 bash bench/device_serve.sh kernel >> $OUT/p1_serve.log 2>&1
 T=120 TAIL=60 bash bench/device_serve.sh swap-profile >> $OUT/p1_serve.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; T=240 bash bench/device_offload.sh 175b-1gpu > $OUT/p1_175b.log 2>&1) &
wait
T=180 bash bench/device_offload.sh 175b-pp2 > $OUT/p2_175b_pp2.log 2>&1
# 141 GB of bf16 weights need that much free host memory; otherwise the 4-bit variant (~37 GB) is streamed
AVAIL_GIB=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo); echo "MemAvailable ${AVAIL_GIB} GiB" >> $OUT/lscpu.txt
S70=70b-cpu; [ "$AVAIL_GIB" -lt 225 ] && S70=70b-cpu4
(export CUDA_VISIBLE_DEVICES=0; T=200 bash bench/device_offload.sh $S70 > $OUT/p3_70b.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; T=200 bash bench/device_offload.sh 30b-fs > $OUT/p3_30b.log 2>&1) &
wait
