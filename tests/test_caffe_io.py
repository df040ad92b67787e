"""Caffe file I/O: legacy formats upgraded, named errors, outputs never over inputs."""
import os

import numpy as np
import pytest
import caffe
from caffe.proto import caffe_pb2

from base import caffe_io

V1_NET = """name: "old"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "fc" type: INNER_PRODUCT bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
"""


def test_v1_prototxt_is_upgraded_by_caffes_own_tool(tmp_path):
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_NET)
    net = caffe_io.read_net(str(path))
    assert [(l.name, l.type) for l in net.layer] == [("input", "Input"), ("conv", "Convolution"),
                                                     ("relu", "ReLU"), ("fc", "InnerProduct")]
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8]


def test_legacy_input_fields_become_an_input_layer(tmp_path):
    path = tmp_path / "legacy.prototxt"
    path.write_text('input: "data"\ninput_shape { dim: 2 dim: 3 dim: 5 dim: 5 }\n'
                    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1 } }\n')
    net = caffe_io.read_net(str(path))
    assert net.layer[0].type == "Input" and list(net.layer[0].input_param.shape[0].dim) == [2, 3, 5, 5]
    assert len(net.input) == 0


def test_legacy_4d_blob_shapes_load_into_the_net(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 } } }\n'
                     'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }\n')
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    old = caffe_pb2.NetParameter()
    layer = old.layer.add(name="fc", type="InnerProduct")
    for array, dims in ((W, (1, 1, 3, 6)), (b, (1, 1, 1, 3))):
        blob = layer.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
        blob.data.extend(array.ravel().tolist())
    model = tmp_path / "old.caffemodel"
    model.write_bytes(old.SerializeToString())
    weights = caffe_io.read_weights(str(model))
    assert weights["fc"][0].shape == (1, 1, 3, 6)
    net = caffe_io.open_net(str(proto), str(model))
    np.testing.assert_array_equal(net.params["fc"][0].data, W)
    x = rng.standard_normal((1, 6)).astype(np.float32)
    out = net.forward(data=x)["fc"]
    np.testing.assert_allclose(out, x @ W.T + b, rtol=1e-5)
    # and Caffe's own reader agrees with ours
    np.testing.assert_array_equal(caffe.Net(str(proto), str(model), caffe.TEST).params["fc"][0].data, W)


def test_errors_name_the_file_line_and_layer(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer {\n  name: "a"\n  type: "Input"\n  top: "data"\n  bogus_field: 3\n}\n')
    with pytest.raises(caffe_io.CaffeFileError, match=r"bad\.prototxt:5:"):
        caffe_io.read_net(str(bad))
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(caffe_io.CaffeFileError, match="junk.caffemodel is not a Caffe binary model"):
        caffe_io.read_weights(str(junk))
    with pytest.raises(caffe_io.CaffeFileError, match="cannot read weights .*missing.caffemodel"):
        caffe_io.read_weights(str(tmp_path / "missing.caffemodel"))


def test_atomic_write_refuses_inputs_and_leaves_nothing_half_written(tmp_path):
    src = tmp_path / "in.caffemodel"
    src.write_bytes(b"original")
    with pytest.raises(caffe_io.CaffeFileError, match="refusing to overwrite the input file"):
        caffe_io.atomic_write(str(src), b"new", protect=[str(src)])
    assert src.read_bytes() == b"original"

    target = tmp_path / "out.bin"
    with pytest.raises(TypeError):
        caffe_io.atomic_write(str(target), 12345)   # not bytes or text: fails while writing
    assert not target.exists() and os.listdir(tmp_path) == ["in.caffemodel"]
    caffe_io.atomic_write(str(target), b"ok")
    assert target.read_bytes() == b"ok" and oct(os.stat(target).st_mode & 0o777) != "0o600"
