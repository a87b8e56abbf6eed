#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU, in a fresh copy of this repository, with
# whatever torch is installed there (no venv or internet needed):
#
#   1. env      what is there: GPU, torch, nvcc, the Python packages the phases use (a
#               missing one is pip-installed if a registry answers, else its phase degrades
#               and says so);
#   2. build    the extension from source, in place, with its CUDA kernels
#               (CURVX_CUDA=1, for this GPU's architecture only);
#   3. tests    the CUDA tests: every kernel against the CPU reference, opcheck on CUDA
#               tensors (`pytest tests -m cuda`);
#   4. kernels  bench/test_bench_kernels.py's CUDA rows: each kernel against its ATen
#               composite on the GPU;
#   5. gpu      bench/test_bench_gpu.py: ResNet-18 tracking overhead, block HVPs and a
#               cold top-5 with the convergence test every block vs every 4th;
#   6. summary  summary.md and summary.json from everything above.
#
# Usage: bench/gpu_check.sh [RESULTS_DIR]   (default: $OUT, else bench/results/gpu)
# Every phase has a hard time cap, and the whole run stops starting phases past
# GPU_CHECK_BUDGET_S (default 450 s), so it ends within 8 minutes. A failing phase is
# recorded and the next one still runs; the exit status is 0 when every phase passed.
# Files written (flat): env.txt build.log tests.log bench.log kernels.json gpu.json, their
# finished rows as kernels.partial.jsonl gpu.partial.jsonl (kept when a phase hits its cap),
# summary.json summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RESULTS=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PHASES="$RESULTS/.phases"  # name rc seconds note, one line per phase
: >"$PHASES"

log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# run_phase NAME CAP_S LOGFILE CMD...: runs CMD under `timeout`, capped by CAP_S and by
# what is left of the budget; appends its output to LOGFILE and a line to $PHASES.
run_phase() {
    local name=$1 cap=$2 logfile=$3
    shift 3
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        log "$name: skipped, ${left}s left of the ${BUDGET_S}s budget"
        echo "$name 125 0 skipped: out of time" >>"$PHASES"
        return 0
    fi
    log "$name: up to ${limit}s"
    echo "=== $name (limit ${limit}s): $*" >>"$logfile"
    local t0 rc=0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1 || rc=$?
    local dt=$(($(date +%s) - t0)) note=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note="timed out after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        note="failed (exit $rc)"
    fi
    echo "$name $rc $dt $note" >>"$PHASES"
    log "$name: $note in ${dt}s"
}

# ------------------------------------------------------------------ 1. env
ENV_TXT="$RESULTS/env.txt"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(uname -a)"
    echo "python: $($PY --version 2>&1) ($(command -v "$PY"))"
    echo "cores: $(getconf _NPROCESSORS_ONLN)"
    echo "nvcc: $(command -v nvcc || echo "not on PATH") ${CUDA_HOME:+(CUDA_HOME=$CUDA_HOME)}"
    (nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>/dev/null) | tail -n 2
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
} >"$ENV_TXT" 2>&1
if ! $PY - >>"$ENV_TXT" 2>&1 <<'EOF'; then
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"gpu: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
EOF
    log "no usable torch with CUDA here (see $ENV_TXT)"
    echo "env 1 0 no torch with CUDA" >>"$PHASES"
fi

missing_modules() {
    $PY - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MODULES="pytest pytest_benchmark numpy scipy tqdm setuptools torchvision"
MISSING=$(missing_modules $MODULES) || MISSING=$MODULES
# ninja (the binary) makes the build parallel; without it torch compiles file by file
command -v ninja >/dev/null 2>&1 || MISSING="$MISSING ninja"
MISSING=${MISSING# }
if [ -n "$MISSING" ]; then
    log "missing Python modules: $MISSING; trying pip (fails fast without a registry)"
    PKGS=$(echo "$MISSING" | sed 's/pytest_benchmark/pytest-benchmark/')
    # torchvision is not installed here: a wheel from a registry could pull another torch
    PKGS=$(echo "$PKGS" | sed 's/torchvision//')
    if [ -n "${PKGS// /}" ]; then
        timeout 60 $PY -m pip install -q --disable-pip-version-check --timeout 5 \
            --retries 0 $PKGS >>"$ENV_TXT" 2>&1 || log "pip could not install: $PKGS"
    fi
    MISSING=$(missing_modules $MODULES) || MISSING=$MODULES
    command -v ninja >/dev/null 2>&1 || MISSING="$MISSING ninja"
    MISSING=${MISSING# }
fi
echo "python modules missing: ${MISSING:-none}" >>"$ENV_TXT"
has() { case " $MISSING " in *" $1 "*) return 1 ;; *) return 0 ;; esac }
has torchvision || log "torchvision missing: the GPU rows build ResNet-18 inline"

# ---------------------------------------------------------------- 2. build
BUILD_LOG="$RESULTS/build.log"
: >"$BUILD_LOG"
ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' \
    2>/dev/null || echo "9.0")
export CURVX_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(getconf _NPROCESSORS_ONLN)}
rm -f curvx/_C.*.so curvx/_build_info.json
if has setuptools; then
    run_phase build 260 "$BUILD_LOG" $PY setup.py build_ext --inplace
