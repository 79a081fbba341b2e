"""Supervised fine-tuning of a Llama-family model on prompt -> answer text, loss on the answer only.

This makes the seed models of the LLM-merging experiments: a small base trained from scratch on a mix
of skills, specialists fine-tuned from it one skill each, and specialist variants of a pretrained
model (SmolLM2). It is a plain, complete training loop over the pure functions of
:mod:`evojax_merge.models.llama`:

- next-token cross-entropy on the answer tokens and the end-of-sequence token after them; the prompt
  and the padding are masked out of the loss (and so receive no gradient through it);
- AdamW (optax) with linear warm-up then cosine decay, global-norm gradient clipping, no weight decay
  on the RMSNorm scales;
- one jit-compiled train step; batches are right-padded to a multiple of ``width_multiple`` tokens so
  only a few shapes are ever compiled;
- optional mixed precision: float32 master weights, forward and backward in bfloat16;
- periodic held-out evaluation with the project's LM scorers (:func:`evojax_merge.tasks.lm.make_scorer`,
  e.g. exact match of the generated answer), the same scores the evolutionary search optimises;
- a run directory: ``config.json``, ``metrics.csv`` and ``metrics.png`` rewritten at every evaluation,
  and the final model as a Hugging Face folder (``model/``, written atomically).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
import shutil
import tempfile
import time
from functools import partial
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from evojax_merge.data.synthetic_text import TextExample
from evojax_merge.errors import ConfigError, DataError
from evojax_merge.models import hf_io, llama
from evojax_merge.files import write_atomic, write_csv, write_json
from evojax_merge.tasks import lm

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (typed; ``validate`` rejects impossible values)."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3  # peak, reached after the warm-up
    warmup_steps: int = 50
    final_learning_rate_ratio: float = 0.1  # the cosine decays to learning_rate * this at `steps`
    weight_decay: float = 0.01
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping
    compute_dtype: str = "float32"  # float32 | bfloat16 (master weights stay float32)
    eval_every: int = 200  # steps between held-out evaluations (and always after the last step)
    eval_batch_size: int = 128  # prompts generated at once during evaluation
    eval_scan_layers: bool = False  # scan the layers while generating: compiles faster, decodes slower
    width_multiple: int = 32  # a batch is right-padded to a multiple of this many tokens
    seed: int = 0  # batch order

    def validate(self) -> "FinetuneConfig":
        checks = [
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (0 <= self.warmup_steps < self.steps, "warmup_steps", "must be in [0, steps)"),
            (0 <= self.final_learning_rate_ratio <= 1, "final_learning_rate_ratio", "must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1, "adam_b1/adam_b2", "must be in [0, 1)"),
            (self.clip_norm >= 0, "clip_norm", "must be >= 0"),
            (self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"must be one of {list(COMPUTE_DTYPES)}"),
            (self.eval_every >= 1, "eval_every", "must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1"),
            (self.width_multiple >= 1, "width_multiple", "must be >= 1"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"finetune.{key} {message}")
        return self


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A held-out test set and how it is scored: ``kind`` is a :func:`lm.make_scorer` kind
    ("last_number" for a numeric answer, "answer_match" for an exact string answer)."""

    name: str
    kind: str
    examples: tuple[TextExample, ...]
    max_new_tokens: int = 16


# --------------------------------------------------------------------------------------- batches
def tokenize_examples(tokenizer, examples: Sequence[TextExample], eos_token_id: int,
                      prompt_format: Callable[[str], str] = lambda p: p) -> list[tuple[list[int], int]]:
    """Each example as (token ids of prompt + answer + EOS, number of prompt tokens).

    The answer is tokenised in context, as :func:`lm.generation_batch` does, so training sees the
    same answer tokens the scorers compare against.
    """
    rows = []
    for e in examples:
        prompt = prompt_format(e.prompt)
        head, full = lm.encode(tokenizer, prompt), lm.encode(tokenizer, prompt + e.answer)
        if full[:len(head)] != head:
            full = head + lm.encode(tokenizer, e.answer)
        if len(full) == len(head):
            raise DataError(f"example with an empty answer: {e.prompt!r}")
        rows.append((full + [eos_token_id], len(head)))
    return rows


