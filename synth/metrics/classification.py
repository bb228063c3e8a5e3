"""Classification metrics (METHOD §8.3, chest X-ray: normal / bacterial / viral): accuracy, confusion matrix.

Both take integer class predictions, e.g. ``jnp.argmax(scores, axis=-1)`` of a classifier's scores (the
authors' classifier takes the argmax of its spatially averaged outputs), and integer labels of the same
shape. Pure ``jax.numpy``, jit-able (``num_classes`` static).
"""

import jax
import jax.numpy as jnp


def _check(predicted: jax.Array, labels: jax.Array) -> None:
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} differ.")


def accuracy(predicted: jax.Array, labels: jax.Array) -> jax.Array:
    """Compute the fraction of correct predictions.

    Args:
        predicted: integer predicted classes, any shape (usually (B,)).
        labels: integer true classes of the same shape.

    Returns:
        Scalar float32 mean of ``predicted == labels`` over all entries (merge batches weighted by size).
    """
    _check(predicted, labels)
    return jnp.mean(predicted == labels, dtype=jnp.float32)


def confusion_matrix(predicted: jax.Array, labels: jax.Array, *, num_classes: int) -> jax.Array:
    """Count every (true class, predicted class) combination.

    Args:
        predicted: integer predicted classes in [0, num_classes), any shape.
        labels: integer true classes of the same shape.
        num_classes: C, static under jit; values outside [0, C) are not counted.

    Returns:
        (C, C) int32 matrix: entry [t, p] counts items of true class t predicted as p, so the diagonal
        holds the correct ones, row sums are the class sizes and trace / total is :func:`accuracy`.
    """
    _check(predicted, labels)
    classes = jnp.arange(num_classes)
    true_one_hot = (labels.reshape(-1, 1) == classes).astype(jnp.int32)
    predicted_one_hot = (predicted.reshape(-1, 1) == classes).astype(jnp.int32)
    return true_one_hot.T @ predicted_one_hot
