#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR — the one prepared command for a lent GPU machine (no network).
#
# It builds deltakern._C against the torch it finds, runs the `gpu` tests, then a short CUDA
# benchmark, and writes everything into OUTDIR:
#   env.json          python/torch/CUDA/device, the versions found and the minima pyproject.toml asks
#   build_command.txt the build command line, exactly as run (also when the build is skipped)
#   build.log         its output (pip -v: every compiler line); info.txt: `deltakern info` after it
#   collect.txt       the selected `gpu` tests (pytest --collect-only -q)
#   pytest.log, junit.xml        the `gpu` tests
#   bench/, bench-e2e/           `deltakern bench --device cuda --quick --no-compile`: CSVs, PNGs,
#                                summary.json, each with its .log
#   steps.tsv         step, status, seconds, seconds allowed, exit code
#   summary.txt       what ran, what passed, what was skipped or trimmed and why (printed at the end)
#   gpu_check.json    the same, for machines
#
# Steps, in order; the ones that need no GPU come first so that a CPU run exercises them:
#   1. probe     versions (torch, triton, transformers, peft, bitsandbytes, pytest plugins) against
#                pyproject.toml's minima; the CUDA device and its compute capability
#   2. build     DELTAKERN_CUDA_ARCHS=<device's sm> MAX_JOBS=$(nproc) \
#                  python3 -m pip install -v --no-build-isolation --no-deps --no-index -e .
#                (only if pip stops before setup.py runs: python3 setup.py build_ext --inplace)
#   3. import    deltakern._C loads, with CUDA kernels; `deltakern info` > info.txt
#   4. collect   pytest -m gpu --collect-only over the test files that carry the gpu marker
#   5. GPU gate  no CUDA device: say so and exit 3 (the steps above have run)
#   6. tests     pytest -m gpu, -n <cores> with pytest-xdist, --timeout per test with pytest-timeout
#   7. bench     deltakern bench --device cuda --quick --no-compile over every op; then the
#                end-to-end suites (transformers + PEFT) if time is left; with a transformers/PEFT
#                older than pyproject.toml asks they run as best effort (failures listed, not counted)
#
# Why pip and not `setup.py build_ext --inplace`: pip is the install the README documents, and
# with --no-build-isolation --no-deps it needs no network, builds against the torch it finds and
# registers deltakern (metadata, the `deltakern` script). --no-index makes that certain: pip never
# waits on an index it cannot reach. `setup.py build_ext --inplace` is kept as the fallback for a
# pip that fails before it runs setup.py (no editable support, say); a compile error is not retried.
#
# Time budget: 8 minutes (DELTAKERN_GPU_CHECK_BUDGET_S=480) on 16 cores and an H100/H200. Estimates
# (no GPU has run this yet; from this repo's ninja log on 2 cores and the test and kernel counts):
#   probe + import + collect   ~20 s
#   build, one arch (sm_90)     ~90 s: 26 sources (19 C++ files with torch headers, ~15-30 s each,
#                               7 .cu files for one arch, prefix_attention.cu the longest at
#                               ~40-70 s), MAX_JOBS=16, so about the longest file plus the link
#   gpu tests                   ~150-200 s: 810 instances (378 Triton, 432 CUDA-extension), -n 16;
#                               the Triton ones dominate: every autotune config is compiled per
#                               specialisation (dtype, constexprs, alignment) and timed (~0.13 s)
#                               per new size; the CUDA ones take milliseconds
#   bench, ops                  ~60-90 s: 9 quick cases (the 7 ops), 1 warm-up + 3 repeats,
#                               without torch.compile of the reference (10-40 s per case alone)
#   bench, end-to-end           ~60 s: 9 methods + the multi-adapter step on tiny Llama models;
#                               run only when at least DELTAKERN_GPU_CHECK_E2E_MIN_S (75 s) remain
#   total                       ~6-7.5 min
# How it fits: every step runs under `timeout` against one deadline (start + budget) with time
# held back for the steps after it; a step cut short is marked "timeout" in steps.tsv and
# summary.txt, pytest is stopped with SIGINT so junit.xml is still written. Without pytest-xdist
# the Triton fp32 tests are deselected (the interpreter runs those kernels in fp32 in CI and the
# AOT tests compile them for sm_90); with it, all 810 run.
#
# Exit status: 0 all ran and passed; 1 a test or a benchmark check failed; 2 setup failed (bad
# arguments, no python/torch, build failed, deltakern._C unusable); 3 no CUDA device (after the
# steps that need none); 4 nothing failed but a step was cut short by the time budget.
#
# Environment:
#   DELTAKERN_GPU_CHECK_PYTHON      interpreter (default python3)
#   DELTAKERN_GPU_CHECK_SKIP_BUILD=1  do not build (deltakern._C already built); build_command.txt
#                                   is still written. The CPU dry run of tests/test_gpu_check.py uses it.
#   DELTAKERN_GPU_CHECK_BUDGET_S    total seconds (default 480)
#   DELTAKERN_GPU_CHECK_BUILD_MAX_S the build's own limit (default 300)
#   DELTAKERN_GPU_CHECK_TEST_TIMEOUT  per-test timeout with pytest-timeout (default 120)
#   DELTAKERN_GPU_CHECK_E2E_MIN_S   seconds that must be left to start the end-to-end bench (default 75)
#   DELTAKERN_GPU_CHECK_FULL=1      keep the Triton fp32 tests even without pytest-xdist
#   DELTAKERN_CUDA_ARCHS            override the archs read from the device (no device: 90)
#   MAX_JOBS                        override $(nproc)
#
# On a lent machine whose results come back through $OUT (8 files at most), e.g.:
#   bench/gpu_check.sh /tmp/gpu-check; tar -czf "$OUT/gpu-check.tgz" -C /tmp gpu-check
set -u -o pipefail

