"""The original Sphereface-prune scripts' criterion, reproduced for comparison.

Those scripts sum each channel's activation over a batch and all positions,
then repeatedly remove the *pair* of channels whose sums add up to the
smallest absolute value, with no reconstruction of the next layer.  An odd
number to remove ends with the single channel of smallest |sum| (the scripts
removed only pairs, so they could not ask for that)."""
import numpy as np

from .base import Criterion


class ActSum(Criterion):
    def select(self, evidence, n_keep):
        sums = np.asarray(evidence.actsum, dtype=np.float64)
        alive = list(range(len(sums)))
        to_remove = len(sums) - n_keep
        while to_remove >= 2:
            s = sums[alive]
            pair = np.abs(s[:, None] + s[None, :])
            np.fill_diagonal(pair, np.inf)
            i, j = np.unravel_index(np.argmin(pair), pair.shape)
            for k in sorted((i, j), reverse=True):
                alive.pop(k)
            to_remove -= 2
        if to_remove:
            alive.pop(int(np.argmin(np.abs(sums[alive]))))
        return sorted(alive)
