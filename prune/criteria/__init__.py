"""Channel selection criteria, one small module each, behind one interface.

A criterion is an object with

    select(evidence, n_keep) -> sorted kept channel indices of the group
    rescale: bool   whether the kept input channels of every consumer are then
                    rescaled by least squares (ThiNet's and He et al.'s last step)

``evidence`` (prune.sample.Evidence) carries the group, the current weights,
each consumer's Gram matrix of sampled contributions and the activation sums,
so weight-based, data-based and reconstruction-based criteria share one call.
Later criteria (BN-scale slimming, Taylor scores) plug in the same way.
"""
from .actsum import ActSum
from .bnscale import BNScale
from .l1 import L1
from .lasso import Lasso
from .random import Random
from .thinet import ThiNet

CRITERIA = {
    "thinet": lambda **kw: ThiNet(variant="remove", **kw),
    "thinet-add": lambda **kw: ThiNet(variant="add", **kw),
    "lasso": Lasso,
    "l1": L1,
    "random": Random,
    "actsum": ActSum,
    "bnscale": BNScale,
}


def make(name, **params):
    if name not in CRITERIA:
        raise ValueError("unknown criterion %r; choose one of %s" % (name, ", ".join(CRITERIA)))
    return CRITERIA[name](**params)