if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2

PY=${DELTAKERN_GPU_CHECK_PYTHON:-python3}
BUDGET_S=${DELTAKERN_GPU_CHECK_BUDGET_S:-480}
TEST_TIMEOUT=${DELTAKERN_GPU_CHECK_TEST_TIMEOUT:-120}
E2E_MIN_S=${DELTAKERN_GPU_CHECK_E2E_MIN_S:-75}
BUILD_MAX_S=${DELTAKERN_GPU_CHECK_BUILD_MAX_S:-300}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
STEPS="$OUTDIR/steps.tsv"
printf 'step\tstatus\tseconds\tallowed_s\trc\n' >"$STEPS"
: >"$OUTDIR/skipped.txt"

say() { echo "gpu_check [$(($(date +%s) - START))s]: $*"; }
skip() { printf '%s\t%s\n' "$1" "$2" >>"$OUTDIR/skipped.txt"; say "skipped $1: $2"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STEPS"; }

# run_step NAME CAP_S RESERVE_S LOG CMD...: CMD under `timeout`, allowed min(CAP_S, time to the
# deadline less RESERVE_S kept for later steps); output to LOG; records the step; returns its rc.
run_step() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    local now left allowed t0 rc status
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    allowed=$((cap < left ? cap : left))
    if [ "$allowed" -lt 10 ]; then
        record "$name" "no-time" 0 "$allowed" ""
        skip "$name" "time budget spent (${BUDGET_S}s)"
        return 124
    fi
    say "$name (up to ${allowed}s) -> ${log#"$OUTDIR"/}"
    t0=$(date +%s)
    timeout -s INT -k 20 "$allowed" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" $(($(date +%s) - t0)) "$allowed" "$rc"
    say "$name: $status (rc $rc, $(($(date +%s) - t0))s)"
    return $rc
}

