"""Taylor scores: the signed term sum(a * dL/da) is the derivative of Caffe's loss under scaling a channel.

Finite differences use real Caffe forward passes only: either the blob a
consumer reads is edited between layers (forward(end=...), edit,
forward(start=...)), or every producer row of the channel is scaled, which
scales the channel of the whole residual stream exactly because PReLU is
positively homogeneous and an Eltwise SUM is linear.
"""
import numpy as np
import pytest
import caffe
from caffe import layers as L

from base import caffe_io
from prune.graph import build_graph
from prune.policy import global_ranking
from prune.criteria.taylor import Taylor
from prune.sample import Evidence
from prune.gradient import GradientError, gradient_terms, taylor_scores, taylor_terms
import nets

BATCH = 4


def small_net(with_loss=True):
    """A conv with BatchNorm+Scale+PReLU in place, a residual stream of two producers, a softmax loss
    (or, without, the deploy net ending in fc)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[BATCH, 3, 10, 10]))
    if with_loss:
        n.label = L.Input(shape=dict(dim=[BATCH]))
    n.c1 = L.Convolution(n.data, num_output=5, kernel_size=3, pad=1)
    n.bn1 = L.BatchNorm(n.c1, in_place=True)
    n.sc1 = L.Scale(n.c1, bias_term=True, in_place=True)
    n.r1 = L.PReLU(n.c1, in_place=True)
    n.c2 = L.Convolution(n.c1, num_output=6, kernel_size=3, stride=2, pad=1)
    n.r2 = L.PReLU(n.c2, in_place=True)
    n.u1 = L.Convolution(n.c2, num_output=4, kernel_size=3, pad=1)
    n.ru1 = L.PReLU(n.u1, in_place=True)
    n.u2 = L.Convolution(n.u1, num_output=6, kernel_size=3, pad=1)
    n.add = L.Eltwise(n.c2, n.u2)
    n.radd = L.PReLU(n.add, in_place=True)
    n.fc = L.InnerProduct(n.add, num_output=7)
    if with_loss:
        n.loss = L.SoftmaxWithLoss(n.fc, n.label)
    return n.to_proto()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    proto = caffe_io.write_net(small_net(), str(tmp_path_factory.mktemp("taylor") / "net.prototxt"))
    weights = nets.random_weights(proto, seed=4)
    net = caffe.Net(proto, caffe.TRAIN)  # BatchNorm on batch statistics: its gradient flows through them
    caffe_io.load_into(net, weights)
    rng = np.random.default_rng(5)
    feed = {"data": rng.standard_normal((BATCH, 3, 10, 10)).astype(np.float32),
            "label": rng.integers(0, 7, BATCH).astype(np.float32)}
    groups = {g.id: g for g in build_graph(caffe_io.read_net(proto)).prunable()}
    return net, weights, feed, groups


def loss(net, feed):
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    return float(net.forward()["loss"])


def loss_blob_scaled(net, feed, blob, before, after, channel, s):
    """Loss with channel ``channel`` of ``blob`` times s, edited between layers ``before`` and ``after``."""
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    net.forward(end=before)
    net.blobs[blob].data[:, channel] *= s
    return float(net.forward(start=after)["loss"])


def loss_producers_scaled(net, weights, feed, group, channel, s):
    """Loss with row ``channel`` (weights and bias) of every producer of the group times s."""
    for p in group.producers:
        net.params[p.layer][p.blob].data[p.indices([channel])] *= s
    try:
        return loss(net, feed)
    finally:
        caffe_io.load_into(net, weights)


def central(f, eps=1e-3):
    """dL/ds at s = 1, with s the scale of the channel."""
    return (f(1 + eps) - f(1 - eps)) / (2 * eps)


def test_terms_equal_finite_differences(setup):
    net, weights, feed, groups = setup
    assert set(groups) == {"c1", "c2", "u1"}  # c2 is the residual stream: producers c2 and u2
    assert groups["c2"].layers("producers") == ["c2", "u2"]
    assert groups["c2"].layers("consumers") == ["u1", "fc"]
    terms = taylor_terms(net, groups.values(), [feed])
    # c1: BatchNorm, Scale and PReLU write blob c1 in place; c2 reads the last of them
    fd = [central(lambda s: loss_blob_scaled(net, feed, "c1", "r1", "c2", c, s)) for c in range(5)]
    np.testing.assert_allclose(terms["c1"], fd, rtol=0.02, atol=1e-2 * np.abs(fd).max())
    for gid in ("c2", "u1"):
        fd = [central(lambda s: loss_producers_scaled(net, weights, feed, groups[gid], c, s))
              for c in range(groups[gid].channels)]
        np.testing.assert_allclose(terms[gid], fd, rtol=0.02, atol=1e-2 * np.abs(fd).max())


def test_terms_predict_the_loss_change_of_zeroing(setup):
    """To first order, L(channel removed) - L = -term (removal is a large step: only a correlation holds)."""
    net, weights, feed, groups = setup
    terms = taylor_terms(net, groups.values(), [feed])
    base = loss(net, feed)
    predicted, change = [], []
    for gid, group in groups.items():
        for c in range(group.channels):
            predicted.append(-terms[gid][c])
            change.append(loss_producers_scaled(net, weights, feed, group, c, 0.0) - base)
    assert np.corrcoef(predicted, change)[0, 1] > 0.8


def test_the_in_place_blob_diff_would_be_wrong(setup):
    """After a full backward blob c1's diff is the gradient of the conv output, not of what c2 reads."""
    net, weights, feed, groups = setup
    terms = taylor_terms(net, [groups["c1"]], [feed])["c1"]
    loss(net, feed)
    net.backward()
    naive = np.einsum("nchw,nchw->c", net.blobs["c1"].data, net.blobs["c1"].diff)
    assert np.abs(naive - terms).max() > 0.2 * np.abs(terms).max()


