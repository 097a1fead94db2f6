#!/usr/bin/env bash
# The training quality runs on one lent GPU, in one go (device time is scarce):
#   1. a 512-item smoke run (fails fast, before the long runs start),
#   2. the full staged runs — one per entry of RUNS ("preset" or "preset:backbone"), side by side — and, beside
#      them on the same GPU, the staged-vs-unified comparison (both strategies from the same
#      preset with the same smaller budget),
#   3. the logs, result JSON and the full runs' reports copied flat into $OUT.
# On a lent machine without this project's packages or data: scripts/gpu_bundle.sh first (its header has the call).
# Usage: OUT=/tmp/gpu FMNIST_DIR=/usr/share/datasets/fashion-mnist bash benchmarks/train_quality_gpu.sh
#        BACKBONES="resnet18_lowres wrn16_8" CMP_BUDGET=0 ...   # two trunks of FULL_GPU in one device slot
#        RUNS="full-gpu:wrn16_8 full-gpu-lite0" CMP_BUDGET=0 ...  # any presets (lite0: bundle timm, see gpu_bundle.sh)
#        TRAIN_ARGS="--joint-trunk-lr 0.3" ...  # more train_quality.py options for the full runs and the comparison
set -u
OUT=${OUT:-/tmp/gpu-quality}
DATA=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
FULL_BUDGET=${FULL_BUDGET:-400}
CMP_BUDGET=${CMP_BUDGET:-150}  # 0: no comparison, the GPU to the full run alone
WORK=${WORK:-/tmp/gpu-quality-work}
PY=${PYTHON:-python3}
# dry runs elsewhere: DEVICE=cpu ITEMS=512; BACKBONES: the full runs' trunks (default: the preset's ResNet-18;
# also wrn16_8, wrn28_10); the comparison uses the first
BACKBONES=${BACKBONES:-${BACKBONE:-resnet18_lowres}}
FIRST=${BACKBONES%% *}
RUNS=${RUNS:-$(for b in $BACKBONES; do printf 'full-gpu:%s ' "$b"; done)}
EXTRA="${DEVICE:+--device $DEVICE} ${ITEMS:+--items $ITEMS} ${TRAIN_ARGS:-}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
t0=$(date +%s)
args() { case $1 in *:*) echo "${1%%:*} --backbone ${1#*:}" ;; *) echo "$1" ;; esac; }  # preset[:backbone]
tag() { echo "${1//:/_}"; }
for r in $RUNS; do
  if ! $PY benchmarks/train_quality.py $(args "$r") --items 512 --budget 4 ${DEVICE:+--device $DEVICE} \
      --data-dir "$DATA" --out "$WORK/smoke_$(tag "$r")" >"$OUT/smoke_$(tag "$r").log" 2>&1; then
    tail -40 "$OUT/smoke_$(tag "$r").log"; echo "smoke run ($r) failed"; exit 1
  fi
done
echo "smoke ok after $(( $(date +%s) - t0 )) s"
runs=""
for r in $RUNS; do
  $PY benchmarks/train_quality.py $(args "$r") --budget "$FULL_BUDGET" --threads 6 $EXTRA \
    --data-dir "$DATA" --out "$WORK/full_$(tag "$r")" >"$OUT/full_$(tag "$r").log" 2>&1 &
  runs="$runs full_$(tag "$r")"
done
for s in $([ "$CMP_BUDGET" != 0 ] && echo staged unified); do
  $PY benchmarks/train_quality.py compare --base full-gpu --strategies $s --budget "$CMP_BUDGET" --threads 4 $EXTRA \
    --backbone "$FIRST" --data-dir "$DATA" --out "$WORK/cmp_$s" >"$OUT/cmp_$s.log" 2>&1 &
  runs="$runs cmp_$s"
done
rc=0; for job in $(jobs -p); do wait "$job" || rc=$?; done
echo "all runs done after $(( $(date +%s) - t0 )) s (rc=$rc)"
for f in $runs; do echo "== $f"; grep -E "^\||stage .* done|budget|Error|error" "$OUT/$f.log" | tail -12; done
$PY - "$WORK" "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
docs = [json.loads(p.read_text()) for p in sorted(work.glob("*/train_*.json")) if "smoke" not in str(p)]
(out / "results.json").write_text(json.dumps(docs, indent=1))
for r in (r for d in docs for r in d["results"] if r["name"].startswith("full")):
    report = Path(r["model_dir"]) / "report"
    for name in ("summary.md", "loss.png", "recall_at_k.png"):
        if (report / name).exists():
            shutil.copy(report / name, out / f"full_{r['backbone']}_{name}")
PY
ls -la "$OUT"