finish() {  # finish EXIT_CODE MESSAGE: summary.txt and gpu_check.json, printed; exit
    local code=$1 message=$2
    "$PY" - "$OUTDIR" "$code" "$message" "$(($(date +%s) - START))" "$BUDGET_S" <<'PYEOF' >"$OUTDIR/summary.txt" 2>&1
import json, os, sys, xml.etree.ElementTree as ET
from collections import Counter

out, code, message, wall, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def read(name):
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except OSError:
        return None
env = json.loads(read("env.json") or "{}")
report = {"exit_code": code, "message": message, "wall_s": int(wall), "budget_s": int(budget), "env": env}
print(f"gpu_check: exit {code}: {message}")
print(f"wall {wall} s of a {budget} s budget")
if env:
    dev = env.get("device") or "none"
    print(f"device: {dev}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); python {env.get('python')}")
    print("versions (found / pyproject.toml asks):")
    for name, v in env.get("versions", {}).items():
        need = env.get("minima", {}).get(name)
        flag = "  <-- OLDER" if name in env.get("too_old", {}) else ""
        print(f"  {name:<16} {v or 'missing':<14} {('>=' + need) if need else ''}{flag}")
steps = [line.split("\t") for line in (read("steps.tsv") or "").splitlines()[1:] if line]
report["steps"] = [dict(zip(("step", "status", "seconds", "allowed_s", "rc"), s)) for s in steps]
print("steps:")
for s in steps:
    print(f"  {s[0]:<18} {s[1]:<9} {s[2]:>4} s" + (f" (allowed {s[3]} s)" if s[3] else ""))
skipped = [line.split("\t", 1) for line in (read("skipped.txt") or "").splitlines() if line]
report["skipped"] = [{"what": w, "why": y} for w, y in skipped]
if skipped:
    print("skipped or trimmed:")
    for what, why in skipped:
        print(f"  {what}: {why}")
collected = read("collect.txt")
if collected is not None:
    report["collected"] = sum("::" in line for line in collected.splitlines())
    print(f"gpu tests selected: {report['collected']}")
junit = read("junit.xml")
if junit:
    try:
        root = ET.fromstring(junit)
        cases = list(root.iter("testcase"))
        outcome = Counter()
        reasons, failed = Counter(), []
        for case in cases:
            kinds = [child.tag for child in case]
            name = f"{case.get('classname')}::{case.get('name')}"
            if "failure" in kinds or "error" in kinds:
                outcome["failed"] += 1
                failed.append(name)
            elif "skipped" in kinds:
                outcome["skipped"] += 1
                reasons[case.find("skipped").get("message", "")[:160]] += 1
            else:
                outcome["passed"] += 1
        report["tests"] = dict(outcome, failed_names=failed, skip_reasons=dict(reasons))
        print(f"gpu tests: {outcome['passed']} passed, {outcome['failed']} failed, {outcome['skipped']} skipped")
        for reason, n in reasons.most_common():
            print(f"  skipped x{n}: {reason}")
        for name in failed[:40]:
            print(f"  FAILED {name}")
        if len(failed) > 40:
            print(f"  ... and {len(failed) - 40} more (junit.xml)")
    except ET.ParseError as error:
        print(f"junit.xml unreadable: {error}")
for folder in ("bench", "bench-e2e"):
    text = read(os.path.join(folder, "summary.json"))
    if text is None:
        continue
    bench = json.loads(text)
    results = bench.get("results", [])
    bad = [f"{r['op']} {r['provider']} {r['shape']}" for r in results if r.get("check") != "ok"]
    report[folder] = {"cases": len(results), "failed": bench.get("failed"), "wall_s": bench.get("wall_s"), "failed_names": bad}
    print(f"{folder}: {len(results)} (op, shape, provider) results, {bench.get('failed')} failed, {bench.get('wall_s')} s")
    for name in bad:
        print(f"  FAIL {name}")
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
PYEOF
    cat "$OUTDIR/summary.txt"
    if [ "$code" -eq 0 ]; then say "$message"; else say "$message" >&2; fi
    exit "$code"
}

# ---- 1. probe ---------------------------------------------------------------------------------
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no python interpreter '$PY' (set DELTAKERN_GPU_CHECK_PYTHON)" >&2
    exit 2
fi
NPROC=$(nproc 2>/dev/null || echo 4)
t0=$(date +%s)
if ! "$PY" - "$OUTDIR/env.json" "$NPROC" <<'PYEOF' >"$OUTDIR/probe.log" 2>&1; then
import importlib.metadata as md, json, os, platform, re, sys

path, nproc = sys.argv[1], int(sys.argv[2])
try:
    import tomllib
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
except ModuleNotFoundError:  # python 3.10: read the requirement strings directly
    with open("pyproject.toml") as f:
        specs = re.findall(r'"([A-Za-z0-9_.-]+>=[0-9][^"]*)"', f.read())
minima = {}
for spec in specs:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", spec)
    if m:
        name = m.group(1).lower()
        minima[name] = max(minima.get(name, "0"), m.group(2), key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v)))
def parse(v):
    try:
        from packaging.version import Version
        return Version(v)
    except Exception:
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
names = ["torch", "triton", "transformers", "peft", "bitsandbytes", "numpy", "matplotlib", "setuptools",
         "ninja", "pytest", "pytest-timeout", "pytest-xdist"]
