"""Problems: what a search looks for and how a candidate is scored (see :mod:`evojax_merge.problems.base`)."""
