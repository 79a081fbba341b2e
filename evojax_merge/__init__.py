"""evojax-merge: JAX-native evolutionary model merging.

Data flow of the package: ``data`` -> ``tasks`` (per-data-point scores) -> ``models`` -> ``merge``
(operators, recipes) -> ``strategies`` (M2N2 and friends, evosax-style) -> ``run`` (compiled loops,
run directories, checkpoints) -> ``cli``.
"""

from evojax_merge.errors import ConfigError, DataError, EvojaxMergeError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "EvojaxMergeError", "__version__"]