versions, too_old = {}, {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
    need = minima.get(name)
    if need and versions[name] and parse(versions[name]) < parse(need):
        too_old[name] = f"{versions[name]} < {need}"
import torch
env = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "nproc": nproc, "versions": versions, "minima": minima,
       "too_old": too_old, "cuda_available": torch.cuda.is_available(), "device": None, "capability": None}
if env["cuda_available"]:
    major, minor = torch.cuda.get_device_capability(0)
    env["device"] = torch.cuda.get_device_name(0)
    env["capability"] = f"{major}{minor}"
with open(path, "w") as f:
    json.dump(env, f, indent=1)
# The same, as shell assignments for the script (env.sh).
import shlex
hf_old = [f"{k} {too_old[k]}" for k in ("transformers", "peft") if k in too_old]
shell = {"TORCH": torch.__version__, "TORCH_CUDA": torch.version.cuda or "none", "DEVICE": env["device"] or "none",
         "CUDA_OK": int(env["cuda_available"]), "CAPABILITY": env["capability"] or "",
         "HF_OLD": "; ".join(hf_old), "HF_MISSING": " ".join(k for k in ("transformers", "peft") if not versions[k]),
         "HF_MINIMA": f"transformers>={minima.get('transformers')}, peft>={minima.get('peft')}",
         "BNB": int(bool(versions["bitsandbytes"])), "XDIST": int(bool(versions["pytest-xdist"])),
         "PTIMEOUT": int(bool(versions["pytest-timeout"])), "MPL": int(bool(versions["matplotlib"]))}
with open(path[:-len("json")] + "sh", "w") as f:
    f.writelines(f"{k}={shlex.quote(str(v))}\n" for k, v in shell.items())
print(json.dumps(env))
PYEOF
    record probe failed $(($(date +%s) - t0)) "" 1
    cat "$OUTDIR/probe.log" >&2
    finish 2 "the probe failed (is torch installed for $PY?): see probe.log"
fi
record probe ok $(($(date +%s) - t0)) "" 0
# shellcheck disable=SC1091
. "$OUTDIR/env.sh"
say "torch $TORCH (CUDA $TORCH_CUDA); device: $DEVICE${CAPABILITY:+ (sm_$CAPABILITY)}; $NPROC cores"
HF_WHY="${HF_OLD}${HF_MISSING:+${HF_OLD:+; }missing: $HF_MISSING}"
if [ -n "$HF_WHY" ]; then say "transformers/PEFT: $HF_WHY (pyproject.toml asks $HF_MINIMA)"; fi

# ---- 2. build ---------------------------------------------------------------------------------
if [ -n "${DELTAKERN_CUDA_ARCHS:-}" ]; then
    ARCHS=$DELTAKERN_CUDA_ARCHS
elif [ "$CUDA_OK" = 1 ]; then
    ARCHS=$CAPABILITY
else
    ARCHS=90  # no device: the H100/H200 class this script is for
