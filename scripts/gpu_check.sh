#!/usr/bin/env bash
# The GPU half of twotower in one run (issue 27): see scripts/gpu_check.py for the steps.
#
#   bash scripts/gpu_check.sh prepare        # here (with the registry): wheels the GPU image lacks + MiniLM's
#                                            # shape into .gpu/ (git-ignored, ~35 MiB: under the 64 MiB transfer)
#   bash scripts/gpu_check.sh OUT [ARGS...]  # on the GPU machine (carry .gpu): install .gpu's wheels into
#                                            # /tmp/site, run every step, summaries in OUT (gpu_check.json/.md)
#   bash scripts/gpu_check.sh --dry-run OUT  # anywhere: GPU steps skipped, summaries still written
#
# The whole run is sized for <= ~8 minutes on one H100 (each subprocess step is capped by --step-timeout).
# If a pinned wheel is gone from the registry, `prepare` says which; pick the nearest version the local
# .venv has and rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "prepare" ]]; then
  VENV_PY=${VENV_PY:-.venv/bin/python}
  mkdir -p .gpu/wheels
  grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
  # the packages twotower imports that the GPU image (Python 3.12) lacks, at the versions this checkout's venv runs
  pkgs=$("$VENV_PY" -c "
from importlib.metadata import version
for name in ('faiss-cpu', 'datasets', 'dill', 'multiprocess', 'bm25s', 'pydantic', 'pydantic-core',
             'annotated-types', 'typing-inspection', 'gguf'):
    try:
        print(f'{name}=={version(name)}')
    except Exception:
        pass
")
  for spec in $pkgs; do
    "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/wheels "$spec" \
      || echo "gpu_check prepare: $spec could not be downloaded (gone?): pick another version of it" >&2
  done
  # MiniLM's config and tokenizer (no weights: 87 MiB would not travel; the steps use random weights of its shape)
  "$VENV_PY" - <<'PYEOF'
from transformers import AutoConfig, AutoTokenizer
from twotower.towers.bases import resolve_base
src = resolve_base("minilm")
AutoConfig.from_pretrained(src).save_pretrained(".gpu/minilm-shape")
AutoTokenizer.from_pretrained(src).save_pretrained(".gpu/minilm-shape")
PYEOF
  du -sh .gpu
  exit 0
fi

if [[ -d .gpu/wheels ]] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  exec "$PY" -m scripts.gpu_check --dry-run --out "$@"
fi
exec "$PY" -m scripts.gpu_check --out "$@"
