#!/usr/bin/env bash
# Builds a separate virtual environment holding mergekit itself (and a CPU build of torch), for
# scripts/check_mergekit.py, which merges evolved recipes with mergekit and with evojax-merge and compares
# the tensors. The project's own environment is not touched: mergekit pins its own versions of
# transformers, pydantic and friends. Set MERGEKIT_VENV to put the environment elsewhere (default:
# .venv-mergekit in the repository root, git-ignored) and MERGEKIT_VERSION to pick another release.
# Prints the environment's folder on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MERGEKIT_VENV:-$root/.venv-mergekit}"
version="${MERGEKIT_VERSION:-0.1.5}"
torch_version="${MERGEKIT_TORCH_VERSION:-2.13.0}"  # the CPU build here; a plain `torch` pulls CUDA wheels
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/mergekit-yaml" ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # torch first, pinned, so that mergekit's own requirement is met by the CPU build.
    "$venv/bin/python" -m pip install --quiet "torch==$torch_version"
    "$venv/bin/python" -m pip install --quiet "mergekit==$version"
fi
"$venv/bin/python" -c "import importlib.metadata as m; print('mergekit', m.version('mergekit'), 'torch', m.version('torch'), 'transformers', m.version('transformers'))" >&2
echo "$venv"
