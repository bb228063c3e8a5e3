"""Optimisers built from a config section (`configlib.adam_config`)."""

from __future__ import annotations

import ml_collections
import optax


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Builds the optax transform that `optim` describes.

    Args:
      optim: section with `name` ('adam', 'adamw' or 'sgd', whose momentum is `b1`), `learning_rate`,
        `b1`, `b2`, `eps` and `grad_clip_norm` (0 disables clipping).

    Returns:
      The transform (clipping first, when enabled).
    """
    if optim.name == "adam":
        tx = optax.adam(optim.learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "adamw":
        tx = optax.adamw(optim.learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "sgd":
        tx = optax.sgd(optim.learning_rate, momentum=optim.b1 or None)
    else:
        raise ValueError(f"Unknown config optim.name {optim.name!r}; choose 'adam', 'adamw' or 'sgd'")
    if optim.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx


def apply(tx: optax.GradientTransformation, grads, opt_state, params):
    """One optimiser update: returns `(new_params, new_opt_state, updates)`."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates
