#!/usr/bin/env bash
# README's first command in a brand-new virtual environment (no system packages, an empty jsae
# cache), shortened with --set so it takes minutes: it fails if `.[demo]` misses anything the
# quickstart imports. Then: the Python API imports without any extra, and a module that needs
# an extra that is not installed says which one in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/jsae-fresh.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# A copy of the tree (what a fresh clone has), so this can run beside another install of it.
mkdir "$WORK/src"
tar -cf - --exclude=./.git --exclude=./runs --exclude=./.ci-saelens --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=fresh-install.log . | tar -xf - -C "$WORK/src"
cd "$WORK/src"
"$PY" -m venv "$WORK/venv"
export PATH="$WORK/venv/bin:$PATH" JSAE_CACHE="$WORK/cache" PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
# README's first command, with a short budget:
pip install -q -e ".[demo]" && jsae train configs/quickstart.yaml --run-dir "$WORK/run" \
  --set train.tokens=6144 --set train.log_every=1 --set eval.tokens=2048 \
  --set eval.show_features=2 --set eval.show_features_contexts=32 --set checkpoint.every_steps=2 \
  | tee "$WORK/train.log"
grep -q "What some features of blocks.6.hook_resid_post mean" "$WORK/train.log"
test -f "$WORK/run/saes/blocks.6.hook_resid_post/sae.safetensors"
python - <<'PY'
import importlib, sys
for m in ["jsae", "jsae.sae", "jsae.models", "jsae.data", "jsae.train", "jsae.evals", "jsae.export",
          "jsae.analysis", "jsae.steering", "jsae.monitor", "jsae.plan"]:
    importlib.import_module(m)
assert "torch" not in sys.modules, "the core imported torch"
from jsae.errors import MissingDependency, require
try:
    require("sklearn", "atlas", "the atlas maps")
except MissingDependency as e:
    msg = str(e)
    assert "\n" not in msg and "pip install 'jsae[atlas]'" in msg, msg
    print("missing extra ->", msg)
else:
    raise SystemExit("scikit-learn is installed in the fresh demo venv: the check would not test anything")
PY
echo "fresh install of README's first command: OK in $(( $(date +%s) - start )) s"
