"""On phantom anatomy, structure maps follow the (label-free) tissue boundaries; the mask covers the head."""

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from configs import tables
from data_builders.phantom import anatomy
from synth import extraction


def test_structure_map_follows_tissue_boundaries_and_mask_covers_head():
    subject = anatomy.make_subject(seed=11, image_size=128, num_slices=4, has_tumour=False)
    tissue = subject["tissue"]  # (S, H, W): 0 outside the head.
    x = jnp.asarray(subject["image"])
    s, organ = extraction.extract(
        x,
        jnp.asarray(subject["label"]),
        extraction.ExtractionParams.from_config(tables.extraction("phantom")),
        remove_lesions=True,
    )
    s, organ = np.asarray(s)[..., 0] > 0, np.asarray(organ)[..., 0] > 0
    # Tissue boundaries: pixels whose 3×3 neighbourhood holds more than one tissue, widened by a pixel
    # (Sobel responds on both sides of an edge).
    edges = np.stack([ndimage.maximum_filter(t, 3) != ndimage.minimum_filter(t, 3) for t in tissue])
    near_edges = np.stack([ndimage.binary_dilation(e, iterations=1) for e in edges])
    precision = (s & near_edges).sum() / max(s.sum(), 1)
    chance = near_edges.mean()
    assert s.sum() > 0
    assert precision > 0.8 and precision > 2 * chance, (precision, chance)
    head = tissue > 0
    assert (organ & head).sum() / head.sum() > 0.95  # The mask covers the head ...
    assert (organ & ~head).sum() / (~head).sum() < 0.1  # ... and not much of the background.
