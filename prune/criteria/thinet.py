"""ThiNet (Luo et al., ICCV 2017): keep the channels whose removal least
changes the consumers' outputs, then rescale the kept ones by least squares.

remove-greedy is the paper's algorithm; add-greedy grows the kept set with a
least-squares refit at every step.  A residual stream's consumers are weighed
jointly, each normalised by its own output energy.
"""
from prune import gram

from .base import Criterion


class ThiNet(Criterion):
    def __init__(self, variant="remove", seed=0):
        if variant not in ("remove", "add"):
            raise ValueError("ThiNet variant must be 'remove' or 'add', not %r" % variant)
        self.variant = variant

    def select(self, evidence, n_keep):
        G = gram.joint_gram(evidence.grams.values())
        C = G.shape[0]
        if self.variant == "remove":
            removed = set(gram.remove_greedy(G, C - n_keep))
            return [c for c in range(C) if c not in removed]
        return sorted(gram.add_greedy(G, n_keep))