fi
JOBS=${MAX_JOBS:-$NPROC}
BUILD_CMD=("$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .)
FALLBACK_CMD=("$PY" setup.py build_ext --inplace)
echo "DELTAKERN_CUDA_ARCHS=$ARCHS MAX_JOBS=$JOBS ${BUILD_CMD[*]}" >"$OUTDIR/build_command.txt"
if [ "${DELTAKERN_GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    record build skipped 0 "" ""
    skip build "DELTAKERN_GPU_CHECK_SKIP_BUILD=1: the deltakern._C already there is used"
else
    # BUILD_MAX_S (300 s) at most; the tests and the bench keep 150 s even if the build runs long.
    DELTAKERN_CUDA_ARCHS=$ARCHS MAX_JOBS=$JOBS run_step build "$BUILD_MAX_S" 150 "$OUTDIR/build.log" "${BUILD_CMD[@]}"
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && ! grep -q "deltakern: CUDA kernels" "$OUTDIR/build.log"; then
        say "pip stopped before setup.py ran: falling back to ${FALLBACK_CMD[*]}"
        echo "DELTAKERN_CUDA_ARCHS=$ARCHS MAX_JOBS=$JOBS ${FALLBACK_CMD[*]}" >>"$OUTDIR/build_command.txt"
        DELTAKERN_CUDA_ARCHS=$ARCHS MAX_JOBS=$JOBS run_step build-inplace "$BUILD_MAX_S" 150 "$OUTDIR/build-inplace.log" "${FALLBACK_CMD[@]}"
        rc=$?
    fi
    if [ $rc -ne 0 ]; then
        tail -n 30 "$OUTDIR"/build*.log >&2
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            finish 2 "building deltakern._C did not finish in the time allowed (steps.tsv): see build.log"
        fi
        finish 2 "building deltakern._C failed (rc $rc): see build.log"
    fi
fi

# ---- 3. import --------------------------------------------------------------------------------
t0=$(date +%s)
"$PY" - >"$OUTDIR/info.txt" 2>&1 <<'PYEOF'
import sys
from deltakern import _native
from deltakern.cli import main
main(["info"])
if _native.C is None:
    sys.exit(5)
sys.exit(0 if _native.has_cuda_kernels() else 6)
PYEOF
rc=$?
record import "$([ $rc -eq 0 ] && echo ok || echo "rc$rc")" $(($(date +%s) - t0)) "" $rc
case $rc in
    0) say "deltakern._C loaded with CUDA kernels ($(grep -o 'archs: [^)]*' "$OUTDIR/info.txt"))" ;;
    6) skip cuda-backend "deltakern._C has no CUDA kernels (see info.txt): the cuda-backend tests will fail" ;;
    *) cat "$OUTDIR/info.txt" >&2; finish 2 "deltakern._C does not load (rc $rc): see info.txt" ;;
esac

# ---- 4. collect -------------------------------------------------------------------------------
mapfile -t GPU_FILES < <(grep -rlE "pytest\.mark\.gpu" tests --include='*.py' | sort)
IGNORE=()
if [ -n "$HF_WHY" ]; then
    # deltakern's model surgery is tested against transformers/PEFT from pyproject.toml's minima on.
    for f in $(grep -lE "^\s*(import|from) (transformers|peft)\b" "${GPU_FILES[@]}" /dev/null); do
        IGNORE+=("--ignore=$f")
        skip "$f" "imports transformers/PEFT: $HF_WHY (pyproject.toml asks $HF_MINIMA)"
    done
fi
SELECT=()
if [ "$XDIST" != 1 ] && [ "${DELTAKERN_GPU_CHECK_FULL:-0}" != 1 ]; then
    SELECT=(-k "not (triton and float32)")
    skip "Triton fp32 gpu tests" "no pytest-xdist: one process cannot run all the gpu tests in time; the interpreter runs these kernels in fp32 in CI"
fi
PYTEST=("$PY" -m pytest -m gpu -p no:cacheprovider "${GPU_FILES[@]}" "${IGNORE[@]}" "${SELECT[@]}")
run_step collect 120 0 "$OUTDIR/collect.txt" "${PYTEST[@]}" --collect-only -q
rc=$?
if [ $rc -ne 0 ]; then
    # A file that fails to import is left out (and listed); the rest still runs.
    while read -r f; do
        IGNORE+=("--ignore=$f")
        skip "$f" "collection error: $(grep -m1 -A3 "ERROR collecting $f" "$OUTDIR/collect.txt" | grep -m1 -E "Error|error" | cut -c1-200)"
    done < <(grep -oE "^ERROR [^ ]+\.py" "$OUTDIR/collect.txt" | cut -d' ' -f2 | sort -u)
    PYTEST=("$PY" -m pytest -m gpu -p no:cacheprovider "${GPU_FILES[@]}" "${IGNORE[@]}" "${SELECT[@]}")
fi
say "$(grep -c '::' "$OUTDIR/collect.txt") gpu tests selected in ${#GPU_FILES[@]} files"

# ---- 5. GPU gate ------------------------------------------------------------------------------
if [ "$CUDA_OK" != 1 ]; then
    record gpu-gate no-device 0 "" 3
    finish 3 "no CUDA device: torch $TORCH sees none (torch.cuda.is_available() is False). Probe, build, import and collection ran; the gpu tests and the CUDA benchmark need a GPU."
fi

# ---- 6. gpu tests -----------------------------------------------------------------------------
RUN=("${PYTEST[@]}" -q -rfE --junitxml="$OUTDIR/junit.xml")
if [ "$XDIST" = 1 ]; then
    RUN+=(-n "$NPROC")
    export OMP_NUM_THREADS=1  # one CPU thread per worker for the fp64 references
