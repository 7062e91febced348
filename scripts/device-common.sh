# Sourced by the device scripts (scripts/device-*.sh) on a GPU machine where vLLM 0.26.0 is staged in
# /tmp/site (../shared/device/README.md). Sets up the call (pydantic from the carried .whl, this
# checkout installed for its entry points) and defines `left`, `engine_lines`, `step` and `run_steps`.
#   DONE_DIR  where finished steps are marked (a step runs once per warm machine)
#   budget    seconds this call may use (set before sourcing)
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
# An engine's output without vLLM's INFO and WARNING log lines, keeping the plugin's and vLLM's errors during
# inference (a filter: `python3 ... 2>&1 | engine_lines | tee LOG`)
engine_lines() { awk '/vllm-sparse|during inference/ || !/^\[.*\] .*(WARNING|INFO)/'; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "${DONE_DIR:?}"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -d .whl ] && [ ! -f /tmp/site/.pydantic-installed ]; then  # (the staged vLLM 0.26 brings pydantic 2.14)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.pydantic-installed || { echo "pydantic wheels: install failed"; exit 1; }
fi
# (import vllm_sparse would succeed from the checkout's root without an install: ask for the entry point)
if ! (cd /tmp && python3 -c "import sys; from importlib.metadata import entry_points as e; sys.exit(not [p for p in e(group='vllm.general_plugins') if p.value == 'vllm_sparse.plugin:register'])"); then
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, vllm, vllm_sparse; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__, 'gpus', torch.cuda.device_count())"

step() {  # step NAME NEEDED_SECONDS COMMAND...
  local name=$1 need=$2; shift 2
  if [ -f "$DONE_DIR/$name" ]; then echo "== $name: done in an earlier call"; return; fi
  local l=$(left)
  if [ "$l" -lt "$need" ]; then echo "== $name: skipped, $l s left < $need s"; return; fi
  echo "== $name: start ($l s left) $(date -u +%T)"
  local t0=$(date +%s)
  "$@"; local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
  # Run once, pass or fail: its output came back with this call. A step its timeout cut (124) ran only in part
  # (2026-12-04: gtest cut after 4 of 6 tests was then skipped as done): the next call runs it once more, and
  # then marks it done whatever happens (a step that cannot fit in a call must not hold back the steps after it).
  # (A step function returns its timed pipeline's status only if that pipeline is its last command.)
  if [ $rc -eq 124 ] && [ ! -f "$DONE_DIR/$name.cut" ]; then
    touch "$DONE_DIR/$name.cut"; echo "== $name: cut by its timeout, not marked done: the next call runs it again"
    return
  fi
  touch "$DONE_DIR/$name"
}

run_steps() {  # run_steps "NAME:NEEDED_SECONDS ..." STEP...: each named step runs the function of its name
  local table=$1 s need; shift
  for s in "$@"; do
    need=$(tr ' ' '\n' <<< "$table" | sed -n "s/^$s:\([0-9]*\)$/\1/p")
    [ -n "$need" ] || { echo "unknown step $s (steps: $table)"; exit 2; }
    step "$s" "$need" "$s"
  done
  echo "== end: $(left) s left of $budget"
}
