"""He et al. 2017 (channel pruning): LASSO on the channels' contributions,
alpha bisected until the count is met, then least-squares reconstruction."""
from prune import gram

from .base import Criterion


class Lasso(Criterion):
    def select(self, evidence, n_keep):
        return gram.lasso_select(gram.joint_gram(evidence.grams.values()), n_keep)