fi
if [ "$PTIMEOUT" = 1 ]; then
    RUN+=(--timeout="$TEST_TIMEOUT")
else
    skip "per-test timeout" "pytest-timeout not installed: only the wall-clock limit of the whole run applies"
fi
# 300 s at most; the benchmark keeps 100 s.
run_step tests 300 100 "$OUTDIR/pytest.log" "${RUN[@]}"
TEST_RC=$?
unset OMP_NUM_THREADS
[ -f "$OUTDIR/pytest.log" ] && tail -n 3 "$OUTDIR/pytest.log"

# ---- 7. bench ---------------------------------------------------------------------------------
BENCH_RC=0
if [ "$MPL" != 1 ]; then
    skip bench "matplotlib missing: deltakern bench draws its charts with it"
else
    read -r OPS E2E <<<"$("$PY" -c 'from deltakern import cli; e = list(cli.E2E_SUITES); print(",".join(n for n in cli._suite_names() if n not in e), ",".join(e))')"
    if [ "$BNB" != 1 ]; then
        skip "bench qlora reference" "bitsandbytes missing: qlora's reference is dequantise-then-matmul, not bnb.matmul_4bit"
    fi
    run_step bench 240 0 "$OUTDIR/bench.log" "$PY" -m deltakern.cli bench --device cuda --quick --no-compile \
        --ops "$OPS" --out "$OUTDIR/bench"
    BENCH_RC=$?
    E2E_ARGS=()
    E2E_STEP=bench-e2e
    if [ -n "$HF_MISSING" ]; then
        skip "bench $E2E" "the end-to-end suites build models with transformers and PEFT: missing $HF_MISSING"
        E2E=""
    elif [ -n "$HF_OLD" ]; then
        # Tried all the same, last: a failure is listed but does not fail the check (exit status).
        E2E_STEP=bench-e2e-untested
        skip "bench $E2E" "$HF_OLD (pyproject.toml asks $HF_MINIMA): run as best effort, its failures do not set the exit status"
    fi
    if [ -n "$E2E" ] && [ "$BNB" != 1 ]; then
        # The one e2e method whose reference is bitsandbytes' Linear4bit: leave it out, keep the rest.
        "$PY" - "$OUTDIR/e2e_shapes.json" <<'PYEOF'
import dataclasses, json, sys
from deltakern.benchmark import e2e
shapes = [dataclasses.asdict(s) for s in e2e.E2E_QUICK_SHAPES if s.method != "qlora"]
json.dump({"e2e": shapes}, open(sys.argv[1], "w"))
PYEOF
        E2E_ARGS=(--shapes "$OUTDIR/e2e_shapes.json")
        skip "bench e2e qlora" "bitsandbytes missing: PEFT's QLoRA reference is bitsandbytes' Linear4bit"
    fi
    if [ -n "$E2E" ]; then
        if [ $((DEADLINE - $(date +%s))) -lt "$E2E_MIN_S" ]; then
            record bench-e2e skipped 0 "" ""  # optional: not counted as cut short (exit 4)
            skip "bench $E2E" "fewer than ${E2E_MIN_S}s left of the budget"
        else
            run_step "$E2E_STEP" 240 0 "$OUTDIR/bench-e2e.log" "$PY" -m deltakern.cli bench --device cuda --quick \
                --no-compile --ops "$E2E" "${E2E_ARGS[@]}" --out "$OUTDIR/bench-e2e"
            rc=$?
            [ "$E2E_STEP" = bench-e2e ] && [ $BENCH_RC -eq 0 ] && BENCH_RC=$rc
        fi
    fi
fi

# ---- summary ----------------------------------------------------------------------------------
if grep -v "^bench-e2e-untested" "$STEPS" | grep -qE $'\tfailed\t' || { [ $TEST_RC -ne 0 ] && [ $TEST_RC -ne 124 ] && [ $TEST_RC -ne 137 ]; }; then
    finish 1 "failures: gpu tests rc $TEST_RC, bench rc $BENCH_RC (summary.txt, junit.xml, bench*.log)"
elif grep -v "^bench-e2e-untested" "$STEPS" | grep -qE $'\t(timeout|no-time)\t'; then
    finish 4 "nothing failed, but the time budget cut a step short (steps.tsv)"
fi
finish 0 "all steps ran and passed"
