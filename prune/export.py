"""python -m prune.export: a Caffe net as an ONNX file, checked against Caffe in ONNX Runtime before it is written."""
import os

import numpy as np

from base import caffe_io, cli
import runtimes
from runtimes.onnx_export import OPSET, export, preprocessing

PROG = "python -m prune.export"


def check_in_onnxruntime(model, prototxt, caffemodel, seed=0):
    """Largest deviation of ONNX Runtime's output from Caffe's on prune.verify's seeded inputs (relative to
    Caffe's largest magnitude, prune.verify.deviation); None when ONNX Runtime is not installed."""
    from prune.verify import deviation, inputs
    if runtimes.missing("onnxruntime"):
        return None
    caffe = runtimes.CaffeSession(prototxt, caffemodel)
    xs = inputs(caffe.input_shape(), 2, seed)
    refs = [caffe.run(x).astype(np.float64) for x in xs]
    return deviation(runtimes.ONNXRuntimeSession(model), xs, refs)["max_rel_deviation"]


def parser():
    ap = cli.parser(PROG, description="Write a Caffe deploy net and its weights (pruned by this toolkit or not) "
                    "as an ONNX model (opset %d, batch axis free) for the runtimes that read ONNX: ONNX Runtime, "
                    "OpenVINO, OpenCV DNN, TensorRT, pnnx/ncnn. Every layer type the toolkit prunes is "
                    "exported; the shapes come from Caffe. The model is checked by onnx.checker and, where ONNX "
                    "Runtime is installed, run beside Caffe: it is written only when the two agree within "
                    "--tolerance. The preprocessing (input name, NCHW, colour order, (pixel - 127.5) / 128) is in "
                    "the model's metadata." % OPSET)
    ap.add_argument("prototxt", help="deploy prototxt (one N x 3 x H x W Input)")
    ap.add_argument("caffemodel", help="its weights (never modified)")
    ap.add_argument("--to", choices=("onnx",), default="onnx", help="the format written (onnx)")
    ap.add_argument("-o", "--out", required=True, help="the .onnx file to write (written whole or not at all)")
    ap.add_argument("--rgb", action="store_true", help="record that the net takes RGB planes (default BGR)")
    ap.add_argument("--crop", default="none", choices=("none", "112x96"),
                    help="record the crop the net's images get: none, or 112x96 (the middle 96 columns of a "
                         "112x112 aligned face, as SphereFace)")
    ap.add_argument("--tolerance", type=cli.non_negative, default=1e-4,
                    help="largest relative deviation of ONNX Runtime's output from Caffe's (default 1e-4)")
    return ap


@cli.entry(PROG)
def main(argv=None):
    a = parser().parse_args(argv)
    cli.check_file(a.prototxt, "prototxt")
    cli.check_file(a.caffemodel, "caffemodel")
    folder = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(folder):
        raise cli.UsageError("--out %s: no folder %s to write it in" % (a.out, folder))
    cli.check_outputs(dict(prototxt=a.prototxt, caffemodel=a.caffemodel), [a.out])
    model = export(a.prototxt, a.caffemodel, preprocessing(a.prototxt, a.rgb, a.crop))
    deviation = check_in_onnxruntime(model, a.prototxt, a.caffemodel)
    if deviation is not None and deviation > a.tolerance:
        raise AssertionError("ONNX Runtime's output deviates from Caffe's by %.3g (relative) on %s, over "
                             "--tolerance %g: the export of some layer is wrong; nothing written"
                             % (deviation, a.prototxt, a.tolerance))
    caffe_io.atomic_write(a.out, model.SerializeToString(), protect=(a.prototxt, a.caffemodel))
    said = ("ONNX Runtime agrees with Caffe to %.2g (relative)" % deviation if deviation is not None else
            "ONNX Runtime is not installed: checked by onnx.checker only")
    print("%s: %d nodes, opset %d; %s" % (a.out, len(model.graph.node), OPSET, said))
    return 0


if __name__ == "__main__":
    cli.run(main)
