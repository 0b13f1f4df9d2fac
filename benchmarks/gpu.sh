#!/usr/bin/env bash
# One command for a CUDA machine: the benchmark suite at realistic sizes (ResNet50 at 224 px,
# paper-scale CLIP-Dissect, a ViT-B-16-sized CLIP with random weights), JSON to $OUT (else
# benchmarks/results/), all within 8 minutes.
#
#   benchmarks/gpu.sh [--size gpu|tiny|cpu] [--budget SECONDS] [--only NAME ...]
#
# Needs only this repository and a Python with torch; no network and no install. The repo's
# packages are imported from the source tree (PYTHONPATH); a benchmark whose library (lime,
# grad-cam, open_clip, ...) is missing is recorded as skipped with the missing module named.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=gpu
BUDGET=400        # seconds after which no further benchmark starts
HARD_LIMIT=470    # seconds after which the run is killed (what was measured is already on disk)
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --only) shift; EXTRA+=(--only); while [[ $# -gt 0 && "$1" != --* ]]; do EXTRA+=("$1"); shift; done ;;
    *) echo "unknown argument $1; usage: benchmarks/gpu.sh [--size gpu|tiny|cpu] [--budget S] [--only NAME ...]" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

"$PYTHON" - <<'EOF'
import importlib, torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
for name in ("torchvision", "numpy", "scipy", "skimage", "sklearn", "lime", "pytorch_grad_cam", "cv2",
             "open_clip", "pandas", "pyarrow", "prefect", "psutil"):
    try:
        importlib.import_module(name)
        print(f"  {name}: ok")
    except Exception as error:
        print(f"  {name}: MISSING ({type(error).__name__}: {error})")
EOF

DAY=$(date -u +%Y-%m-%d)
HOST=$(hostname)
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
JSON="$DEST/$DAY-$HOST-$SIZE.json"
echo "writing $JSON"
status=0
timeout --signal=TERM --kill-after=10 "$HARD_LIMIT" \
  "$PYTHON" -m benchmarks --size "$SIZE" --budget "$BUDGET" --out "$JSON" "${EXTRA[@]}" || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "gpu.sh: stopped at the ${HARD_LIMIT} s limit; $JSON holds every benchmark finished before it" >&2
fi
if [[ -f "$JSON" && -n "${OUT:-}" ]]; then
  "$PYTHON" -m benchmarks --render "$JSON" --markdown "$DEST/RESULTS-$SIZE.md" >/dev/null || true
fi
exit "$status"
