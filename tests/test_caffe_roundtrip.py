"""The ground everything stands on: real pycaffe forward, backward, save, load."""
import numpy as np
import caffe
from caffe import layers as L

from base import caffe_io


def tiny_net_proto():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 12, 10]))
    n.label = L.Input(shape=dict(dim=[2, 1]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1,
                            weight_filler=dict(type="gaussian", std=0.1), bias_filler=dict(type="constant", value=0.1))
    n.relu1 = L.PReLU(n.conv1, in_place=True)
    n.fc = L.InnerProduct(n.conv1, num_output=3, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.fc, n.label)
    proto = n.to_proto()
    proto.force_backward = True
    return proto


def forward(net, x, label):
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = label
    net.forward()
    return net.blobs["fc"].data.copy(), float(net.blobs["loss"].data)


def test_forward_backward_save_reload(tmp_path):
    proto_path = str(tmp_path / "tiny.prototxt")
    caffe_io.write_net(tiny_net_proto(), proto_path)
    net = caffe.Net(proto_path, caffe.TRAIN)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 12, 10)).astype(np.float32)
    label = np.array([[0], [2]], dtype=np.float32)
    fc, loss = forward(net, x, label)
    assert np.isfinite(loss) and loss > 0

    net.backward()
    grad = net.params["conv1"][0].diff
    assert np.abs(grad).sum() > 0, "backward produced no gradient"
    # Independent check of Caffe's InnerProduct: fc = W . flatten(prelu(conv)) + b
    W, b = (p.data for p in net.params["fc"])
    feat = net.blobs["conv1"].data.reshape(2, -1)
    np.testing.assert_allclose(fc, feat @ W.T + b, rtol=1e-5, atol=1e-5)

    # Caffe's own save, then reload in a fresh net: identical outputs.
    saved = str(tmp_path / "tiny.caffemodel")
    net.save(saved)
    again = caffe.Net(proto_path, saved, caffe.TEST)
    fc2, loss2 = forward(again, x, label)
    np.testing.assert_array_equal(fc, fc2)
    assert loss == loss2

    # The toolkit's own reader/writer round-trips the same file bit for bit in values.
    arrays = caffe_io.read_weights(saved)
    assert list(arrays) == ["conv1", "relu1", "fc"]
    rewritten = caffe_io.write_weights(caffe_io.read_net(proto_path), arrays, str(tmp_path / "rewritten.caffemodel"))
    third = caffe.Net(proto_path, rewritten, caffe.TEST)
    fc3, _ = forward(third, x, label)
    np.testing.assert_array_equal(fc, fc3)