def test_scores_are_normalised_and_accumulate_over_batches(setup):
    net, weights, feed, groups = setup
    one = taylor_terms(net, groups.values(), [feed])
    two = taylor_terms(net, groups.values(), [feed, feed])
    own = taylor_terms(net, groups.values(), 2)  # batches from the net's own inputs: still the last feed
    for gid in one:
        np.testing.assert_allclose(two[gid], one[gid], rtol=1e-5, atol=1e-9)  # a mean over batches
        np.testing.assert_allclose(own[gid], one[gid], rtol=1e-5, atol=1e-9)
    scores = taylor_scores(net, groups.values(), [feed])
    for gid, s in scores.items():
        assert s.shape == (groups[gid].channels,) and (s >= 0).all()
        assert np.linalg.norm(s) == pytest.approx(1.0)
        np.testing.assert_allclose(s, np.abs(one[gid]) / np.linalg.norm(one[gid]), rtol=1e-5)


def test_global_ranking():
    terms = {"a": np.array([3.0, -4.0]), "b": np.array([1.0, 0.0, 0.0]), "z": np.zeros(2)}
    scores = {gid: Taylor().scores(Evidence(group=None, weights=None, taylor=t)) for gid, t in terms.items()}
    np.testing.assert_allclose(scores["a"], [0.6, 0.8])
    ranking = global_ranking(scores)
    assert ranking == [("b", 1), ("b", 2), ("z", 0), ("z", 1), ("a", 0), ("a", 1), ("b", 0)]


def test_bad_groups_are_named(setup, tmp_path):
    net, weights, feed, groups = setup
    other = caffe_io.write_net(nets.concat_net(), str(tmp_path / "other.prototxt"))
    foreign = build_graph(other).groups["up"]
    with pytest.raises(GradientError, match="group 'up': consumer layer 'e' is not in the net"):
        taylor_terms(net, [foreign], [feed])
    with pytest.raises(GradientError, match="no batches"):
        taylor_terms(net, [groups["c1"]], [])
    with pytest.raises(GradientError, match="blob 'images'"):
        taylor_terms(net, [groups["c1"]], [{"images": feed["data"]}])


