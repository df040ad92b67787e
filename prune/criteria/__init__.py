"""Channel selection criteria, one small module each, behind one interface.

A criterion is an object with

    select(evidence, n_keep) -> sorted kept channel indices of the group

and, when it ranks channels one by one (L1, random, BN scale), also

    scores(evidence) -> one importance per channel (higher: keep)

so a policy may rank channels of several groups together (prune.policy);
``Scored`` derives ``select`` from ``scores``.  Subset criteria (ThiNet's
greedy, LASSO, the activation-sum pairs) only select.  How many channels a
group keeps is the policy's business (prune.policy), and what happens to the
layers that read the group is the reconstruction's (prune.reconstruct).

``evidence`` (prune.sample.Evidence) carries the group, the current weights,
each consumer's Gram matrix of sampled contributions and the activation sums,
so weight-based, data-based and reconstruction-based criteria share one call.
Taylor scores (prune.taylor) are computed from a loss's gradient by the
Taylor app and ranked across groups by ``prune.policy.global_ranking``.
"""
from .base import Scored  # noqa: F401
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
