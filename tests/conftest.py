import os

import pytest

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


@pytest.fixture(scope="module")
def merge_kernel_cache_in_tmp(tmp_path_factory):
    """Compiled merge kernels go to a temporary folder, not the user's ~/.cache (the merge command's
    modules use it: ``pytestmark = pytest.mark.usefixtures("merge_kernel_cache_in_tmp")``)."""
    old = os.environ.get("EVOJAX_MERGE_JAX_CACHE")
    os.environ["EVOJAX_MERGE_JAX_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    if old is None:
        del os.environ["EVOJAX_MERGE_JAX_CACHE"]
    else:
        os.environ["EVOJAX_MERGE_JAX_CACHE"] = old
