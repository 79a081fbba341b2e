"""A new strategy in a few lines: the (1+lambda) evolution strategy with the 1/5th success rule.

Rechenberg's rule: widen the step when more than a fifth of the generations improve, narrow it otherwise.
Run it from a config on any problem: ``strategy: {name: "examples.one_plus_lambda:OnePlusLambda", ...}``.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class State:
    parent: jax.Array  # flat parameters of the one parent
    score: jax.Array  # its mean training score
    sigma: jax.Array  # mutation step size
    num_rejected_nonfinite: jax.Array


class OnePlusLambda:
    num_seeds = 1  # starts from one seed candidate

    def __init__(self, solution, population_size: int = 8, sigma: float = 0.01, adapt: float = 1.2):
        template = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), solution)
        flat, self.unravel = jax.flatten_util.ravel_pytree(template)
        self.population_size, self.sigma, self.adapt, self.num_dims = population_size, sigma, adapt, flat.size
        self.default_params = None

    def init(self, key, seeds, scores, params):
        parent = jax.flatten_util.ravel_pytree(jax.tree.map(lambda x: x[0], seeds))[0]
        score = jnp.float32(-jnp.inf) if scores is None else jnp.nanmean(scores[0]).astype(jnp.float32)
        return State(parent, score, jnp.float32(self.sigma), jnp.int32(0))

    def ask(self, key, state, params):
        noise = jax.random.normal(key, (self.population_size, self.num_dims), state.parent.dtype)
        return jax.vmap(self.unravel)(state.parent + state.sigma * noise), state

    def tell(self, key, candidates, scores, state, params):
        finite = jnp.all(jnp.isfinite(scores), axis=1)
        means = jnp.where(finite, scores.mean(axis=1), -jnp.inf)
        best = jnp.argmax(means)
        improved = means[best] >= state.score
        flat = jax.flatten_util.ravel_pytree(jax.tree.map(lambda x: x[best], candidates))[0]
        sigma = state.sigma * jnp.where(improved, self.adapt, self.adapt ** -0.25)  # 1/5th success rule
        state = State(jnp.where(improved, flat, state.parent), jnp.where(improved, means[best], state.score),
                      sigma, state.num_rejected_nonfinite + jnp.sum(~finite))
        return state, {"best_train_score": state.score}

    def best(self, state):
        return self.unravel(state.parent), state.score

    def counters(self, state):
        return {"archive_filled": jnp.int32(1), "rejected_nonfinite": state.num_rejected_nonfinite,
                "step_size": state.sigma}
