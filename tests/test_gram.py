"""Channel selection in Gram form: known answers, brute force, and real Caffe contributions."""
import itertools

import numpy as np
import caffe
from caffe import layers as L

from base import caffe_io
from prune import contrib, gram


def test_silent_channels_are_removed_exactly():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 10))
    X[:, [2, 5, 7]] = 0.0                       # these channels contribute nothing
    G = X.T @ X
    assert sorted(gram.remove_greedy(G, 3)) == [2, 5, 7]
    assert gram.removal_error(G, [2, 5, 7]) == 0.0
    assert sorted(gram.add_greedy(G, 7)) == [0, 1, 3, 4, 6, 8, 9]
    assert sorted(gram.lasso_select(G, 7)) == [0, 1, 3, 4, 6, 8, 9]


def test_least_squares_recovers_a_known_scale():
    rng = np.random.default_rng(2)
    # channel 3 duplicates channel 0 (scaled by 0.5): dropping it, channel 0 must carry 1.5x
    X = rng.standard_normal((2000, 6))
    X[:, 3] = 0.5 * X[:, 0]
    G = X.T @ X
    kept = [0, 1, 2, 4, 5]
    w = gram.least_squares_scale(G, kept)
    np.testing.assert_allclose(w, [1.5, 1, 1, 1, 1], rtol=1e-6)
    assert gram.residual(G, kept, w) < 1e-8 * gram.energy(G)
    assert gram.residual(G, kept) > 0.1 * gram.energy(G) / 6   # without rescale the loss is real


def naive_remove_greedy(X, n_remove):
    """ThiNet's loop as written: recompute the removed-set norm over all samples."""
    removed = []
    for _ in range(n_remove):
        best, best_err = None, np.inf
        for c in range(X.shape[1]):
            if c in removed:
                continue
            err = np.sum(X[:, removed + [c]].sum(axis=1) ** 2)
            if err < best_err:
                best, best_err = c, err
        removed.append(best)
    return removed


def test_remove_greedy_equals_the_plain_loop_and_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(5):
        X = rng.standard_normal((300, 8)) * rng.uniform(0.1, 2.0, 8)
        X += 0.3 * rng.standard_normal((300, 1))          # correlated channels
        G = X.T @ X
        for k in (1, 3, 5):
            assert gram.remove_greedy(G, k) == naive_remove_greedy(X, k)
    # Orthogonal channels: greedy is optimal, so it must match the exhaustive search.
    Q, _ = np.linalg.qr(rng.standard_normal((300, 8)))
    X = Q * rng.uniform(0.5, 3.0, 8)
    G = X.T @ X
    for k in range(1, 8):
        best = min(itertools.combinations(range(8), k), key=lambda T: gram.removal_error(G, T))
        assert sorted(gram.remove_greedy(G, k)) == sorted(best)
    # Correlated channels: greedy is not always optimal; it must never beat the optimum.
    X = rng.standard_normal((300, 8)) + rng.standard_normal((300, 1))
    G = X.T @ X
    for k in range(1, 8):
        best = min(gram.removal_error(G, T) for T in itertools.combinations(range(8), k))
        assert gram.removal_error(G, gram.remove_greedy(G, k)) >= best - 1e-9


def test_add_greedy_refit_beats_plain_removal():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((1000, 16)) + 0.5 * rng.standard_normal((1000, 1))
    G = X.T @ X
    kept = gram.add_greedy(G, 8)
    assert len(set(kept)) == 8
    refit = gram.residual(G, kept, gram.least_squares_scale(G, kept))
    assert refit <= gram.residual(G, kept) + 1e-9
    # forward selection's residual after refit equals the direct least-squares residual
    Xs = X[:, kept]
    y = X.sum(axis=1)
    direct = np.sum((y - Xs @ np.linalg.lstsq(Xs, y, rcond=None)[0]) ** 2)
    np.testing.assert_allclose(refit, direct, rtol=1e-6)


def _conv_net(tmp_path, **conv):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6, 11, 9]))
    n.conv = L.Convolution(n.data, weight_filler=dict(type="gaussian", std=0.3),
                           bias_filler=dict(type="constant", value=0.7), **conv)
    n.ip = L.InnerProduct(n.conv, num_output=5, weight_filler=dict(type="gaussian", std=0.3),
                          bias_filler=dict(type="constant", value=-0.2))
    path = str(tmp_path / "net.prototxt")
    caffe_io.write_net(n.to_proto(), path)
    return path


def test_contributions_sum_to_caffe_outputs(tmp_path):
    rng = np.random.default_rng(5)
    for conv in (dict(num_output=4, kernel_size=3, pad=1),
                 dict(num_output=4, kernel_h=3, kernel_w=2, stride=2, pad_h=2, pad_w=0, dilation=2),
                 dict(num_output=6, kernel_size=3, group=3, stride=1, pad=1)):
        path = _conv_net(tmp_path, **conv)
        net = caffe.Net(path, caffe.TEST)
        net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].data.shape)
        net.forward()
        param = caffe_io.read_net(path).layer[1].convolution_param
        W, b = (p.data for p in net.params["conv"])
        out = net.blobs["conv"].data
        images, filters, rows, cols = contrib.sample_positions(rng, 2, 40, out.shape[1], out.shape[2], out.shape[3])
        X = contrib.conv_contributions(net.blobs["data"].data, W, contrib.conv_geometry(param),
                                       param.group, filters, images, rows, cols)
        np.testing.assert_allclose(X.sum(axis=1) + b[filters], out[images, filters, rows, cols], rtol=1e-4, atol=1e-4)

        # InnerProduct consumer: each conv channel owns its H*W block of columns
        Wip, bip = (p.data for p in net.params["ip"])
        images, filters, _, _ = contrib.sample_positions(rng, 2, 5, 5)
        hw = out.shape[2] * out.shape[3]
        X = contrib.ip_contributions(out, Wip, filters, images, hw)
        assert X.shape == (10, out.shape[1])
        np.testing.assert_allclose(X.sum(axis=1) + bip[filters], net.blobs["ip"].data[images, filters], rtol=1e-4, atol=1e-4)