def sft_batch(rows: Sequence[tuple[list[int], int]], pad_token_id: int, width: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``/``attention_mask`` (B, W) and ``loss_mask`` (B, W - 1).

    ``loss_mask[b, t]`` is 1 where position t predicts token t + 1 of the answer (or its EOS): the
    prompt's own tokens and the padding never enter the loss.
    """
    ids = np.full((len(rows), width), pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    loss_mask = np.zeros((len(rows), width - 1), np.float32)
    for b, (row, n_prompt) in enumerate(rows):
        if len(row) > width:
            raise DataError(f"an example of {len(row)} tokens exceeds the batch width {width}")
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
        loss_mask[b, n_prompt - 1:len(row) - 1] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def answer_loss(params, batch, *, config: llama.LlamaConfig, compute_dtype=jnp.float32) -> jax.Array:
    """Mean next-token cross-entropy over the ``loss_mask`` tokens, computed in ``compute_dtype``."""
    lp = llama.token_log_probs(llama.cast_params(params, compute_dtype), batch["input_ids"],
                               batch["attention_mask"], config=config)
    weight = batch["loss_mask"]
    return -jnp.sum(lp * weight) / jnp.maximum(jnp.sum(weight), 1.0)


# ------------------------------------------------------------------------------------- optimiser
def learning_rate_schedule(cfg: FinetuneConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to ``peak * final_learning_rate_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
        end_value=cfg.learning_rate * cfg.final_learning_rate_ratio)


def make_optimizer(cfg: FinetuneConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; the norms' scales are not decayed (decaying them towards 0
    would shrink every activation, not regularise)."""
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: "norm" not in jax.tree_util.keystr(p), params)

    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: llama.Params
    opt_state: optax.OptState


def make_train_step(config: llama.LlamaConfig, optimizer: optax.GradientTransformation,
                    compute_dtype=jnp.float32) -> Callable:
    """A jit-compiled ``step(state, batch) -> (state, {"loss", "grad_norm"})``; the state is donated."""
    loss_fn = partial(answer_loss, config=config, compute_dtype=compute_dtype)

    @partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


# ------------------------------------------------------------------------------------ evaluation
@dataclasses.dataclass
class _PreparedTask:
    task: EvalTask
    scorer: Callable
    chunks: list[dict]
    n: int


def prepare_eval_tasks(tasks: Sequence[EvalTask], config: llama.LlamaConfig, tokenizer, pad_token_id: int,
                       batch_size: int, prompt_format: Callable[[str], str] = lambda p: p,
                       scan_layers: bool = False) -> list[_PreparedTask]:
    """Each task as equal-shaped chunks of one left-padded generation batch (one compile per task)."""
    prepared = []
    for task in tasks:
        if not task.examples:
            raise DataError(f"evaluation task {task.name!r} has no examples")
        full = lm.generation_batch(tokenizer, task.examples, pad_token_id, prompt_format)
        n = len(task.examples)
        size = min(batch_size, n)
        n_chunks = math.ceil(n / size)
        # Repeat the last rows to fill the final chunk; their scores are dropped.
        index = np.minimum(np.arange(n_chunks * size), n - 1)
        chunks = [{k: v[index[i * size:(i + 1) * size]] for k, v in full.items()} for i in range(n_chunks)]
        scorer = lm.make_scorer(task.kind, config, tokenizer, max_new_tokens=task.max_new_tokens,
                                pad_token_id=pad_token_id, scan_layers=scan_layers)
        prepared.append(_PreparedTask(task, scorer, chunks, n))
    return prepared


def evaluate(params, prepared: Sequence[_PreparedTask]) -> dict[str, np.ndarray]:
    """Per-example scores (N,) of every prepared task, by task name."""
    out = {}
    for p in prepared:
        scores = np.concatenate([np.asarray(p.scorer(params, chunk)) for chunk in p.chunks])
        out[p.task.name] = scores[:p.n]
    return out


