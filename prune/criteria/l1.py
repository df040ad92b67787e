"""Li et al. 2017: keep the filters with the largest L1 norm.

A group with several producers (a residual stream) sums each producer's
norms, normalised by that producer's mean norm so no layer dominates."""
import numpy as np

from .base import Scored


class L1(Scored):
    needs_images = False

    def scores(self, evidence):
        score = np.zeros(evidence.group.channels)
        for s in evidence.group.producers:
            if s.blob != 0:          # the bias rows carry no filter
                continue
            W = np.moveaxis(np.asarray(evidence.weights[s.layer][0]), s.axis, 0)
            rows = W.reshape(W.shape[0], -1)
            norms = np.abs(rows[s.indices(np.arange(evidence.group.channels))]).sum(axis=1)
            score += norms / max(norms.mean(), 1e-30)
        return score
