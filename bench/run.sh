#!/usr/bin/env bash
# The benchmark suite in one command (`make bench`): install the peers, run every
# bench/test_*.py under pytest-benchmark, write bench/results/<stamp>.json and the
# Markdown report bench/results/<stamp>.md. BENCH_QUICK=1 shrinks everything to a
# smoke run of a few minutes; see bench/README.md for the protocol and settings.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
OUT=bench/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
START=$(date +%s)

# 1. Peers from PyPI, one package at a time, torch and numpy held where they are
export BENCH_INSTALL_LOG="$OUT/$STAMP.install.json"
CONSTRAINTS=$(mktemp)
TSV=$(mktemp)
trap 'rm -f "$CONSTRAINTS" "$TSV"' EXIT
"$PY" -m pip freeze 2>/dev/null | grep -i -E '^(torch|torchvision|numpy)==' >"$CONSTRAINTS" || true
while IFS= read -r line; do
    req=${line%%#*}
    req=$(echo "$req" | tr -d '[:space:]')
    [ -z "$req" ] && continue
    if log=$("$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$req" 2>&1); then
        printf '%s\tok\t\n' "$req" >>"$TSV"
    else
        why=$(echo "$log" | grep -v -i warning | grep -v '^\s*$' | tail -n 1)
        printf '%s\tfailed\t%s\n' "$req" "$why" >>"$TSV"
        echo "bench: could not install $req: $why" >&2
    fi
done <"${BENCH_REQUIREMENTS:-bench/requirements.txt}"
"$PY" - "$TSV" "$BENCH_INSTALL_LOG" <<'PYEOF'
import json, re, sys
from importlib import metadata

packages = {}
for line in open(sys.argv[1]):
    req, status, why = (line.rstrip("\n").split("\t") + ["", ""])[:3]
    name = re.split(r"[<>=!~\[;]", req, maxsplit=1)[0]
    entry = {"requirement": req, "ok": status == "ok"}
    if why:
        entry["error"] = why
    try:
        entry["version"] = metadata.version(name)
    except metadata.PackageNotFoundError:
        entry["version"] = None
    packages[name] = entry
json.dump({"packages": packages}, open(sys.argv[2], "w"), indent=1)
PYEOF

# glibc's malloc keeps freed memory instead of returning it to the kernel (the
# effect PyTorch's CPU tuning guide gets from jemalloc/tcmalloc): otherwise every
# step of every tool pays page faults for its activations, more so when plain GD
# steps are interleaved with the measured ones. Same for every tool; the report's
# header shows it. BENCH_MALLOC=default leaves glibc as it is.
if [ "${BENCH_MALLOC:-tuned}" != default ]; then
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
    export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
fi

# 2. Every bench/test_*.py (this suite's and anyone else's); finished rows are also
#    appended to the partial file as they end
JSON="$OUT/$STAMP.json"
export BENCH_PARTIAL="$OUT/$STAMP.partial.jsonl"
"$VENV/bin/pytest" bench -p no:cacheprovider -q -rs --durations=15 \
    --benchmark-json="$JSON" --benchmark-sort=name "$@"
STATUS=$?

# 3. The Markdown report (from the partial rows when pytest was stopped early)
if [ -f "$JSON" ]; then
    "$PY" bench/report.py "$JSON"
elif [ -f "$BENCH_PARTIAL" ]; then
    echo "bench: pytest wrote no $JSON (exit $STATUS); reporting the finished rows" >&2
    "$PY" bench/report.py "$BENCH_PARTIAL" -o "$OUT/$STAMP.md"
else
    echo "bench: pytest wrote no $JSON (exit $STATUS)" >&2
fi
echo "bench: $(($(date +%s) - START)) s in all (pytest exit $STATUS)"
exit $STATUS
