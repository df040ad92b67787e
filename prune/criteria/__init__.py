"""Channel selection criteria, one small module each, behind one interface.

A criterion is a ``Criterion`` (criteria.base) with

    select(evidence, n_keep) -> sorted kept channel indices of the group

and, when it ranks channels one by one (L1, BN scale, Taylor), also

    scores(evidence) -> one importance per channel (higher: keep)

so a policy may rank channels of several groups together (prune.policy);
``Scored`` derives ``select`` from ``scores``.  Subset criteria (ThiNet's
greedy, LASSO, the activation-sum pairs) only select.  How many channels a
group keeps is the policy's business (prune.policy), and what happens to the
layers that read the group is the reconstruction's (prune.reconstruct).

``evidence`` (prune.sample.Evidence) carries the group, the current weights,
each consumer's Gram matrix of sampled contributions and the activation sums,
so weight-based, data-based and reconstruction-based criteria share one call.
A criterion with ``needs_gradient`` (Taylor) also gets ``evidence.taylor``,
the first-order change of a loss per channel from Caffe's backward pass
(prune.gradient): the layer-by-layer driver uses a label-free loss, apps.taylor
a distillation train net, and both rank with the same criterion.

A new criterion: one module here with a ``Criterion`` subclass, one line in
``CRITERIA``.
"""
from .base import Criterion, CriterionError, Scored  # noqa: F401
from .actsum import ActSum
from .bnscale import BNScale
from .l1 import L1
from .lasso import Lasso
from .random import Random
from .taylor import Taylor
from .thinet import ThiNet

CRITERIA = {
    "thinet": lambda **kw: ThiNet(variant="remove", **kw),
    "thinet-add": lambda **kw: ThiNet(variant="add", **kw),
    "lasso": Lasso,
    "l1": L1,
    "random": Random,
    "actsum": ActSum,
    "bnscale": BNScale,
    "taylor": Taylor,
}


def make(name, **params):
    if name not in CRITERIA:
        raise CriterionError("unknown criterion %r; choose one of %s" % (name, ", ".join(CRITERIA)))
    return CRITERIA[name](**params)
