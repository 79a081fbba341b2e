"""Classifiers evolved in weight space: an MLP on any dataset the data layer reads (the M2N2 digits setting).

A candidate is the MLP's parameter pytree; its per-point score is 1 where the arg-max class is the label.
Seed models are drawn from a key (N(0, init_std^2) weights, the paper's from-scratch seeds), optionally
pre-trained on groups of classes (the paper's Fig. 2 right: one specialist for digits 0-4, one for 5-9).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.config import check, options
from evojax_merge.data import load_dataset
from evojax_merge.models.mlp import MLP
from evojax_merge.models.pretrain import specialist_seed_models
from evojax_merge.problems.base import Problem
from evojax_merge.tasks.classification import class_membership, classification_scores


@dataclasses.dataclass
class DataOptions:
    name: str = "digits"  # digits | idx | fashion_mnist_debian | tfds:<name>
    path: str | None = None  # IDX folder or tfds data_dir
    scale: float = 1.0  # inputs are multiplied by this (digits: 1, the paper feeds raw 0..16 pixels)


@dataclasses.dataclass
class ModelOptions:
    hidden_sizes: list[int] = dataclasses.field(default_factory=lambda: [256])
    init_std: float = 0.01  # std of every weight and bias of a from-scratch seed model
    # Pre-trained seeds (the paper's Fig. 2 right): seed model i is trained from its random init by
    # pretrain_steps full-batch Adam steps (softmax cross-entropy) on the training points whose label is
    # in group i, e.g. [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]; null = random seed models (from scratch).
    pretrained_class_groups: list[list[int]] | None = None
    pretrain_steps: int = 10
    pretrain_lr: float = 3e-3
    # PRNG seed of the seed models' random init: a number gives every run the same seed models (the
    # paper's pre-trained seeds come from seed 42 in every run); null = each run's own seed.
    init_seed: int | None = None


@dataclasses.dataclass
class ClassifierOptions:
    data: DataOptions = dataclasses.field(default_factory=DataOptions)
    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)

    def validate(self):
        m = self.model
        check(all(h > 0 for h in m.hidden_sizes), "problem.model.hidden_sizes", "must all be positive")
        check(m.init_std >= 0, "problem.model.init_std", "must be >= 0")
        if m.pretrained_class_groups is not None:
            check_class_groups(m.pretrained_class_groups, "problem.model.pretrained_class_groups")
        check(m.pretrain_steps >= 1, "problem.model.pretrain_steps", "must be >= 1")
        check(m.pretrain_lr > 0, "problem.model.pretrain_lr", "must be > 0")


DEFAULT_DESCRIPTOR_GROUPS = [[1, 3, 5, 7, 9], [0, 2, 4, 6, 8]]  # the paper: odd x even digits


class ClassifierProblem(Problem):
    """An MLP classifier on a dataset (see the module docstring). Build it with :func:`classifier`."""

    def __init__(self, opts: ClassifierOptions):
        self.options = opts
        self.dataset = load_dataset(opts.data.name, opts.data.path)
        m = opts.model
        self.model = MLP(tuple(m.hidden_sizes), self.dataset.num_classes, m.init_std)
        self.num_features = self.dataset.num_features
        self.template = jax.eval_shape(self._init_model, jax.random.PRNGKey(0))
        self.score = classification_scores(self.model.logits)
        groups = m.pretrained_class_groups
        self.num_given_seeds = None
        self._pretrain = None
        if groups is not None:
            membership = class_membership(self.dataset.train.y, groups, "problem.model.pretrained_class_groups")
            self._pretrain = lambda models, train: specialist_seed_models(
                self.model.logits, models, train, membership, m.pretrain_steps, m.pretrain_lr)
            self.num_given_seeds = len(groups)  # one specialist per class group

    def _init_model(self, key):
        return self.model.init_params(key, self.num_features)

    def data(self):
        scale = np.float32(self.options.data.scale)
        split = lambda s: (jnp.asarray(s.x * scale), jnp.asarray(s.y))  # noqa: E731
        return split(self.dataset.train), split(self.dataset.test)

    def seed_candidates(self, key, n, fitness_data):
        init_seed = self.options.model.init_seed
        key = key if init_seed is None else jax.random.PRNGKey(init_seed)
        models = jax.vmap(self._init_model)(jax.random.split(key, n))
        return models if self._pretrain is None else self._pretrain(models, fitness_data)

    def descriptor_groups(self, groups):
        groups = DEFAULT_DESCRIPTOR_GROUPS if groups is None else groups
        check_class_groups(groups, "strategy.descriptor_groups")
        return class_membership(self.dataset.train.y, groups, "strategy.descriptor_groups"), groups


def classifier(**spec) -> tuple[ClassifierProblem, dict]:
    """The problem of config section ``problem: {name: classifier, data: ..., model: ...}``."""
    opts = options(ClassifierOptions, spec, "problem")
    opts.validate()
    return ClassifierProblem(opts), dataclasses.asdict(opts)


def check_class_groups(groups, key: str):
    """A non-empty list of non-empty lists of class labels (>= 0), no label twice within a group."""
    check(isinstance(groups, list) and len(groups) >= 1, key, "must list at least one group of class labels")
    for i, group in enumerate(groups):
        check(isinstance(group, list) and len(group) >= 1, f"{key}[{i}]", "must list at least one class label")
        check(all(isinstance(c, int) and c >= 0 for c in group), f"{key}[{i}]",
              f"must hold class labels >= 0, got {group}")
        check(len(set(group)) == len(group), f"{key}[{i}]", f"must not repeat a class label, got {group}")
