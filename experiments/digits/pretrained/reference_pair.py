"""The paper's own pre-trained pair, rebuilt, and the brute-force SLERP line between it (why 57.7%).

The paper's reference code draws both seed models once, from PRNG key 42 (split in two), as flat
N(0, 0.01^2) vectors laid out [W1 (64 x 256, row-major), b1, W2 (256 x 10), b2], and pre-trains them
the same way as ``problem.model.pretrained_class_groups`` does. JAX changed its random bits in 0.5
(``jax_threefry_partitionable`` became the default), so the pair of the paper's era needs that flag off.
This script maps those two vectors into this project's MLP pytree, pre-trains them with
:func:`evojax_merge.models.pretrain.specialist_seed_models` and prints the brute-force SLERP line of
:mod:`evojax_merge.run.slerp_line` for that pair, under both settings of the flag.

    PYTHONPATH=. python experiments/digits/pretrained/reference_pair.py
"""

import jax
import jax.numpy as jnp

from evojax_merge.config import load_config
from evojax_merge.models.mlp import MLP
from evojax_merge.models.pretrain import specialist_seed_models
from evojax_merge.run.runner import build
from evojax_merge.run.slerp_line import choose_by_training, slerp_line_accuracies
from evojax_merge.tasks.classification import class_membership


def reference_layout_models(model: MLP, num_features: int, key: jax.Array, num_models: int):
    """``num_models`` flat N(0, init_std^2) draws in the reference's layout, as this MLP's pytrees."""
    template = model.init_params(jax.random.PRNGKey(0), num_features)
    layers = [template[f"Dense_{i}"] for i in range(len(model.hidden_sizes) + 1)]
    size = sum(layer["kernel"].size + layer["bias"].size for layer in layers)

    def one(key):
        flat = jax.random.normal(key, (size,)) * model.init_std
        params, offset = {}, 0
        for i, layer in enumerate(layers):
            entry = {}
            for name in ("kernel", "bias"):  # the reference stores each layer's weights before its bias
                n = layer[name].size
                entry[name] = flat[offset:offset + n].reshape(layer[name].shape)
                offset += n
            params[f"Dense_{i}"] = entry
        return params

    return jax.vmap(one)(jax.random.split(key, num_models))


def main():
    experiment = build(load_config("experiments/digits/pretrained/m2n2.yaml"))
    problem, options = experiment.problem, experiment.problem.options.model
    data, model = problem.dataset, problem.model
    train, test = experiment.fitness_data, experiment.test_data
    membership = class_membership(data.train.y, options.pretrained_class_groups, "problem.model.pretrained_class_groups")
    score_fn = problem.score
    ratios = jnp.linspace(0.0, 1.0, 1001)
    for partitionable in (False, True):
        jax.config.update("jax_threefry_partitionable", partitionable)
        models = reference_layout_models(model, data.num_features, jax.random.PRNGKey(options.init_seed), 2)
        models = specialist_seed_models(
            model.logits, models, train, membership, options.pretrain_steps, options.pretrain_lr
        )
        first, second = (jax.tree.map(lambda x: x[i], models) for i in (0, 1))
        seeds = [float(score_fn(m, test).mean()) for m in (first, second)]
        line = choose_by_training(ratios, *slerp_line_accuracies(problem, first, second, train, test, ratios))
        print(
            f"jax_threefry_partitionable={partitionable}: seed test accuracies {100 * seeds[0]:.1f}% / "
            f"{100 * seeds[1]:.1f}%; brute-force SLERP: ratio {line['ratio']:.3f}, train "
            f"{100 * line['train_accuracy']:.1f}%, test {100 * line['test_accuracy']:.1f}% "
            f"(best test over the grid {100 * line['best_test_accuracy_over_grid']:.1f}%)"
        )


if __name__ == "__main__":
    main()
