"""What every criterion is, and the criterion that scores channels one by one."""
import numpy as np

from base.errors import ToolkitError


class CriterionError(ToolkitError):
    """A criterion that cannot rank this net's channels (the bnscale criterion on a net without BN scales)."""


class Criterion:
    """select(evidence, n_keep) -> sorted kept channels of ``evidence.group``.

    ``needs_images``: the criterion reads what sampling the net on images gives (Grams, activation sums); one
    that does not (it reads weights only) lets the driver prune without running the net, e.g. a net with a
    Caffe fork's layers, when nothing else needs images either.
    ``needs_gradient``: the evidence must carry ``taylor``, the first-order change of a loss per channel
    (prune.gradient.gradient_terms); the driver computes it only for criteria that say so, since it costs a
    backward pass."""
    needs_images = True
    needs_gradient = False

    def __init__(self, seed=0):
        pass

    def select(self, evidence, n_keep):
        raise NotImplementedError


class Scored(Criterion):
    """select() keeps the n_keep channels with the highest ``scores`` (ties: the lower channel first)."""

    def scores(self, evidence):
        raise NotImplementedError

    def select(self, evidence, n_keep):
        return sorted(np.argsort(-np.asarray(self.scores(evidence)), kind="stable")[:n_keep].tolist())
