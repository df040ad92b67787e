"""Channel prioritisation regularisers on the BN scaling factors (Scale gammas).

For every Scale layer l with factors gamma_1..gamma_N (the BatchNorm scale):

    sparsity      lambda_s * sum_k |gamma_k|
    monotonicity  lambda_m * sum_k max(0, gamma_{k+1} - gamma_k)

The first drives unimportant channels to zero (network slimming); the second
keeps the factors sorted, so that "the first p % of the channels" are the
important ones and one set of weights serves several widths.  Pre-training
starts from the monotone initialisation gamma_k = 1 - (k-1)/N.

Caffe's solvers know neither term; ``step`` is the per-iteration hook of
finetune.loop that adds their subgradients to the Scale diffs between
backward and the update:

    loop.train(folder, deploy, n, init, step=lambda solver: step(solver, 1e-3, 4e-5), columns=("penalty",),
               on_start=monotone_init)

``step`` is clear_param_diffs, forward/backward (iter_size times),
add_penalty_grad, apply_update; ``apply_update`` runs the solver's whole
update (lr policy, momentum/Adam, weight decay) and advances ``solver.iter``,
exactly as ``solver.step(1)`` would.
"""
import numpy as np

from base.errors import ToolkitError


class PenaltyError(ToolkitError):
    """Penalty weights or layers that do not fit the net."""


def scale_layers(net, layers=None):
    """Names of the Scale layers of a caffe.Net (or the given ones, checked)."""
    types = dict(zip(net._layer_names, (layer.type for layer in net.layers)))
    if layers is None:
        return [name for name, kind in types.items() if kind == "Scale" and name in net.params]
    for name in layers:
        if types.get(name) != "Scale":
            raise PenaltyError("layer %r is %s, not a Scale layer with factors"
                               % (name, "absent" if name not in types else "a %s" % types[name]))
        if name not in net.params:
            raise PenaltyError("Scale layer %r takes its factors from a bottom, it has no gamma to regularise" % name)
    return list(layers)


def _check(lambda_s, lambda_m):
    for key, v in (("lambda_s", lambda_s), ("lambda_m", lambda_m)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise PenaltyError("%s must be a number >= 0, got %r" % (key, v))


def penalty(gamma, lambda_s, lambda_m):
    """lambda_s * sum|gamma| + lambda_m * sum max(0, gamma_{k+1} - gamma_k) of one layer's factors."""
    g = np.asarray(gamma, dtype=np.float64).ravel()
    return float(lambda_s * np.abs(g).sum() + lambda_m * np.maximum(0.0, np.diff(g)).sum())


def penalty_grad(gamma, lambda_s, lambda_m):
    """A subgradient of ``penalty`` (0 where a term has a kink), shaped like gamma."""
    g = np.asarray(gamma, dtype=np.float64)
    flat = g.ravel()
    out = lambda_s * np.sign(flat)
    rising = (np.diff(flat) > 0).astype(np.float64)   # term k: + on gamma_{k+1}, - on gamma_k
    out[1:] += lambda_m * rising
    out[:-1] -= lambda_m * rising
    return out.reshape(g.shape)


def add_penalty_grad(net, lambda_s, lambda_m, layers=None, scale=1.0):
    """Add the penalty's subgradient (times ``scale``) to the gamma diffs; return the penalty.

    Call it after backward and before ``solver.apply_update()``.  With
    iter_size > 1 the solver divides the diffs by iter_size: pass
    scale=iter_size (``step`` does).
    """
    _check(lambda_s, lambda_m)
    total = 0.0
    for name in scale_layers(net, layers):
        blob = net.params[name][0]
        total += penalty(blob.data, lambda_s, lambda_m)
        blob.diff[...] += scale * penalty_grad(blob.data, lambda_s, lambda_m)
    return total


def monotone_init(net, layers=None):
    """gamma_k = 1 - (k-1)/N_l in every Scale layer (k = 1..N_l); returns the layer names."""
    names = scale_layers(net, layers)
    for name in names:
        data = net.params[name][0].data
        n = data.size
        data[...] = (1.0 - np.arange(n) / n).reshape(data.shape)
    return names


def step(solver, lambda_s, lambda_m, layers=None, iter_size=1):
    """One regularised solver iteration; returns (mean net loss, penalty before the update).

    iter_size must be the solver's (pycaffe does not expose it).
    """
    if isinstance(iter_size, bool) or not isinstance(iter_size, int) or iter_size < 1:
        raise PenaltyError("iter_size must be an integer >= 1, got %r" % (iter_size,))
    net = solver.net
    net.clear_param_diffs()
    loss = 0.0
    for _ in range(iter_size):
        out = net.forward()
        net.backward()
        weights = net.blob_loss_weights
        loss += sum(weights[k] * float(np.sum(v)) for k, v in out.items())
    value = add_penalty_grad(net, lambda_s, lambda_m, layers, scale=iter_size)
    solver.apply_update()
    return loss / iter_size, value
