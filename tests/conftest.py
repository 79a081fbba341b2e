import os

# Tests run on the CPU, single-threaded per op where possible, and never touch a model hub.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The everyday tier is `bash scripts/test.sh -m "not slow"`: these modules compile language models, start
# subprocesses or train seeds (minutes each on a 2-core CPU); CI runs everything.
SLOW_MODULES = {
    "test_evolve_llm_runner", "test_evolve_manifest", "test_evolve_mesh", "test_multihost", "test_faults",
    "test_examples", "test_lm_finetune", "test_lm_seeds", "test_llama_smollm2", "test_llama_parity",
    "test_faults_merge", "test_faults_llm", "test_faults_llm_kill", "test_diffusion_runs",
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