else
    # No setuptools: torch's JIT builder (needs ninja), then the module put in place
    log "setuptools missing: building with torch.utils.cpp_extension.load"
    run_phase build 260 "$BUILD_LOG" $PY - <<'EOF'
import glob, json, os, platform, shutil, sysconfig
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # as setup.py does
import torch
from torch.utils import cpp_extension

sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp")), *sorted(glob.glob("csrc/cuda/*.cu"))]
build = os.path.abspath("build/jit")
os.makedirs(build, exist_ok=True)
cpp_extension.load(
    "_C", sources, build_directory=build, verbose=True,
    extra_cflags=["-O3", "-g0", "-fopenmp", "-DCURVX_WITH_CUDA"],
    extra_cuda_cflags=["-O3", "-Xcompiler", "-g0"], extra_ldflags=["-fopenmp"],
)
suffix = sysconfig.get_config_var("EXT_SUFFIX")
shutil.copy(os.path.join(build, "_C.so"), os.path.join("curvx", "_C" + suffix))
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_kernels": True,
        "builder": "torch.utils.cpp_extension.load", "python": platform.python_version()}
with open("curvx/_build_info.json", "w") as f:
    json.dump(info, f, indent=2)
EOF
fi
if ! $PY -m curvx.info >>"$BUILD_LOG" 2>&1 || ! $PY - >>"$BUILD_LOG" 2>&1 <<'EOF'; then
from curvx import _ops
s = _ops.extension_status()
assert s["loaded"] and s["cuda_kernels"], f"extension not in use with CUDA kernels: {s}"
print("extension loaded with CUDA kernels")
EOF
    log "the extension is not in use with CUDA kernels (see $BUILD_LOG)"
    echo "extension 1 0 not loaded with CUDA kernels" >>"$PHASES"
fi

# ---------------------------------------------------------------- 3. tests
TESTS_LOG="$RESULTS/tests.log"
: >"$TESTS_LOG"
if has pytest; then
    run_phase tests 110 "$TESTS_LOG" $PY -m pytest -q -rs -m cuda -p no:cacheprovider \
        --continue-on-collection-errors tests
else
    echo "pytest is not importable and could not be installed: CUDA tests not run" \
        >>"$TESTS_LOG"
    echo "tests 1 0 not run: no pytest" >>"$PHASES"
fi

# ------------------------------------------------------------ 4-5. benches
BENCH_LOG="$RESULTS/bench.log"
: >"$BENCH_LOG"
# pytest with pytest-benchmark and the bench conftest (numpy, scipy, the harness), or
# the same rows run standalone (torch only)
PYTEST_BENCH=0
if has pytest && has pytest_benchmark && (cd bench && $PY -c "import conftest") \
    >>"$BENCH_LOG" 2>&1; then
    PYTEST_BENCH=1
else
    echo "pytest-benchmark or the bench conftest is not usable: rows run standalone" \
        >>"$BENCH_LOG"
fi
bench() {  # bench NAME CAP FILE.py STANDALONE_MATCH: the file's CUDA rows
    local name=$1 cap=$2 file=$3 match=$4
    if [ "$PYTEST_BENCH" = 1 ]; then
        # finished rows also go to a partial JSONL: a phase stopped by its cap
        # keeps them
        BENCH_PARTIAL="$RESULTS/$name.partial.jsonl" \
            run_phase "$name" "$cap" "$BENCH_LOG" $PY -m pytest -q -rs -p no:cacheprovider \
            "bench/$file" -m cuda --benchmark-json="$RESULTS/$name.json"
    else
        run_phase "$name" "$cap" "$BENCH_LOG" $PY "bench/$file" "$RESULTS/$name.json" \
            --match "$match"
    fi
}
bench kernels 90 test_bench_kernels.py cuda-
bench gpu 160 test_bench_gpu.py ""

# --------------------------------------------------------------- 6. summary
$PY - "$RESULTS" "$(($(date +%s) - START))" <<'EOF' || log "summary failed"
import json, os, re, sys

results, elapsed = sys.argv[1], int(sys.argv[2])
phases = []
with open(os.path.join(results, ".phases")) as f:
    for line in f:
        name, rc, secs, note = line.rstrip("\n").split(" ", 3)
        phases.append({"phase": name, "rc": int(rc), "seconds": int(secs), "note": note})

def read(name):
    try:
        with open(os.path.join(results, name)) as f:
            return f.read()
    except OSError:
        return ""

tests = read("tests.log")
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tests)}
failures = re.findall(r"^(?:FAILED|ERROR) .*$", tests, re.M)

def rows(name):
    try:
        data = json.loads(read(name + ".json"))
    except ValueError:  # stopped by its cap: the rows that finished
        data = {"benchmarks": []}
        for line in read(name + ".partial.jsonl").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "extra_info" in rec:
                data["benchmarks"].append(rec)
    out = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        info["group"] = b.get("group")
        out.append(info)
    return out

kernels, gpu = rows("kernels"), rows("gpu")
floors = [f for r in kernels + gpu for f in r.get("floors", [])]
summary = {
    "elapsed_s": elapsed,
    "phases": phases,
    "tests": {"counts": counts, "failures": failures},
    "kernels": kernels,
    "gpu": gpu,
    "floors": floors,
}
with open(os.path.join(results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)

def fmt(x, spec=".3g"):
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)

lines = [f"# GPU check ({elapsed} s)", "", read("env.txt").strip(), "", "## Phases", "",
         "| phase | exit | seconds | note |", "|---|---|---|---|"]
lines += [f"| {p['phase']} | {p['rc']} | {p['seconds']} | {p['note']} |" for p in phases]
lines += ["", "## CUDA tests", "", f"counts: {counts or 'none (see tests.log)'}"]
lines += [f"- {x}" for x in failures[:40]]
lines += ["", "## Kernels vs ATen (CUDA)", "",
          "| op | dtype | config | kernel ms | ATen ms | speedup | >= 1.2 | max abs diff | status |",
          "|---|---|---|---|---|---|---|---|---|"]
by_key = {}
for r in kernels:
    cfg = ", ".join(f"{k}={r[k]}" for k in ("n", "m", "b", "r", "p", "model", "k") if k in r)
    by_key.setdefault((r.get("op"), r.get("dtype"), cfg), {})[r.get("tool")] = r
for (op, dtype, cfg), tools in by_key.items():
    k, a = tools.get("curvx kernel", {}), tools.get("ATen reference", {})
    s = k.get("speedup")
    met = "" if not isinstance(s, (int, float)) else ("yes" if s >= 1.2 else "NO")
    status = k.get("status", a.get("status"))
    lines.append(f"| {op} | {dtype} | {cfg} | {fmt(k.get('median_ms'))} | "
                 f"{fmt(a.get('median_ms'))} | {fmt(s)} | {met} | "
                 f"{fmt(k.get('max_abs_diff'))} | {status} |")
lines += ["", "## GPU rows", ""]
for r in gpu:
    keep = {k: v for k, v in r.items() if k not in ("floors",)}
    lines.append(f"- {json.dumps(keep, default=str)}")
lines += ["", "## Floors", "", "| floor | measured | limit | met |", "|---|---|---|---|"]
lines += [f"| {f[0]} | {fmt(f[1])} | {fmt(f[2])} | {f[3]} |" for f in floors]
with open(os.path.join(results, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
for p in phases:
    print(f"{p['phase']:10s} exit {p['rc']:3d} {p['seconds']:4d}s  {p['note']}")
print(f"tests: {counts}; floors met: {sum(bool(f[3]) for f in floors)}/{len(floors)}")
EOF
FAILED=$(awk '$2 != 0' "$PHASES" | wc -l)
rm -f "$PHASES"
log "done in $(($(date +%s) - START))s; $FAILED phase(s) not passed; results in $RESULTS"
[ "$FAILED" -eq 0 ]
