"""Evaluation metrics, one module per family (METHOD §8, §9.3, §9.4).

* :mod:`~synth.metrics.segmentation`: Dice per class and per BRATS region, the authors' parity Dice / MSE.
  Its names are also available here (``metrics.dice_per_class``, ...), as before the split.
* :mod:`~synth.metrics.image`: MSE, PSNR, SSIM, TF-exact MS-SSIM and its real-vs-synthetic / diversity
  pairing protocols.
* :mod:`~synth.metrics.distribution`: Fréchet distance (FID), KID, the feature-extractor interface;
  :mod:`~synth.metrics.inception` holds the FID Inception-v3 and its weight loading.
* :mod:`~synth.metrics.vessel`: DRIVE sensitivity, specificity, accuracy and AUC inside the field of view.
* :mod:`~synth.metrics.classification`: accuracy and confusion matrix.
* :mod:`~synth.metrics.detection`: VOC AP and mAP@0.5 from box lists.
* :mod:`~synth.metrics.edges`: the form of stage A's drawn edges against real maps (3×3 patterns).

The families other than segmentation are reached through their module (``metrics.image.psnr``,
``metrics.vessel.auc``), because some names recur with different meanings (``vessel.accuracy`` counts
pixels, ``classification.accuracy`` counts images).
"""

from synth.metrics import classification, detection, distribution, edges, image, inception, vessel
from synth.metrics.segmentation import (
    BRATS_REGIONS,
    PARITY_SMOOTH,
    binary_dice_per_image,
    brats_region_dice,
    dice_per_class,
    parity_dice,
    parity_mse,
    region_mask,
)

__all__ = [
    "BRATS_REGIONS",
    "PARITY_SMOOTH",
    "binary_dice_per_image",
    "brats_region_dice",
    "classification",
    "detection",
    "dice_per_class",
    "distribution",
    "edges",
    "image",
    "inception",
    "parity_dice",
    "parity_mse",
    "region_mask",
    "vessel",
]
