"""Caffe SolverParameter for the fine-tune driver: the schedule in one place."""
import math

from caffe.proto import caffe_pb2

from base.errors import ToolkitError

POLICIES = ("fixed", "step", "multistep")
TYPES = ("SGD", "Adam")


class SolverError(ToolkitError):
    pass


def iterations(n_images, epochs, batch_size):
    """Epochs -> solver iterations: ceil(images * epochs / batch)."""
    if batch_size < 1:
        raise SolverError("batch size must be positive, not %d" % batch_size)
    if batch_size > n_images:
        raise SolverError("batch size %d is larger than the image list (%d images)" % (batch_size, n_images))
    n = n_images * float(epochs) / batch_size
    if not n < 2 ** 31:        # Caffe counts iterations in an int32 (and inf is no count at all)
        raise SolverError("%g epochs of %d images at batch %d are more iterations than Caffe counts (2^31 - 1)"
                          % (epochs, n_images, batch_size))
    return max(1, int(math.ceil(n)))


def solver(train_net, max_iter, snapshot_prefix, base_lr=1e-3, lr_policy="fixed", gamma=0.1, stepsize=0,
           stepvalues=(), momentum=0.9, weight_decay=5e-4, snapshot=0, gpu=False, seed=0, iter_size=1, type="SGD", momentum2=None):
    """SolverParameter for SGD with momentum (the SphereFace recipe's solver),
    or Caffe's Adam (type "Adam": momentum is beta1, momentum2 beta2).

    lr_policy: fixed | step (gamma every `stepsize` iterations) | multistep
    (gamma at each of `stepvalues`).  Snapshots every `snapshot` iterations
    (0: only the one the driver asks for at the end).
    """
    if lr_policy not in POLICIES:
        raise SolverError("unknown lr policy %r; choose one of %s" % (lr_policy, ", ".join(POLICIES)))
    if lr_policy == "step" and stepsize < 1:
        raise SolverError("lr policy 'step' needs a positive stepsize")
    if lr_policy == "multistep" and not stepvalues:
        raise SolverError("lr policy 'multistep' needs step values (iterations at which lr is multiplied by gamma)")
    if type not in TYPES:
        raise SolverError("unknown solver type %r; choose one of %s" % (type, ", ".join(TYPES)))
    if momentum2 is not None and type != "Adam":
        raise SolverError("momentum2 (beta2) is a setting of the Adam solver, not of %s" % type)
    if base_lr <= 0:
        raise SolverError("base lr must be positive, not %g" % base_lr)
    s = caffe_pb2.SolverParameter()
    s.train_net = train_net
    s.type = type
    if momentum2 is not None:
        s.momentum2 = momentum2
    s.base_lr, s.lr_policy, s.momentum, s.weight_decay = base_lr, lr_policy, momentum, weight_decay
    if lr_policy != "fixed":
        s.gamma = gamma
    if lr_policy == "step":
        s.stepsize = stepsize
    if lr_policy == "multistep":
        s.stepvalue.extend(int(v) for v in stepvalues)
    s.max_iter = max_iter
    s.iter_size = iter_size
    s.display = 0
    s.snapshot = snapshot
    s.snapshot_prefix = snapshot_prefix
    s.random_seed = seed
    s.solver_mode = caffe_pb2.SolverParameter.GPU if gpu else caffe_pb2.SolverParameter.CPU
    return s
