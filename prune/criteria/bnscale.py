"""Network slimming (Liu et al. 2017): keep the channels with the largest |gamma|.

gamma is the factor of the group's Scale passenger(s), the BatchNorm scale.
A group with several Scale layers (a residual stream: one per conv feeding
it) scores each channel by its largest |gamma|: a channel goes only when no
layer of the stream uses it.  Slimming itself fine-tunes instead of
reconstructing (``--reconstruct none``).

``global_threshold_keep`` is the slimming prune step itself: one threshold
over the whole net instead of a ratio per group.
"""
import numpy as np

from .base import CriterionError, Scored


def scale_gammas(group, weights):
    """|gamma| per channel of the group: the largest over its Scale passengers."""
    found = [s for s in group.passengers if s.type == "Scale" and s.blob == 0]
    if not found:
        layers = ", ".join(group.layers("passengers")) or "none"
        raise CriterionError("group %r has no Scale layer among its passengers (%s): the bnscale criterion "
                             "needs BatchNorm + Scale after the group's convs" % (group.id, layers))
    channels = np.arange(group.channels)
    score = np.zeros(group.channels)
    for s in found:
        if s.layer not in weights:
            raise CriterionError("weights have no Scale layer %r (group %r)" % (s.layer, group.id))
        gamma = np.abs(np.asarray(weights[s.layer][0], dtype=np.float64).ravel())
        score = np.maximum(score, gamma[s.indices(channels)])
    return score


class BNScale(Scored):
    needs_images = False

    def scores(self, evidence):
        return scale_gammas(evidence.group, evidence.weights)


def global_threshold_keep(graph, weights, threshold=0.1):
    """{group id: [channels with |gamma| >= threshold]} for every prunable group.

    A group whose every |gamma| is below the threshold keeps its largest one:
    a layer with no channel at all is not a net.  These very channels are the
    plan of ``--threshold`` (prune.policy.by_threshold): the driver cuts them,
    nothing selects again.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise CriterionError("global threshold must be a number >= 0, got %r" % (threshold,))
    keep = {}
    for g in graph.prunable():
        gamma = scale_gammas(g, weights)
        kept = np.flatnonzero(gamma >= threshold)
        keep[g.id] = kept.tolist() if kept.size else [int(np.argmax(gamma))]
    return keep
