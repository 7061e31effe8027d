"""The benchmark registry: one entry per question that a figure in bench/RESULTS.md answers.

Each entry says what it asks, the commands that answer it (flexserve under test and, where RESULTS has one,
the peer measured in the same call), the machine it needs, an estimate of its duration, the wheels it needs
beyond the project's own dependencies, and the files it writes. `python bench/run.py` lists, shows, runs and
packs them.

Command lines are written as on a shell, run from the repository root, with these words and placeholders:
  flexserve ...      python -m flexserve.cli ... (the repository's code, no install needed)
  python ...         the interpreter that runs bench/run.py
  torchrun ...       python -m torch.distributed.run ...
  pytest ...         python -m pytest -p no:cacheprovider ...
  NAME=value ...     an environment variable for that command only
  {out}              the output folder of the run (`run --out`)
  {peers}            the folder of other projects' benchmark scripts (FLEXSERVE_PEERS_DIR, default .peers/)
A step that is a tuple of commands runs them at the same time, each on the GPU its `gpu` names.

Past the usual module size on purpose: it is a registry (data), one entry per figure, kept in one place so that
RESULTS.md and `bench/run.py` read the same list.
"""
from __future__ import annotations

from dataclasses import dataclass

MACHINES = {"cpu": 0, "1 GPU": 1, "2 GPUs": 2}  # machine kind -> GPUs it needs
FLEXGEN_WHEELS = ("flexgen==0.1.8", "pulp", "orloge")
FLEXGEN_PEER = "FlexGen 0.1.8 in the same call (run_flexgen.py from {peers})"
LARGEST_FIRST = ("Figures that RESULTS records under flexserve's earlier weight placement reproduce with "
                 "`--weight-placement largest-first` added to the flexserve command.")
PLACEMENT_CHANGED = ("Split-weight figures that RESULTS records under flexserve's earlier weight placement "
                     "(`--weight-placement largest-first`) differ: this entry runs the current default.")
EIGHT_LEVELS = "Recorded with FastServe's eight MLFQ levels (`--num-levels 8`, set here); the default is four."


@dataclass(frozen=True)
class Cmd:
    """One command line of an entry (see the module docstring for its words), with its time limit."""

    line: str
    timeout_s: int = 300
    gpu: int | None = None  # pin to this GPU (CUDA_VISIBLE_DEVICES); None: what the machine gives


@dataclass(frozen=True)
class Entry:
    """One question a figure answers, and how to answer it again."""

    name: str
    question: str
    machine: str  # a key of MACHINES
    seconds: int  # estimated duration of the commands on the machines of bench/RESULTS.md
    steps: tuple  # Cmd, or a tuple of Cmds that run at the same time
    writes: tuple = ()  # files under {out} besides the entry's log
    wheels: tuple = ()
    peer: str = ""
    host_gib: int = 0  # free host memory needed; below it the fallback entry runs instead
    fallback: str = ""
    note: str = ""

    def commands(self) -> list[Cmd]:
        return [c for step in self.steps for c in (step if isinstance(step, tuple) else (step,))]


# --- offloaded generation (FlexGen's benchmark: prompt 512, generation 32, dummy weights) -----------------------
def throughput(model: str, percent: str, block: str, flags: str = "", dtype: str = "float16", gen: int = 32,
               timeout_s: int = 300) -> Cmd:
    bs, nb = block.split("x")
    return Cmd(f"flexserve bench throughput --model dummy:{model} --dtype {dtype} --prompt-len 512 --gen-len {gen} "
               f"--json --h2d-gbps 53.1 --percent {percent} --gpu-batch-size {bs} --num-gpu-batches {nb} {flags}"
               .strip(), timeout_s)


def flexgen(model: str, percent: str, block: str, flags: str = "", timeout_s: int = 300) -> Cmd:
    bs, nb = block.split("x")
    return Cmd(f"python {{peers}}/run_flexgen.py --model facebook/{model} --prompt-len 512 --gen-len 32 "
               f"--percent {percent} --gpu-batch-size {bs} --num-gpu-batches {nb} {flags}".strip(), timeout_s)


ALL_GPU, WEIGHTS_CPU, OPT30B_POLICY = "100 0 100 0 100 0", "0 100 100 0 100 0", "20 80 0 100 0 100"
CCC = "--cpu-cache-compute"

# --- the planner's predicted-vs-measured check ------------------------------------------------------------------
PLANNER = "python bench/planner_validation.py --hardware h100 --gen-len 8 --timeout 200"
CAP16 = f"{PLANNER} --no-sweep --auto opt-30b --gpu-mem 16GiB --cap-sweep --cap-pick"


def planner_validation(part: str, cases: str, what: str, seconds: int) -> Entry:
    """A third of the planner's nine-case sweep: the whole sweep takes longer than one device call."""
    first, last = cases.split(",")[0], cases.split(",")[-1]
    return Entry(f"planner-validation-{part}", f"Planner predicted vs measured, sweep cases {first}-{last}: {what}",
                 "1 GPU", seconds,
                 (Cmd(f"{PLANNER} --sweep-pick {cases} --plot {{out}}/planner_vs_measured_{part}.png", 560),),
                 writes=(f"planner_vs_measured_{part}.png",), note=PLACEMENT_CHANGED)


HELD_OUT_FIT = "python bench/planner_validation.py --fit --fit-from-tally --save-profile {out}/fitted.json"
HELD_OUT_NOTE = ("Each part fits the profile's constants on the recorded runs only (bench/planner_tally.py, no GPU), "
                 "then measures cases never used for fitting; merge the parts' records with `python "
                 "bench/planner_validation.py --merge A.json B.json C.json --accuracy held_out.json` and put its "
                 "figures in flexserve/planner/accuracy.py (kind held-out).")


