"""The criterion that scores channels one by one."""
import numpy as np


class Scored:
    """select() keeps the n_keep channels with the highest ``scores`` (ties: the lower channel first)."""

    def scores(self, evidence):
        raise NotImplementedError

    def select(self, evidence, n_keep):
        return sorted(np.argsort(-np.asarray(self.scores(evidence)), kind="stable")[:n_keep].tolist())
