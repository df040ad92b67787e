"""Molchanov et al. (ICLR 2017): first-order Taylor importance of a channel.

The evidence carries ``taylor``, the signed first-order change of a loss when
the channel is zeroed (prune.gradient computes it with Caffe's backward pass);
the score is its absolute value, divided by the group's L2 norm (Molchanov's
layer-wise normalisation) so that scores of different groups can be ranked
together (prune.policy.global_ranking, as apps.taylor does).  Within one
group the normalisation changes nothing.
"""
import numpy as np

from .base import Scored


class Taylor(Scored):
    needs_gradient = True

    def scores(self, evidence):
        if evidence.taylor is None:
            raise ValueError("group %r: the taylor criterion needs the loss gradient in its evidence "
                             "(prune.gradient.gradient_terms); none was computed" % evidence.group.id)
        a = np.abs(np.asarray(evidence.taylor, dtype=np.float64))
        norm = np.linalg.norm(a)
        return a / norm if norm > 0 else a