# ------------------------------------------------------------------ the label-free loss of the prune driver

def mirror_loss(student, teacher, x):
    """The loss MirrorDistillation differentiates, from Caffe forward passes: 1/(2N) sum ||u(f) - u(t)||^2."""
    def out(net, images):
        net.blobs["data"].data[...] = images
        return np.array(net.forward()["fc"], dtype=np.float64)

    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    t = out(teacher, x) + out(teacher, x[..., ::-1])
    return 0.5 * np.sum((unit(out(student, x)) - unit(t)) ** 2) / x.shape[0]


def test_label_free_terms_are_the_derivative_of_the_mirror_distillation_loss(tmp_path):
    """A deploy net with no loss layer: Caffe back-propagates the gradient set at its output; the terms
    equal finite differences of the loss computed from forward passes, for the unpruned net itself (the
    first group the driver scores) and for a perturbed student."""
    proto = caffe_io.write_net(small_net(with_loss=False), str(tmp_path / "deploy.prototxt"))
    param = caffe_io.read_net(proto)
    weights = nets.random_weights(proto, seed=7)
    teacher = caffe_io.open_net(proto)
    caffe_io.load_into(teacher, weights)
    groups = {g.id: g for g in build_graph(param).prunable()}
    x = np.random.default_rng(8).standard_normal((BATCH, 3, 10, 10)).astype(np.float32)
    rng = np.random.default_rng(9)
    perturbed = {k: [np.asarray(b) * (1 + 0.2 * rng.standard_normal(np.shape(b))) for b in v]
                 for k, v in weights.items()}
    for student_weights in (weights, perturbed):
        terms = gradient_terms(param, student_weights, groups.values(), [x], teacher)
        student = caffe_io.open_net(proto)
        caffe_io.load_into(student, student_weights)
        assert mirror_loss(student, teacher, x) > 1e-4
        for gid in ("c2", "u1"):
            def f(s, gid=gid, c=0):
                for p in groups[gid].producers:
                    student.params[p.layer][p.blob].data[p.indices([c])] *= s
                try:
                    return mirror_loss(student, teacher, x)
                finally:
                    caffe_io.load_into(student, student_weights)
            fd = [central(lambda s: f(s, c=c)) for c in range(groups[gid].channels)]
            np.testing.assert_allclose(terms[gid], fd, rtol=0.03, atol=2e-2 * np.abs(fd).max())


def test_taylor_criterion_in_the_prune_driver_keeps_the_channels_of_largest_terms(tmp_path):
    """python -m prune --criterion taylor: the first group's kept channels are the top |terms| of the
    unpruned net on the same images (later groups are scored on the already pruned net)."""
    from prune.driver import PruneJob, run
    from prune.plans import PlanSpec, make as make_plan
    proto = caffe_io.write_net(small_net(with_loss=False), str(tmp_path / "deploy.prototxt"))
    weights = nets.random_weights(proto, seed=10)
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "w.caffemodel"))
    x = np.random.default_rng(11).standard_normal((BATCH, 3, 10, 10)).astype(np.float32)
    job = PruneJob(model=proto, weights=model, out=str(tmp_path / "run"), criterion="taylor",
                   plan=make_plan(PlanSpec(), proto), samples_per_image=4, reconstruct="none")
    log = run(job, lambda: iter([x]), progress=False)
    first = log["steps"][0]
    teacher = caffe_io.open_net(proto, model)
    group = build_graph(caffe_io.read_net(proto))[first["group"]]
    terms = gradient_terms(caffe_io.read_net(proto), caffe_io.read_weights(model), [group], [x], teacher)
    expected = np.argsort(-np.abs(terms[group.id]), kind="stable")[:first["kept"]]
    assert first["criterion"] == "taylor"
    assert sorted(set(range(group.channels)) - set(expected.tolist())) == first["removed_channels"]
    assert [s["kept"] for s in log["steps"]] == [max(1, round(s["channels"] * 0.5)) for s in log["steps"]]
    caffe_io.open_net(log["prototxt"], log["caffemodel"])     # the result loads in Caffe
