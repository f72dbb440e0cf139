#!/usr/bin/env bash
# One-shot GPU check (one H100/H200-class GPU, under 8 minutes): install the gpu and trtllm extras,
# compare mamba-ssm's kernels with the PyTorch path on the demo teacher and its pruned student, load
# the student's TensorRT-LLM export in the LLM API and generate, and bench the 227M pair with
# `--engine torch --device cuda` and `--engine trtllm`. Every step is timed; results are JSON lines in
# OUT/steps.jsonl and one object in OUT/results.json. A failed step is recorded and the next runs.
#
#   bash benchmarks/gpu_check.sh OUT [--dry-run]
#
# --dry-run (CPU, used by the tests): every step is printed and recorded, nothing is installed and
# nothing that needs a GPU runs.
set -u
OUT=${1:?usage: gpu_check.sh OUT [--dry-run]}
DRY=${2:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"

step() {  # step NAME COMMAND...: time it, keep its last JSON line (or its error) in steps.jsonl
    local name=$1; shift
    echo "== $name: $*" >&2
    local start end rc line
    start=$(date +%s.%N)
    if [ "$DRY" = "--dry-run" ] && [ "$name" = "install" ]; then
        line='{"step": "install", "dry_run": true, "result": {"would_run": "pip install -e .[gpu,trtllm]"}}'; rc=0
    else
        line=$("$@" 2> "$OUT/$name.log" | tail -n 1); rc=${PIPESTATUS[0]}
    fi
    end=$(date +%s.%N)
    if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
        line=$(printf '{"step": "%s", "error": %s}' "$name" "$("$PYTHON" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-400:]))' < "$OUT/$name.log")")
    fi
    "$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[1]); d["wall_s"]=round(float(sys.argv[3])-float(sys.argv[2]),1); print(json.dumps(d))' \
        "$line" "$start" "$end" >> "$OUT/steps.jsonl"
    echo "   $(tail -n 1 "$OUT/steps.jsonl")" >&2
}

step install "$PYTHON" -m pip install --quiet -e "$HERE[gpu,trtllm]"
for name in models kernels trtllm bench-torch bench-trtllm; do
    step "$name" "$PYTHON" "$HERE/benchmarks/gpu_check.py" "$name" "$OUT" $DRY
done
"$PYTHON" -c 'import json,sys; steps=[json.loads(l) for l in open(sys.argv[1])]; json.dump({"steps": steps, "failed": [s["step"] for s in steps if "error" in s]}, open(sys.argv[2], "w"), indent=2)' \
    "$OUT/steps.jsonl" "$OUT/results.json"
echo "results: $OUT/results.json" >&2
