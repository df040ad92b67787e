"""Random channels: the baseline every criterion must beat."""
import numpy as np

from .base import Criterion


class Random(Criterion):
    needs_images = False

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def select(self, evidence, n_keep):
        return sorted(self.rng.choice(evidence.group.channels, n_keep, replace=False).tolist())
