#!/bin/bash
# Issues 6 and 7 on the GPU machine: the serving engine (Llama-3-8B shape, dummy bf16 weights) through HTTP,
# against transformers' continuous batching in the same run, and FCFS vs MLFQ vs skip-join MLFQ on the Azure
# and Gamma traces with the simulator's prediction beside each. Usage: bash bench/device_serve.sh STAGE...
# (stages: kernel, peer, batch, batch-ep, batch-gather, profile, swap-profile, azure, gamma, heavy, sim)
source bench/device_env.sh
M="--model dummy:llama-3-8b --dtype bfloat16"
BS="python3 -m flexserve.cli bench serve --json"
RATE=${RATE:-12}; N=${N:-300}
LV="--num-levels ${LEVELS:-8}"  # the MLFQ depth of the recorded runs (sessions 2-6); LEVELS=4 is the default now
for stage in "$@"; do case $stage in
  kernel) TAIL=15 run python3 -m pytest -q -p no:cacheprovider tests/engine/test_paged_attention.py tests/engine/test_serving.py -k "kernel or captured or copy_stream" ;;
  peer) run python3 bench/peer_transformers_serving.py 256 ;;
  batch) run $BS --launch $M --trace bench/traces/batch256_uniform.csv --num-requests 256 --schedulers fcfs \
      --max-num-seqs 256 --max-num-batched-tokens 8192 --no-engine-process --plot $OUT/serve_batch256.png ;;
  batch-ep) run $BS --launch $M --trace bench/traces/batch256_uniform.csv --num-requests 256 --schedulers fcfs \
      --max-num-seqs 256 --max-num-batched-tokens 8192 --engine-process ;;
  batch-gather) FLEXSERVE_PAGED_ATTENTION=gather run $BS --launch $M --trace bench/traces/batch256_uniform.csv --num-gpu-blocks 16000 \
      --num-requests 256 --schedulers fcfs --max-num-seqs 256 --max-num-batched-tokens 8192 ;;
  azure) run $BS --launch $M --trace azure --rate $RATE --num-requests $N --schedulers fcfs,mlfq,skip-join-mlfq $LV \
      --plot $OUT/sched_azure_r$RATE.png ;;
  gamma) run $BS --launch $M --trace gamma --cv 3 --rate $RATE --num-requests $N \
      --schedulers fcfs,mlfq,skip-join-mlfq $LV --plot $OUT/sched_gamma_r$RATE.png ;;
  heavy) H="--trace gamma --cv 3 --rate $RATE --num-requests $N --prompt-len 256 --output-dist pareto --output-len 16 \
      --max-num-seqs 8 --schedulers fcfs,skip-join-mlfq $LV"  # heavy-tailed outputs, scarce seats: FastServe's case
    run $BS --launch $M $H --plot $OUT/sched_heavy_r$RATE.png
    run $BS --simulate $H --sim-seq-overhead-us 350 ;;
  profile) TAIL=45 run python3 bench/profile_serving.py $M --trace-out $OUT/serve_trace.json ;;
  swap-profile) TAIL=45 run python3 bench/profile_serving.py $M --scheduler skip-join-mlfq --max-num-seqs 64 \
      --num-gpu-blocks 2500 --profile-after 60 --trace-out $OUT/swap_trace.json ;;
  sim)
    run $BS --simulate --trace azure --rate $RATE --num-requests $N --schedulers fcfs,mlfq,skip-join-mlfq $LV
    run $BS --simulate --trace gamma --cv 3 --rate $RATE --num-requests $N --schedulers fcfs,mlfq,skip-join-mlfq $LV ;;
esac; done
