"""Whether a flow's samples look like the data, measured by a trained classifier (Fig. 5 in numbers).

Bits/dim say how well a flow fits, not whether its samples look like digits. A classifier trained on the same data
answers that second question on the same scale for samples and for real test images:

- ``mean_confidence``: the mean of ``max_y p(y | x)``; ``confident_fraction``: the share of images with
  ``max_y p(y | x) > CONFIDENT`` (a sample the classifier reads as one clear class);
- ``class_entropy_bits``: the entropy of the predicted class mix ``p(y) = mean_x p(y | x)`` (``log2 K`` when every
  class is equally common, 0 when all images read as one class);
- ``classifier_score``: ``exp(mean_x KL(p(y | x) || p(y)))``, the Inception score (Salimans et al. 2016) with this
  classifier in place of Inception: 1 for images the classifier cannot tell apart, ``K`` for confident predictions
  spread evenly over the ``K`` classes.

Each comes with the standard error of its mean over the images where it is a mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pipeline.models.classifiers import LoadedClassifier
from pipeline.stats import mean_and_stderr

CONFIDENT = 0.9  # max_y p(y | x) above this: the image reads as one clear class


def class_probabilities(loaded: LoadedClassifier, images: Tensor, batch_size: int) -> Tensor:
    """``p(y | x)`` ``(N, K)`` (float64) of ``images`` ``(N, C, H, W)`` in ``[0, 1]``, normalised as in training."""
    param = next(loaded.model.parameters())
    parts = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            x = loaded.stats.normalize(chunk.double()).to(device=param.device, dtype=param.dtype)
            parts.append(torch.softmax(loaded.model(x).double(), dim=-1).cpu())
    return torch.cat(parts)


def classifier_view(probs: Tensor) -> dict[str, Any]:
    """The statistics of the module docstring from ``p(y | x)`` ``(N, K)`` of N images."""
    confidence = probs.max(dim=-1).values
    mix = probs.mean(dim=0)
    kl = (torch.xlogy(probs, probs) - torch.xlogy(probs, mix)).sum(-1)  # KL(p(y|x) || p(y)); 0 ln(anything) = 0
    confident = (confidence > CONFIDENT).double()
    return {
        "n_images": len(probs),
        "mean_confidence": mean_and_stderr(confidence),
        "confident_fraction": mean_and_stderr(confident),
        "class_entropy_bits": float(-torch.xlogy(mix, mix).sum() / math.log(2)),
        "classifier_score": float(kl.mean().exp()),
        "class_mix": mix.tolist(),
    }
