"""The names of the LM scorer kinds (:mod:`evojax_merge.tasks.lm`), importable without JAX so configs
can be checked before anything heavy loads."""

KINDS = ("exact_match", "prefix_match", "answer_match", "loglik", "answer_prob", "choice")
# Kinds whose scores are >= 0 per data point, as M2N2's competition (a share of each point) needs.
NONNEGATIVE_KINDS = tuple(k for k in KINDS if k != "loglik")
# How prompts are wrapped before tokenising (tasks.lm_suite.PROMPT_FORMATS): plain text, or a ChatML user turn.
PROMPT_FORMAT_NAMES = ("plain", "chatml")