def planner_held_out(part: str, cases: str, what: str) -> Entry:
    """A part of the held-out cases (about 95 s each: a fresh process that builds its random weights)."""
    n = len(cases.split(","))
    return Entry(f"planner-held-out-{part}", f"Planner error on runs held out from its fit, cases {cases}: {what}",
                 "1 GPU", 40 + 100 * n,
                 (Cmd(HELD_OUT_FIT, 120),
                  Cmd(f"python bench/planner_validation.py --held-out --hardware {{out}}/fitted.json --timeout 200 "
                      f"--held-out-pick {cases} --accuracy {{out}}/held_out_{part}.json", min(580, 60 + 110 * n))),
                 writes=("fitted.json", f"held_out_{part}.json"), note=HELD_OUT_NOTE)


HELD_OUT_AUTO_NOTE = ("Models, caps and lengths the profile's constants were never fitted to (fitted on the recorded "
                      "runs only, as the held-out parts are); the plan uses this machine's rates as `flexserve "
                      "calibrate` measures them (link, CPU attention and the link beside it, rebuild rate), as a "
                      "user's would, with the executor's fitted constants calibrate copies; the sweep is the "
                      "planner's best at other GPU batch sizes and on the other side of the CPU-attention choice, "
                      "rebuilt by the planner of the day.")
CALIBRATE = "flexserve calibrate --output {out}/machine.json"


def held_out_auto(model: str, cap: str, prompt_len: int, what: str, seconds: int) -> Entry:
    """`--policy auto` against a measured sweep for a case not used in fitting (the 10% target)."""
    tag = model.replace("llama-2-", "llama2-")
    return Entry(f"auto-policy-held-out-{tag}-cap{cap.removesuffix('GiB')}",
                 f"{what} under a {cap.removesuffix('GiB')} GiB GPU cap (prompt {prompt_len}, gen 8), not used in "
                 "fitting: --policy auto against the measured sweep it must come within 10% of",
                 "1 GPU", seconds,
                 (Cmd(HELD_OUT_FIT, 120), Cmd(CALIBRATE, 180),
                  Cmd(f"python bench/planner_validation.py --hardware {{out}}/machine.json --gen-len 8 --timeout 200 "
                      f"--prompt-len {prompt_len} --no-sweep --auto {model} --gpu-mem {cap} --cap-sweep", 570)),
                 writes=("fitted.json", "machine.json"), note=HELD_OUT_AUTO_NOTE)


REFERENCE_SERVE = ("flexserve bench serve --json --launch --model dummy:llama-3-8b --dtype bfloat16 --trace "
                   "bench/traces/batch256_uniform.csv --num-requests 256 --schedulers fcfs --max-num-seqs 256 "
                   "--max-num-batched-tokens 8192 --engine-process")

# --- mixtures of experts: Mixtral-8x7B with dense weights and one expert per layer on the GPU (~15 GB) ------------
MOE_BATCH1 = ("flexserve bench throughput --model dummy:mixtral-8x7b --dtype bfloat16 --percent 20 80 100 0 100 0 "
              "--gpu-batch-size 1 --prompt-len 128 --gen-len 32 --json")

# --- serving (Llama-3-8B shape, random bf16 weights) -------------------------------------------------------------
LLAMA8 = "--model dummy:llama-3-8b --dtype bfloat16"
BATCH256_TRACE = "--trace bench/traces/batch256_uniform.csv --num-requests 256 --schedulers fcfs"
BATCH256 = f"{BATCH256_TRACE} --max-num-seqs 256 --max-num-batched-tokens 8192"
COLD_CACHE = "/tmp/flexserve-cold-triton-cache"  # outside OUT: thousands of small files that need not come back
HEAVY = "--trace gamma --cv 3 --prompt-len 256 --output-dist pareto --output-len 16"
HEAVY_8_SEATS = f"{HEAVY} --num-requests 600 --max-num-seqs 8 --num-levels 8"
KV_LIMITED = (f"{HEAVY} --rate 8 --num-requests 3000 --max-context 3072 --max-num-seqs 64 --num-gpu-blocks 192 "
              "--num-cpu-blocks 4096")
THREE = "--schedulers fcfs,mlfq,skip-join-mlfq --num-levels 8"
CALIBRATED = "--sim-seq-overhead-us 350"  # host time per decoding sequence, fitted to the measured FCFS


def launch(flags: str, timeout_s: int = 300, gpu: int | None = None, env: str = "") -> Cmd:
    return Cmd(f"{env} flexserve bench serve --json --launch {LLAMA8} {flags}".strip(), timeout_s, gpu)


def simulate(flags: str, timeout_s: int = 120) -> Cmd:
    return Cmd(f"flexserve bench serve --json --simulate {flags}", timeout_s)


def profile_serving(flags: str, timeout_s: int = 150) -> Cmd:
    return Cmd(f"python bench/profile_serving.py {LLAMA8} {flags}", timeout_s)


def parallel(flags: str, nproc: int = 1, timeout_s: int = 300, gpu: int | None = None) -> Cmd:
    run = f"torchrun --nproc-per-node {nproc} " if nproc > 1 else "python "
    return Cmd(f"{run}bench/parallel_throughput.py {flags}", timeout_s, gpu)


OPT175B = "--model dummy:opt-175b --dtype float16 --batch 8 --prompt-len 512 --gen-len 8 --compress-weight"