# ---------------------------------------------------------------------------------- run directory
def save_model_atomic(folder: str | os.PathLike, config: llama.LlamaConfig, params, tokenizer) -> pathlib.Path:
    """Writes the Hugging Face folder beside ``folder`` and renames it into place, so a crash never
    leaves a half-written model where a finished one is expected."""
    folder = pathlib.Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        hf_tokenizer = tokenizer.to_tokenizers() if hasattr(tokenizer, "to_tokenizers") else tokenizer
        hf_io.save_hf_folder(tmp, config, params, hf_tokenizer)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def plot_metrics(rows: list[dict], path: str | os.PathLike, task_names: Sequence[str], title: str = ""):
    """Training loss and held-out accuracies against the step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    steps = [r["step"] for r in rows]
    ax_loss.plot(steps, [r["train_loss"] for r in rows], lw=1.5)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (answer tokens)")
    for name in task_names:
        ax_acc.plot(steps, [100 * r[f"acc_{name}"] for r in rows], marker="o", ms=3, label=name)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("held-out exact match (%)")
    ax_acc.set_ylim(-2, 102)
    if task_names:
        ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------- train
def finetune(params, model_config: llama.LlamaConfig, tokenizer, train_examples: Sequence[TextExample],
             eval_tasks: Sequence[EvalTask], cfg: FinetuneConfig, run_dir: str | os.PathLike | None = None, *,
             prompt_format: Callable[[str], str] = lambda p: p, progress: bool = True,
             extra_config: dict | None = None):
    """Fine-tunes ``params`` on ``train_examples``; returns ``(params, metrics rows)``.

    Args:
      params: float32 parameter pytree (a fresh ``llama.init_params`` to train from scratch).
      model_config: the model's :class:`llama.LlamaConfig`; its first ``eos_token_id`` ends every answer
        and its ``pad_token_id`` (else 0) pads the batches.
      tokenizer: CharTokenizer, ``tokenizers.Tokenizer`` or a transformers tokenizer.
      train_examples: the examples, sampled in epochs of a seeded random order.
      eval_tasks: held-out tests, scored every ``cfg.eval_every`` steps and after the last step.
      run_dir: if given, receives config.json, metrics.csv, metrics.png and ``model/`` (HF folder).
      prompt_format: applied to every prompt (e.g. :func:`lm.chatml` for an instruct model).
      extra_config: more facts recorded in config.json (data sizes, seeds, ...).
    Returns:
      The trained params (float32) and one dict per evaluation: step, train_loss (mean since the
      previous evaluation), grad_norm, learning_rate, elapsed_s and ``acc_<task>`` per task.
    """
    cfg.validate()
    if not model_config.eos_token_id:
        raise ConfigError("the model config has no eos_token_id: answers could never end")
    if len(train_examples) == 0:
        raise DataError("no training examples")
    eos = int(model_config.eos_token_id[0])
    pad = int(model_config.pad_token_id if model_config.pad_token_id is not None else 0)
    rows = tokenize_examples(tokenizer, train_examples, eos, prompt_format)
    longest = max(len(r) for r, _ in rows)
    if longest > model_config.max_position_embeddings:
        raise DataError(f"the longest training example has {longest} tokens, more than the model's "
                        f"max_position_embeddings ({model_config.max_position_embeddings})")
    prepared = prepare_eval_tasks(eval_tasks, model_config, tokenizer, pad, cfg.eval_batch_size,
                                  prompt_format, cfg.eval_scan_layers)
    task_names = [t.name for t in eval_tasks]

    run_dir = None if run_dir is None else pathlib.Path(run_dir)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {
            "finetune": dataclasses.asdict(cfg), "model": model_config.to_hf_dict(),
            "n_train_examples": len(train_examples),
            "eval_tasks": {t.name: {"kind": t.kind, "n": len(t.examples), "max_new_tokens": t.max_new_tokens}
                           for t in eval_tasks},
            **(extra_config or {})})

    optimizer = make_optimizer(cfg)
    # A float32 copy: the train step donates its state, and the caller's arrays must stay alive.
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), params)
    state = TrainState(jnp.int32(0), params, optimizer.init(params))
    train_step = make_train_step(model_config, optimizer, COMPUTE_DTYPES[cfg.compute_dtype])
    schedule = learning_rate_schedule(cfg)
    rng = np.random.default_rng(cfg.seed)
    order, cursor = rng.permutation(len(rows)), 0
    history: list[dict] = []
    losses, norms = [], []
    start = time.perf_counter()

    def record(step):
        scores = evaluate(state.params, prepared)
        row = {"step": step, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "grad_norm": float(np.mean(norms)) if norms else float("nan"),
               "learning_rate": float(schedule(max(step - 1, 0))),
               "elapsed_s": round(time.perf_counter() - start, 2)}
        row.update({f"acc_{name}": float(np.mean(s)) for name, s in scores.items()})
        history.append(row)
        losses.clear()
        norms.clear()
        if run_dir is not None:
            header = list(row)
            write_csv(run_dir / "metrics.csv", header, [[r[h] for h in header] for r in history])
            plot_metrics(history, run_dir / "metrics.png", task_names, title=run_dir.name)
        return row

    from tqdm.auto import tqdm

    bar = tqdm(range(1, cfg.steps + 1), disable=not progress, desc=run_dir.name if run_dir else "finetune")
    record(0)
    for step in bar:
        picked = []
        while len(picked) < cfg.batch_size:
            if cursor == len(order):
                order, cursor = rng.permutation(len(rows)), 0
            take = min(cfg.batch_size - len(picked), len(order) - cursor)
            picked.extend(order[cursor:cursor + take])
            cursor += take
        batch_rows = [rows[i] for i in picked]
        width = cfg.width_multiple * math.ceil(max(len(r) for r, _ in batch_rows) / cfg.width_multiple)
        state, metrics = train_step(state, sft_batch(batch_rows, pad, width))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {step}; lower the learning rate")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = record(step)
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    bar.close()
    if run_dir is not None:
        save_model_atomic(run_dir / "model", model_config, state.params, tokenizer)
    return state.params, history
