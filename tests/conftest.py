import os

# Tests run on the CPU, single-threaded per op where possible, and never touch a model hub.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
