# Sourced by the bench/device_*.sh scripts: environment of the GPU machine. Python packages the machine lacks
# travel as wheels in .whl/ (see the README's "Benchmarks on a GPU machine"); they go to /tmp/site.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
WHEELS=$(ls .whl 2>/dev/null | md5sum | cut -c1-32)
if [ -d .whl ] && [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && echo "$WHEELS" > /tmp/site/.wheels
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() {
  local t0=$SECONDS; echo "=== $*"
  timeout ${T:-400} "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|placing weights\|requests:" | tail -${TAIL:-12}
  echo "--- $((SECONDS - t0)) s"
}