ENTRIES = [
    # ----------------------------------------------------------------------------- 1. offloaded generation
    Entry("all-gpu-vs-flexgen-opt6.7b",
          "OPT-6.7B all on one GPU (32x1): decode speed of the serving engine and the offloading executor "
          "against FlexGen 0.1.8, same call",
          "1 GPU", 150,
          (throughput("opt-6.7b", ALL_GPU, "32x1", "--engine paged", timeout_s=420),
           throughput("opt-6.7b", ALL_GPU, "32x1", timeout_s=200),
           flexgen("opt-6.7b", ALL_GPU, "32x1", timeout_s=200)),
          wheels=FLEXGEN_WHEELS, peer=FLEXGEN_PEER,
          note="The first paged run of a fresh machine compiles its kernels (up to ~400 s once)."),
    Entry("offload-vs-flexgen-opt6.7b-weights-cpu",
          "OPT-6.7B with all weights on the CPU (32x4): decode speed against FlexGen 0.1.8 and the PCIe bound",
          "1 GPU", 150,
          (throughput("opt-6.7b", WEIGHTS_CPU, "32x4"), flexgen("opt-6.7b", WEIGHTS_CPU, "32x4")),
          wheels=FLEXGEN_WHEELS, peer=FLEXGEN_PEER),
    Entry("offload-vs-flexgen-opt30b-cpu-attention",
          "OPT-30B at FlexGen's policy (20 80 0 100 0 100, CPU attention, 16x3): decode speed against FlexGen "
          "0.1.8 at equal weight placement, and against the PCIe bound",
          "1 GPU", 330,
          (throughput("opt-30b", OPT30B_POLICY, "16x3", CCC, timeout_s=260),
           flexgen("opt-30b", OPT30B_POLICY, "16x3", CCC, timeout_s=300)),
          wheels=FLEXGEN_WHEELS, peer=FLEXGEN_PEER,
          note="CPU attention is host-memory bound: run it alone on the machine. " + LARGEST_FIRST),
    Entry("opt30b-cpu-attention-activation-placement",
          "Which part of FlexGen's OPT-30B policy serialises CPU attention with the weight stream: activations on "
          "the GPU instead of the CPU, and GPU batch 32",
          "1 GPU", 240,
          (throughput("opt-30b", "20 80 0 100 100 0", "16x3", CCC, timeout_s=200),
           throughput("opt-30b", OPT30B_POLICY, "32x3", CCC, timeout_s=200))),
    Entry("opt30b-cpu-attention-loop-ab",
          "OPT-30B at FlexGen's policy with CPU attention: the shared generation loop against a bare forward-and-"
          "argmax loop, alternating on one loaded model in one process (does the loop cost the host-bound "
          "CPU-attention case anything?)",
          "1 GPU", 300,
          (Cmd("python bench/loop_ab.py --model dummy:opt-30b --dtype float16 --percent 20 80 0 100 0 100 "
               "--gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute --prompt-len 512 --gen-len 32", 290),)),
    Entry("opt30b-cpu-attention-bf16-cache",
          "OPT-30B with CPU attention: how much faster is a host KV cache stored in bf16 than in fp16",
          "1 GPU", 210,
          (throughput("opt-30b", OPT30B_POLICY, "16x3", CCC, timeout_s=200),
           throughput("opt-30b", OPT30B_POLICY, "16x3", f"{CCC} --cpu-attention-dtype bfloat16", timeout_s=200)),
          note=LARGEST_FIRST),
    Entry("weights-cpu-llama3-8b",
          "Llama-3-8B with all weights on the CPU (bf16, 32x4): decode speed as a fraction of the PCIe bound",
          "1 GPU", 90,
          (throughput("llama-3-8b", WEIGHTS_CPU, "32x4", dtype="bfloat16", timeout_s=200),)),
    Entry("weights-cpu-llama3-70b",
          "Llama-3-70B with all weights on the CPU (bf16, 16x2, gen 8): decode speed as a fraction of the PCIe "
          "bound, on one GPU",
          "1 GPU", 150,
          (throughput("llama-3-70b", WEIGHTS_CPU, "16x2", dtype="bfloat16", gen=8, timeout_s=300),),
          host_gib=225, fallback="weights-cpu-llama3-70b-4bit",
          note="141 GB of bf16 weights are pinned in host memory; with less than 225 GiB free the 4-bit "
               "variant runs instead."),
    Entry("weights-cpu-llama3-70b-4bit",
          "Llama-3-70B with 4-bit weights on the CPU (16x2, gen 8): decode speed on a host too small for bf16",
          "1 GPU", 150,
          (throughput("llama-3-70b", WEIGHTS_CPU, "16x2", "--compress-weight", dtype="bfloat16", gen=8,
                      timeout_s=300),)),
    Entry("profile-opt30b-cpu-attention",
          "Where an OPT-30B CPU-attention decode step spends its time (torch.profiler trace, host timers)",
          "1 GPU", 90,
          (throughput("opt-30b", OPT30B_POLICY, "16x3", f"{CCC} --profile {{out}}/opt30b_trace.json", gen=6,
                      timeout_s=200),),
          writes=("opt30b_trace.json",)),
    Entry("profile-opt6.7b-all-gpu",
          "Where an all-GPU OPT-6.7B decode step spends its time (GPU work against host launch overhead)",
          "1 GPU", 60,
          (throughput("opt-6.7b", ALL_GPU, "32x1", "--profile {out}/opt6.7b_trace.json", gen=8, timeout_s=150),),
          writes=("opt6.7b_trace.json",)),
    Entry("cpu-attention-layouts",
          "How fast decode attention on the CPU reads a host KV cache, by layout (sequence- or head-major) and "
          "dtype",
          "cpu", 40, (Cmd("python bench/cpu_attention_layouts.py", 200),),
          note="RESULTS quotes it on the GPU machine's host CPU: run it there for those figures."),
    # ----------------------------------------------------------------------------- 2. the planner
    Entry("planner-tally",
          "How far the planner's predictions are from every offloading policy measured so far (no GPU needed)",
          "cpu", 10, (Cmd("python bench/planner_tally.py", 120),)),
    planner_validation("a", "0,1,2", "OPT-6.7B weights on the GPU, on the CPU, and split", 320),
    planner_validation("b", "3,4,5", "OPT-6.7B cache on the CPU (with and without CPU attention), OPT-13B split "
                       "weights", 320),
    planner_validation("c", "6,7,8", "OPT-30B CPU attention, Llama-3-8B weights on the CPU and split", 300),
    planner_held_out("a", "0,1,2,3", "Llama-2-7B weights on the CPU, CPU attention at 1,024 tokens, 4-bit "
                     "weights; Mistral-7B weights on the CPU"),
    planner_held_out("b", "4,5,6,7", "Mistral-7B CPU attention, Qwen2-7B resident and 4-bit weights on the CPU, "
                     "OPT-2.7B CPU attention"),
    planner_held_out("c", "8,9,10,11", "OPT-2.7B split cache, Llama-2-13B split weights, 4-bit cache, CPU "
                     "attention at 768 tokens"),
    planner_held_out("d", "12,13,14,15,16", "cases the cost model's host lane has not seen: OPT-1.3B and "
                     "Llama-2-13B resident, OPT-1.3B CPU attention, Qwen2-7B split weights, Llama-2-7B 4-bit "
                     "weights on the CPU"),
    Entry("planner-qwen2-recheck",
          "The two Qwen2-7B held-out runs again (the planner's two misses), with the benchmark's warm-up at the "
          "timed GPU batch size: were one-off first-use costs inside the timed decode? Beside them resident "
          "Mistral-7B (gen 16) and OPT-6.7B (gen 8), whose step the same costs would have slowed, and Qwen2-7B "
          "resident at gen 64",
          "1 GPU", 420,
          (Cmd(HELD_OUT_FIT, 120),
           Cmd("python bench/planner_validation.py --held-out --hardware {out}/fitted.json --timeout 200 "
               "--held-out-pick 5,6 --accuracy {out}/held_out_qwen2.json", 420),
           throughput("mistral-7b", ALL_GPU, "32x1", dtype="bfloat16", gen=16),
           throughput("opt-6.7b", ALL_GPU, "32x1", gen=8),
           throughput("qwen2-7b", ALL_GPU, "32x1", dtype="bfloat16", gen=64)),  # a per-step cost stays at gen 64
          writes=("fitted.json", "held_out_qwen2.json"), note=HELD_OUT_NOTE),
    held_out_auto("llama-2-13b", "12GiB", 512, "Llama-2-13B fp16", 520),
    held_out_auto("llama-2-7b", "4GiB", 256, "Llama-2-7B fp16", 470),
    Entry("auto-policy-cap16-opt30b",
          "OPT-30B under a 16 GiB GPU cap (gen 8): what --policy auto chooses and how fast it runs against the "
          "prediction",
          "1 GPU", 160, (Cmd(f"{CAP16} 0", 260),)),
    Entry("auto-policy-cap16-opt30b-sweep-a",
          "The measured sweep --policy auto must come within 10% of, under the 16 GiB cap, part 1: the planner's "
          "best at other GPU batch sizes",
          "1 GPU", 360, (Cmd(f"{CAP16} 1,2,3", 560),)),
    Entry("auto-policy-cap16-opt30b-sweep-b",
          "The measured sweep --policy auto must come within 10% of, under the 16 GiB cap, part 2: the rest of the "
          "list (FlexGen's README policy, the earlier auto choice)",
          "1 GPU", 290, (Cmd(f"{CAP16} 4,5", 450),),
          note="The list (planner picks at batch 8/16/32/64, then the hand policies) is rebuilt by the planner "
               "of the day: `--cap-pick` indices follow it."),
    # ----------------------------------------------------------------------------- 3. CPU generation
    Entry("cpu-generate-vs-transformers-smollm2",
          "CPU generation speed of flexserve against transformers' generate on SmolLM2-135M (batch 1 and 16)",
          "cpu", 90, (Cmd("python bench/cpu_generate.py --batches 1 16 --max-tokens 64", 400),)),
    # ----------------------------------------------------------------------------- 4a. serving throughput
    Entry("serving-vs-transformers-llama3-8b",
          "Serving 256 requests at once through HTTP (Llama-3-8B shape): throughput and latency against "
          "transformers' continuous batching, same call",
          "1 GPU", 180,
          (Cmd("python bench/peer_transformers_serving.py 256", 200),
           launch(f"{BATCH256} --engine-process", 150),
           launch(f"{BATCH256} --no-engine-process --plot {{out}}/serve_batch256.png", 150)),
          writes=("serve_batch256.png",), peer="transformers generate_batch (bench/peer_transformers_serving.py)"),
    Entry("serving-gather-attention-llama3-8b",
          "The same 256-request serving run with the portable gather-based paged attention instead of the kernel",
          "1 GPU", 120, (launch(f"{BATCH256} --num-gpu-blocks 16000", 240, env="FLEXSERVE_PAGED_ATTENTION=gather"),)),
    Entry("profile-serving-step-llama3-8b",
          "Where a batch-256 serving step spends its time without HTTP (phases, torch.profiler)",
          "1 GPU", 60, (profile_serving("--trace-out {out}/serve_step_trace.json"),),
          writes=("serve_step_trace.json",)),
    Entry("swap-overlap-profile",
          "Do KV swaps overlap compute: swaps ahead of need (2,500 blocks) and demand swaps (192 blocks)",
          "1 GPU", 110,
          (profile_serving("--scheduler skip-join-mlfq --max-num-seqs 64 --num-gpu-blocks 2500 --profile-after 60 "
                           "--trace-out {out}/swap_ahead_trace.json"),
           profile_serving("--scheduler skip-join-mlfq --max-num-seqs 64 --num-gpu-blocks 192 --profile-after 60 "
                           "--profile-steps 20 --trace-out {out}/swap_demand_trace.json")),
          writes=("swap_ahead_trace.json", "swap_demand_trace.json")),
    Entry("gpu-tests-serving",
          "Do the GPU-only tests pass on this GPU: paged-attention kernel (prefill tiles, split decode, sliding "
          "window) against the portable path, CUDA-graph decode, copy stream, swaps",
          "1 GPU", 120,
          (Cmd("pytest -q tests/kernels tests/engine/test_streaming_attention.py", 200),
           Cmd("pytest -q tests/engine/test_paged_attention.py tests/engine/test_serving.py "
               "tests/engine/test_paged_swap.py -k 'kernel or captured or copy_stream or swap'", 200))),
    Entry("paged-attention-kernel",
          "How close the paged-attention kernel comes to the GPU: prefill TFLOP/s beside PyTorch's FlashAttention "
          "on the same shapes, decode GB/s of KV read beside the HBM copy rate; prefill launch settings swept",
          "1 GPU", 170, (Cmd("python bench/attention_kernel.py --sweep", 240),)),
    Entry("serving-defaults-vs-transformers-llama3-8b",
          "The 256-request serving batch with no engine flags (pool, seats, token budget derived at start) "
          "against transformers' continuous batching, same call; fraction of the GPU bound",
          "1 GPU", 200,
          (Cmd("python bench/peer_transformers_serving.py 256", 200),
           launch(f"{BATCH256_TRACE} --engine-process", 150),
           launch(f"{BATCH256_TRACE} --no-engine-process", 150)),
          peer="transformers generate_batch (bench/peer_transformers_serving.py)"),
    Entry("serving-cold-cache-llama3-8b",
          "Does serving compile kernels after start-up: the REFERENCE batch twice, each in a new server process, on "
          "a Triton cache emptied first (throughput of each run, and when each kernel variant was compiled)",
          "1 GPU", 150,
          (Cmd(f"python bench/triton_cache_times.py --cache {COLD_CACHE} --clear", 30),
           launch(f"{BATCH256} --engine-process", 150, env=f"TRITON_CACHE_DIR={COLD_CACHE}"),
           launch(f"{BATCH256} --engine-process", 150, env=f"TRITON_CACHE_DIR={COLD_CACHE}"),
           Cmd(f"python bench/triton_cache_times.py --cache {COLD_CACHE}", 30))),
    Entry("serve-offloaded-opt30b",
          "Serving a model whose weights mostly live in CPU memory (OPT-30B fp16, 30% of the weights on the GPU) "
          "through HTTP: throughput against the bound of streaming the other 70% over PCIe every step, and the "
          "offline executor at the same placement in the same call",
          "1 GPU", 330,
          (Cmd("flexserve bench serve --json --launch --model dummy:opt-30b --dtype float16 --percent 30 70 100 0 "
               "100 0 --trace poisson --rate 100 --prompt-len 256 --output-len 32 --max-output-len 48 "
               "--num-requests 64 --max-num-seqs 64 --schedulers fcfs --engine-process", 200),
           Cmd("flexserve bench throughput --model dummy:opt-30b --dtype float16 --percent 30 70 100 0 100 0 "
               "--gpu-batch-size 64 --prompt-len 256 --gen-len 32 --json", 150))),
    Entry("prefill-heavy-batch-llama3-8b",
          "Prefill-heavy offline batch (128 prompts of 1k-3k tokens, 32 out): prompt tokens per second against "
          "the measured matmul rate, with the derived token budget and with 8,192",
          "1 GPU", 150,
          (launch("--trace bench/traces/prefill128_1k-3k.csv --num-requests 128 --schedulers fcfs "
                  "--no-engine-process", 120),
           launch("--trace bench/traces/prefill128_1k-3k.csv --num-requests 128 --schedulers fcfs "
                  "--no-engine-process --max-num-batched-tokens 8192", 120))),
    Entry("prefill-heavy-online-llama3-8b",
          "Prefill-heavy online trace (Poisson arrivals, prompts log-normal around 2k tokens, ~25 out): "
          "saturation throughput (20 req/s, faster than service) and TPOT at ~70% of it (9 req/s)",
          "1 GPU", 200,
          (launch("--trace poisson --rate 20 --num-requests 300 --prompt-len 2048 --output-len 25 "
                  "--schedulers fcfs --engine-process", 150),
           launch("--trace poisson --rate 9 --num-requests 300 --prompt-len 2048 --output-len 25 "
                  "--schedulers fcfs --engine-process", 150))),
    Entry("profile-serving-prefill-llama3-8b",
          "Where a prefill-heavy serving step spends its time without HTTP (128 prompts of 1k-3k tokens)",
          "1 GPU", 60, (profile_serving("--requests 128 --prompt-range 1024 3072 --max-tokens 32 --profile-after 4 "
                                        "--profile-steps 3"),)),
    # ----------------------------------------------------------------------------- 4b. schedulers
    Entry("scheduler-kv-limited",
          "Where KV memory limits the batch (64 seats, 192 KV blocks, heavy-tailed trace at 8 req/s): skip-join "
          "MLFQ against FCFS on mean and p99 JCT and throughput, one policy per GPU at once",
          "2 GPUs", 500,
          ((launch(f"{KV_LIMITED} --schedulers fcfs --records {{out}}/kv_limited_fcfs.csv", 570, gpu=0),
            launch(f"{KV_LIMITED} --schedulers skip-join-mlfq --records {{out}}/kv_limited_sj4.csv", 570, gpu=1)),
           Cmd("flexserve bench serve --plot-records {out}/kv_limited_fcfs.csv=fcfs,"
               "{out}/kv_limited_sj4.csv=skip-join-mlfq --plot {out}/sched_kv_limited_r8.png", 60),
           simulate(f"{KV_LIMITED} {CALIBRATED} --schedulers fcfs,skip-join-mlfq,srpt")),
          writes=("kv_limited_fcfs.csv", "kv_limited_sj4.csv", "sched_kv_limited_r8.png")),
    Entry("scheduler-kv-limited-8-levels-vs-srpt",
          "Where KV memory limits the batch: skip-join MLFQ with FastServe's eight levels, and the clairvoyant "
          "SRPT reference, one per GPU at once",
          "2 GPUs", 490,
          ((launch(f"{KV_LIMITED} --schedulers skip-join-mlfq --num-levels 8 --records {{out}}/kv_limited_sj8.csv",
                   570, gpu=0),
            launch(f"{KV_LIMITED} --schedulers srpt --records {{out}}/kv_limited_srpt.csv", 570, gpu=1)),),
          writes=("kv_limited_sj8.csv", "kv_limited_srpt.csv")),
    Entry("scheduler-kv-limited-sim-rates",
          "Where KV memory limits the batch, across request rates 4-10 (calibrated simulator): FCFS, skip-join "
          "MLFQ with four and eight levels, SRPT, and plain MLFQ at 8 req/s",
          "cpu", 220,
          tuple(c for rate in (4, 6, 7, 8, 9, 10) for c in (
              simulate(f"{KV_LIMITED} --rate {rate} {CALIBRATED} --schedulers fcfs,skip-join-mlfq,srpt"),
              simulate(f"{KV_LIMITED} --rate {rate} {CALIBRATED} --schedulers skip-join-mlfq --num-levels 8")))
          + (simulate(f"{KV_LIMITED} {CALIBRATED} --schedulers mlfq"),),
          note="The seed and tail-guard variations quoted beside the table are the same command with --seed S or "
               "--tail-guard-s 30 --tail-guard-seats 1."),
    Entry("scheduler-heavy-tailed",
          "Heavy-tailed trace at ~85% load with 8 seats (8 req/s, 600 requests): FCFS, skip-join MLFQ, the "
          "clairvoyant SRPT, and skip-join with the tail guard; the simulator beside each",
          "1 GPU", 420,
          (launch(f"{HEAVY_8_SEATS} --rate 8 --schedulers fcfs,skip-join-mlfq,srpt --plot {{out}}/sched_heavy_r8.png",
                  330),
           launch(f"{HEAVY_8_SEATS} --rate 8 --schedulers skip-join-mlfq --tail-guard-s 4 --tail-guard-seats 4", 200),
           simulate(f"{HEAVY_8_SEATS} --rate 8 {CALIBRATED} --schedulers fcfs,skip-join-mlfq,srpt"),
           simulate(f"{HEAVY_8_SEATS} --rate 8 {CALIBRATED} --schedulers skip-join-mlfq --tail-guard-s 4 "
                    "--tail-guard-seats 4")),
          writes=("sched_heavy_r8.png",), note=EIGHT_LEVELS),
    Entry("scheduler-heavy-tailed-12rps",
          "Heavy-tailed trace above capacity with 8 seats (12 req/s, 600 requests): skip-join MLFQ against FCFS, "
          "and the simulator's prediction",
          "1 GPU", 180,
          (launch(f"{HEAVY_8_SEATS} --rate 12 --schedulers fcfs,skip-join-mlfq --plot {{out}}/sched_heavy_r12.png",
                  330),
           simulate(f"{HEAVY_8_SEATS} --rate 12 {CALIBRATED} --schedulers fcfs,skip-join-mlfq")),
          writes=("sched_heavy_r12.png",), note=EIGHT_LEVELS),
    Entry("scheduler-light-tailed-azure-gamma",
          "Light-tailed traces above capacity (Azure conversations and Gamma CV 3, 12 req/s, 200 requests): FCFS, "
          "MLFQ and skip-join MLFQ on the real engine",
          "1 GPU", 340,
          (launch(f"--trace azure --rate 12 --num-requests 200 {THREE} --plot {{out}}/sched_azure.png", 300),
           launch(f"--trace gamma --cv 3 --rate 12 --num-requests 200 {THREE} --plot {{out}}/sched_gamma.png", 300)),
          writes=("sched_azure.png", "sched_gamma.png"),
          note=EIGHT_LEVELS + " The recorded runs had the engine in the server process (now --no-engine-process)."),
    Entry("scheduler-azure-rates",
          "Azure conversations at 4 and 8 req/s (below and above capacity): FCFS, MLFQ and skip-join MLFQ on the "
          "real engine, and the simulator refitted to the engine process",
          "1 GPU", 380,
          (launch(f"--trace azure --rate 4 --num-requests 200 {THREE} --plot {{out}}/sched_azure_r4.png", 290),
           launch(f"--trace azure --rate 8 --num-requests 200 {THREE} --plot {{out}}/sched_azure_r8.png", 240),
           simulate(f"--trace azure --rate 4 --num-requests 200 {THREE} --sim-seq-overhead-us 100"),
           simulate(f"--trace azure --rate 8 --num-requests 200 {THREE} --sim-seq-overhead-us 100")),
          writes=("sched_azure_r4.png", "sched_azure_r8.png"), note=EIGHT_LEVELS),
    Entry("simulator-vs-measured-light-tailed",
          "How close the simulator comes to the measured light-tailed runs (Azure and Gamma at 12 req/s), with its "
          "GPU-only cost model and with 350 us of host time per sequence",
          "cpu", 20,
          (simulate(f"--trace azure --rate 12 --num-requests 200 {THREE}"),
           simulate(f"--trace gamma --cv 3 --rate 12 --num-requests 200 {THREE}"),
           simulate(f"--trace azure --rate 12 --num-requests 200 {THREE} {CALIBRATED}"),
           simulate(f"--trace gamma --cv 3 --rate 12 --num-requests 200 {THREE} {CALIBRATED}")),
          note=EIGHT_LEVELS),
    Entry("sim-azure-rates",
          "Azure conversations across request rates 3-12 (calibrated simulator, 1,000 requests): skip-join MLFQ "
          "against FCFS",
          "cpu", 60,
          tuple(simulate(f"--trace azure --rate {r} --num-requests 1000 {THREE} {CALIBRATED}")
                for r in (3, 5, 7, 9, 12)),
          note=EIGHT_LEVELS),
    # ----------------------------------------------------------------------------- 4c. CPU serving, simulator
    Entry("cpu-serving-schedulers-smollm2",
          "The real engine on a CPU (SmolLM2, float32, Gamma CV 3 at 1.5 req/s, 8 seats): FCFS against skip-join "
          "MLFQ",
          "cpu", 180,
          (Cmd("flexserve bench serve --json --launch --device cpu --dtype float32 --trace gamma --cv 3 --rate 1.5 "
               "--num-requests 40 --prompt-len 64 --output-len 32 --max-num-seqs 8 --schedulers fcfs,skip-join-mlfq "
               "--num-levels 8 --plot {out}/cpu_launch_smollm2.png", 400),),
          writes=("cpu_launch_smollm2.png",), note=EIGHT_LEVELS),
    Entry("cpu-load-twice-saturation",
          "The server (SmolLM2, CPU) offered twice its saturation rate for 60 s, with 30% of clients dropping "
          "mid-stream and 10% cancelling early: tokens of completed streams against each prompt run alone, KV "
          "blocks used afterwards, resident memory start/middle/end",
          "cpu", 150,
          (Cmd("python bench/load_test.py --duration 60 --quiet", 400),)),
    Entry("sim-schedulers-azure-gamma",
          "The schedulers in the simulator on the Azure trace (12 req/s, 64 seats) and a Gamma overload (14 req/s, "
          "8 seats), with the oracle SRPT bound",
          "cpu", 60,
          (simulate("--trace azure --rate 12 --num-requests 2000 --schedulers fcfs,mlfq,skip-join-mlfq,srpt "
                    "--num-levels 8 --plot {out}/sim_azure_rate12.png"),
           simulate("--trace gamma --cv 3 --rate 14 --num-requests 1500 --max-num-seqs 8 "
                    "--schedulers fcfs,mlfq,skip-join-mlfq,srpt --num-levels 8 --plot {out}/sim_gamma_8seats.png")),
          writes=("sim_azure_rate12.png", "sim_gamma_8seats.png"), note=EIGHT_LEVELS),
    Entry("sim-heavy-tailed-8-seats",
          "A heavy-tailed workload (Pareto outputs, 14 req/s, 8 seats) in the simulator: skip-join MLFQ's mean JCT "
          "against FCFS",
          "cpu", 15,
          (simulate("--trace poisson --rate 14 --num-requests 1500 --prompt-len 256 --output-dist pareto "
                    "--output-len 16 --max-num-seqs 8 --num-levels 8 --schedulers fcfs,skip-join-mlfq"),),
          note="The recorded row comes from tests/scheduler/test_simulator.py's trace, whose prompts spread wider "
               "(log-normal sigma 0.8; the CLI's 0.5): this command asks the same question, its figures differ."),
    # ----------------------------------------------------------------------------- 5. several GPUs
    Entry("tp-llama70b",
          "Llama-3-70B on two GPUs with tensor parallelism (batch 16, bf16): prefill and decode speed, and the "
          "scaling against the one-GPU offloaded run",
          "2 GPUs", 180,
          (parallel("--model dummy:llama-3-70b --dtype bfloat16 -tp 2 --batch 16 --prompt-len 512 --gen-len 32", 2,
                    400),)),
    Entry("pipeline-opt175b",
          "OPT-175B with 4-bit weights: one GPU against pipeline parallel 2 (stages offloaded and all on the GPUs), "
          "and FlexGen 0.1.8's own pipeline mode in the same call",
          "2 GPUs", 320,
          (parallel(f"{OPT175B} --percent 40 60 100 0 100 0", timeout_s=200, gpu=0),
           parallel(f"{OPT175B} -pp 2 --percent 80 20 100 0 100 0", 2, 170),
           parallel(f"{OPT175B} -pp 2 --percent 100 0 100 0 100 0", 2, 170),
           Cmd("torchrun --nproc-per-node 2 bench/peer_flexgen_dist.py --model facebook/opt-175b "
               "--percent 80 20 100 0 100 0 --compress-weight --gpu-batch-size 4 --num-gpu-batches 1 "
               "--prompt-len 512 --gen-len 8", 300)),
          wheels=FLEXGEN_WHEELS, peer="FlexGen 0.1.8's pipeline mode (bench/peer_flexgen_dist.py), last",
          note="FlexGen's block is gpu batch x gpu batches x ranks (4 x 1 x 2 = 8 prompts, as flexserve's)."),
    # --- quantization (fp8, int8, 4-bit weights; fp8 KV cache) ---------------------------------------------
    Entry("gpu-tests-quantization",
          "Do the GPU-only quantization tests pass: the fused 4-bit dequantize-and-multiply Triton kernel, the "
          "fused per-token activation quantiser, torch._scaled_mm and torch._int_mm against the portable math, the "
          "paged-attention kernel over an fp8 pool",
          "1 GPU", 150,
          (Cmd("pytest -q -rs tests/kernels/test_dequant_matmul_kernel.py tests/kernels/test_act_quant_kernel.py "
               "tests/compression/test_quant_schemes.py "
               "tests/engine/test_paged_fp8_kv.py tests/kernels/test_paged_attention_kernel.py", 240),)),
    Entry("quant-llama3-70b-weights-cpu",
          "Llama-3-70B with weights streamed from the CPU: decode with fp8, rtn4 and awq weights (the bf16 row, "
          "141 GB, needs a host with more than 128 GiB: weights-cpu-llama3-70b)",
          "1 GPU", 540,
          tuple(throughput("llama-3-70b", WEIGHTS_CPU, "16x2", f"--quantization {q}", dtype="bfloat16", gen=8,
                           timeout_s=180) for q in ("fp8", "rtn4", "awq"))),
    Entry("quant-opt30b-4bit-vs-flexgen",
          "OPT-30B with 4-bit weights at FlexGen's policy (CPU attention, 16x3): the fused-kernel rtn4 path and "
          "the unpack-to-fp16 --compress-weight path against FlexGen 0.1.8 --compress-weight, same call",
          "1 GPU", 560,
          (throughput("opt-30b", OPT30B_POLICY, "16x3", f"{CCC} --quantization rtn4 --quant-group-size 64",
                      timeout_s=170),
           throughput("opt-30b", OPT30B_POLICY, "16x3", f"{CCC} --compress-weight", timeout_s=170),
           flexgen("opt-30b", OPT30B_POLICY, "16x3", f"{CCC} --compress-weight", timeout_s=220)),
          wheels=FLEXGEN_WHEELS, peer=FLEXGEN_PEER),
    Entry("quant-opt175b-4bit-one-gpu",
          "OPT-175B on one GPU with 4-bit weights (40% on the GPU, 60% in CPU memory, batch 8): the fused 4-bit "
          "kernel (rtn4, group 64) against the unpack-to-fp16 --compress-weight path (the recorded figure's), same "
          "call",
          "1 GPU", 420,
          (throughput("opt-175b", "40 60 100 0 100 0", "8x1", "--compress-weight", gen=8, timeout_s=200),
           throughput("opt-175b", "40 60 100 0 100 0", "8x1", "--quantization rtn4 --quant-group-size 64", gen=8,
                      timeout_s=200))),
    Entry("quant-serving-fp8-llama3-8b",
          "The REFERENCE serving batch (Llama-3-8B, 256 requests) with fp8 weights and an fp8 KV cache against "
          "bf16, through HTTP, same call",
          "1 GPU", 120,
          (Cmd(f"{REFERENCE_SERVE} --quantization fp8 --kv-cache-dtype fp8", 150), Cmd(REFERENCE_SERVE, 150))),
    Entry("quant-fp8-profile-llama3-8b",
          "Where an fp8 serving step's time goes: Llama-3-8B on the paged engine, 256 sequences of 512 prompt "
          "tokens and 16 generated, fp8 weights and KV against bf16, each profiled over its whole timed block "
          "(the kernels and operators that take the most device time)",
          "1 GPU", 150,
          tuple(Cmd("flexserve bench throughput --engine paged --model dummy:llama-3-8b --dtype bfloat16 "
                    f"--prompt-len 512 --gen-len 16 --gpu-batch-size 256 --json {flags}--profile "
                    f"{{out}}/{name}_paged_trace.json", 200)
                for name, flags in (("fp8", "--quantization fp8 --kv-cache-dtype fp8 "), ("bf16", ""))),
          writes=("fp8_paged_trace.json", "bf16_paged_trace.json")),
    # --- mixtures of experts under a 24 GiB GPU cap (Mixtral shapes, random bf16 weights) ------------------
    Entry("moe-mixtral-8x7b-cap24-batch1",
          "Mixtral-8x7B bf16 with dense weights and one expert per layer on the GPU (24 GiB cap): batch-1 decode "
          "with each expert off the GPU copied in or computed on the CPU by the cost rule, against the bound of "
          "that placement; the planner's plan under the same cap",
          "1 GPU", 420,
          (Cmd("flexserve plan --model dummy:mixtral-8x7b --gpu-mem 24GiB --cpu-mem 110GiB --dtype bfloat16 "
               "--prompt-len 128 --gen-len 32", 120),
           Cmd(f"{MOE_BATCH1} --expert-compute auto", 300))),
    Entry("moe-mixtral-8x7b-cap24-rules",
          "The same batch-1 Mixtral-8x7B run with every off-GPU expert copied in, then every one computed on the "
          "CPU: how the rule's choice compares with each side",
          "1 GPU", 560,
          (Cmd(f"{MOE_BATCH1} --expert-compute copy", 280), Cmd(f"{MOE_BATCH1} --expert-compute cpu", 280))),
    Entry("moe-mixtral-8x7b-large-block",
          "Mixtral-8x7B bf16, experts on the CPU, a 64x4 block with CPU attention: decode throughput against the "
          "PCIe bound of the experts a step reaches",
          "1 GPU", 580,
          (Cmd("flexserve bench throughput --model dummy:mixtral-8x7b --dtype bfloat16 --percent 20 80 0 100 100 0 "
               "--gpu-batch-size 64 --num-gpu-batches 4 --cpu-cache-compute --prompt-len 512 --gen-len 32 --json",
               570),)),
    Entry("moe-accelerate-peer-mixtral-8x7b",
          "Hugging Face Accelerate device_map offloading of the same Mixtral-8x7B shape under the 24 GiB cap: "
          "batch-1 decode (the peer of moe-mixtral-8x7b-cap24-batch1)",
          "1 GPU", 500,
          (Cmd("python bench/peer_accelerate_moe.py --preset mixtral-8x7b --gpu-mem 24GiB --cpu-mem 110GiB "
               "--prompt-len 128 --gen-len 16", 480),),  # ~6 s a token: gen 16 keeps the call short
          peer="Accelerate device_map='auto' (bench/peer_accelerate_moe.py)"),
    Entry("moe-mixtral-8x22b-4bit",
          "Mixtral-8x22B (141B parameters, larger than GPU plus host memory at bf16) end to end with 4-bit "
          "weights, batch 1",
          "1 GPU", 500,
          (Cmd("flexserve bench throughput --model dummy:mixtral-8x22b --dtype bfloat16 --compress-weight "
               "--percent 20 80 100 0 100 0 --gpu-batch-size 1 --prompt-len 128 --gen-len 16 --expert-compute copy "
               "--json", 480),)),
    # ----------------------------------------------------------------------------- checks of the runner itself
    Entry("cpu-smoke-throughput",
          "Does the offline throughput benchmark run end to end on a CPU (a tiny OPT, a few tokens)",
          "cpu", 15,
          (Cmd("flexserve bench throughput --model dummy:opt-125m --device cpu --dtype float32 --prompt-len 16 "
               "--gen-len 4 --percent 100 0 100 0 100 0 --gpu-batch-size 2 --num-gpu-batches 1 --h2d-gbps 10 "
               "--json", 120),)),
]

BY_NAME = {e.name: e for e in ENTRIES}
