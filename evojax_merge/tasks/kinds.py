"""The names of the LM scorer kinds (:mod:`evojax_merge.tasks.lm`) and prompt formats, importable without JAX
so configs can be checked before anything heavy loads."""

KINDS = ("exact_match", "last_number", "regex", "prefix_match", "answer_match", "loglik", "answer_prob", "choice")
# Kinds that score a greedy generation (their batches hold the prompts alone, left-padded).
GENERATION_KINDS = ("exact_match", "last_number", "regex", "prefix_match", "answer_match")
# Kinds whose scores are >= 0 per data point, as M2N2's competition (a share of each point) needs.
NONNEGATIVE_KINDS = tuple(k for k in KINDS if k != "loglik")
# How prompts are wrapped before tokenising (tasks.lm_suite): plain text, a ChatML user turn, or the user turn
# rendered by the chat template of model A's tokenizer (tasks.chat_template).
PROMPT_FORMAT_NAMES = ("plain", "chatml", "chat_template")
