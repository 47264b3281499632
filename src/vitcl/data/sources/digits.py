"""scikit-learn's embedded 8x8 handwritten digits: the default demo, needs nothing on disk."""
from __future__ import annotations

import numpy as np
import torch

from ..dataset import ImageSet
from .base import SOURCES, Source


@SOURCES.register("digits")
class Digits(Source):
    name = "digits"
    num_classes = 10
    channels = 1
    image_size = 8
    mean = (0.3057,)
    std = (0.3791,)
    test_fraction = 0.3

    def locate(self, root):
        return "embedded in scikit-learn"

    def load(self, root, train, download=False):
        import sklearn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        targets = torch.from_numpy(bunch.target.astype(np.int64))
        # fixed stratified split: the first 30% of every class (in file order) is the test set
        test = torch.zeros(len(targets), dtype=torch.bool)
        for c in range(self.num_classes):
            idx = (targets == c).nonzero().flatten()
            test[idx[: int(round(len(idx) * self.test_fraction))]] = True
        keep = ~test if train else test
        provenance = {"folder": None, "files": [], "embedded": {"package": "scikit-learn",
                                                                "version": sklearn.__version__},
                      "images": int(keep.sum())}
        return ImageSet(targets[keep], torch.from_numpy(images)[keep], class_names=[str(i) for i in range(10)],
                        provenance=provenance)
