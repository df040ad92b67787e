"""SphereFace-4/10/20/36/64 as Caffe NetParameters, named like the official release.

Layer names, blob names, fillers and lr/decay multipliers follow the release
(wy1iu/sphereface, train/code/sphereface_model.prototxt), so an official
``sphereface_model.caffemodel`` loads into the 20-layer deploy net by name:

* stage S (1..4) opens with ``convS_1`` (3x3 stride 2, xavier, bias lr_mult 2)
  and an in-place PReLU ``reluS_1``;
* residual unit k (1..) is ``convS_{2k}`` -> ``reluS_{2k}`` -> ``convS_{2k+1}``
  -> ``reluS_{2k+1}`` (3x3 stride 1, gaussian 0.01, bias lr_mult 0) and an
  Eltwise SUM ``resS_{2k+1}`` of the unit's input and ``convS_{2k+1}``;
* ``fc5`` (InnerProduct, 512) is the embedding; the train net adds ``fc6``
  (A-Softmax) and ``softmax_loss``.

    python -m prototxt.sphereface --depth 20 --variant deploy -o sf20.prototxt
    python -m prototxt            # rewrites the committed prototxt/sphereface*.prototxt
"""
import os

from base import caffe_io, cli  # first: it quiets glog before caffe loads
from base.proto import caffe_pb2
from prototxt import NetSpecError

UNITS = {4: (0, 0, 0, 0), 10: (0, 1, 2, 0), 20: (1, 2, 4, 1), 36: (2, 4, 8, 2), 64: (3, 8, 16, 3)}
WIDTHS = (64, 128, 256, 512)
INPUT = (3, 112, 96)
HERE = os.path.dirname(os.path.abspath(__file__))


PROG = "python -m prototxt.sphereface"
DESCRIPTION = ("Write a SphereFace prototxt with the official layer names (deploy: Input 1x3x112x96 -> fc5; "
               "train: ImageData -> fc5 -> fc6 A-Softmax -> SoftmaxWithLoss).")


def _conv(net, stage, index, bottom, num_output, bn):
    """convS_i (+ BatchNorm/Scale) + in-place PReLU; returns the top name."""
    name = "conv%d_%d" % (stage, index)
    opening = index == 1
    cp = caffe_pb2.ConvolutionParameter(
        num_output=num_output, kernel_size=[3], stride=[2 if opening else 1], pad=[1],
        weight_filler=caffe_pb2.FillerParameter(type="xavier") if opening
        else caffe_pb2.FillerParameter(type="gaussian", std=0.01))
    params = [caffe_pb2.ParamSpec(lr_mult=1, decay_mult=1)]
    if bn:  # BatchNorm's shift makes a conv bias redundant
        cp.bias_term = False
    else:  # the release trains stage-opening biases at 2x and freezes residual biases at 0
        cp.bias_filler.MergeFrom(caffe_pb2.FillerParameter(type="constant", value=0))
        params.append(caffe_pb2.ParamSpec(lr_mult=2 if opening else 0, decay_mult=0))
    net.layer.add(name=name, type="Convolution", bottom=[bottom], top=[name], param=params, convolution_param=cp)
    suffix = "%d_%d" % (stage, index)
    if bn:
        net.layer.add(name="bn" + suffix, type="BatchNorm", bottom=[name], top=[name],
                      param=[caffe_pb2.ParamSpec(lr_mult=0, decay_mult=0)] * 3)
        net.layer.add(name="scale" + suffix, type="Scale", bottom=[name], top=[name],
                      scale_param=caffe_pb2.ScaleParameter(bias_term=True))
    net.layer.add(name="relu" + suffix, type="PReLU", bottom=[name], top=[name])
    return name


def _trunk(net, units, widths, embedding, inner, bn):
    """The four stages and fc5, from the blob "data"."""
    x = "data"
    for stage, (n_units, width) in enumerate(zip(units, widths), start=1):
        x = _conv(net, stage, 1, x, width, bn)
        for k in range(1, n_units + 1):
            mid_name = "conv%d_%d" % (stage, 2 * k)
            mid = _conv(net, stage, 2 * k, x, inner.get(mid_name, width), bn)
            out = _conv(net, stage, 2 * k + 1, mid, width, bn)
            res = "res%d_%d" % (stage, 2 * k + 1)
            net.layer.add(name=res, type="Eltwise", bottom=[x, out], top=[res],
                          eltwise_param=caffe_pb2.EltwiseParameter(operation=caffe_pb2.EltwiseParameter.SUM))
            x = res
    net.layer.add(name="fc5", type="InnerProduct", bottom=[x], top=["fc5"],
                  param=[caffe_pb2.ParamSpec(lr_mult=1, decay_mult=1), caffe_pb2.ParamSpec(lr_mult=2, decay_mult=0)],
                  inner_product_param=caffe_pb2.InnerProductParameter(
                      num_output=embedding, weight_filler=caffe_pb2.FillerParameter(type="xavier"),
                      bias_filler=caffe_pb2.FillerParameter(type="constant", value=0)))


def sphereface(depth=20, variant="deploy", widths=WIDTHS, embedding=512, inner=None, bn=False,
               source="data/CASIA-WebFace-112X96.txt", root_folder="", batch_size=256, num_classes=10572,
               asoftmax="python", m=4):
    """Build a SphereFace net; returns a NetParameter.

    depth: 4, 10, 20, 36 or 64.  variant: "deploy" (Input 1x3x112x96 -> fc5) or
    "train" (ImageData -> fc5 -> fc6 A-Softmax -> SoftmaxWithLoss).
    widths: channels of the four stages; inner: {"convS_2k": channels} for the
    inner conv of a residual unit (pruned nets); embedding: fc5 outputs.
    bn: BatchNorm + Scale after every conv (conv biases then dropped).
    Train only: source/root_folder/batch_size of the image list (Caffe
    prepends root_folder to each path as text: a "/" is added), num_classes,
    asoftmax "python" (finetune.asoftmax Python layer, runs on BVLC Caffe) or
    "native" (the fork's MarginInnerProduct; the result is then a message of
    finetune.trainnet.fork_net_class()), m the A-Softmax margin (1..4).
    """
    if depth not in UNITS:
        raise NetSpecError("SphereFace depth must be one of %s, not %r" % (sorted(UNITS), depth))
    if variant not in ("deploy", "train"):
        raise NetSpecError("variant must be 'deploy' or 'train', not %r" % (variant,))
    if asoftmax not in ("python", "native"):
        raise NetSpecError("asoftmax must be 'python' or 'native', not %r" % (asoftmax,))
    if not 1 <= m <= 4:
        raise NetSpecError("A-Softmax margin m must be 1..4, not %r" % (m,))
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or min(widths) < 1 or embedding < 1:
        raise NetSpecError("need four positive stage widths and a positive embedding size, got %s and %s"
                         % (widths, embedding))
    inner = dict(inner or {})
    units = UNITS[depth]
    valid = {"conv%d_%d" % (s, 2 * k) for s, n in enumerate(units, 1) for k in range(1, n + 1)}
    wrong = sorted(set(inner) - valid) + sorted(k for k, v in inner.items() if k in valid and v < 1)
    if wrong:
        raise NetSpecError("inner widths: %s are not positive widths of unit-inner convs of SphereFace-%d (those are %s)"
                         % (", ".join(wrong), depth, ", ".join(sorted(valid)) or "none"))

    net = caffe_pb2.NetParameter(name="SpherefaceNet-%d" % depth)
    net.layer.add(name="data", type="Input", top=["data"],
                  input_param=caffe_pb2.InputParameter(shape=[caffe_pb2.BlobShape(dim=(1,) + INPUT)]))
    _trunk(net, units, widths, embedding, inner, bn)
    if variant == "deploy":
        return net
    # One home for train nets: the fine-tune driver's builder, fed the release's data and head settings.
    from finetune import trainnet
    data = trainnet.ImageList(source=source, root_folder=root_folder, batch_size=batch_size, mirror=True)
    head = trainnet.ASoftmax(num_classes=num_classes, embedding="fc5", m=m, native=asoftmax == "native")
    return trainnet.train_net(net, data, head, name=net.name)


def committed_path(depth, variant):
    return os.path.join(HERE, "sphereface%d_%s.prototxt" % (depth, variant))


def write_all(folder=HERE):
    """(Re)write the committed deploy and train (Python A-Softmax) nets for every depth."""
    written = []
    for depth in sorted(UNITS):
        for variant in ("deploy", "train"):
            path = os.path.join(folder, "sphereface%d_%s.prototxt" % (depth, variant))
            written.append(caffe_io.write_net(sphereface(depth, variant), path))
    return written


@cli.entry(PROG)
def main(argv=None):
    ap = cli.parser(PROG, DESCRIPTION)
    ap.add_argument("--depth", type=int, default=20, choices=sorted(UNITS), help="number of layers (default 20)")
    ap.add_argument("--variant", default="deploy", choices=("deploy", "train"), help="default deploy")
    ap.add_argument("--asoftmax", default="python", choices=("python", "native"),
                    help="train fc6: 'python' = the toolkit's finetune.asoftmax Python layer (runs on BVLC Caffe), "
                         "'native' = MarginInnerProduct of the SphereFace Caffe fork (BVLC Caffe cannot load it)")
    ap.add_argument("--bn", action="store_true", help="BatchNorm + Scale after every conv (conv biases dropped)")
    ap.add_argument("--widths", type=int, nargs=4, default=list(WIDTHS), metavar="C",
                    help="channels of stages 1-4 (default %s)" % " ".join(map(str, WIDTHS)))
    ap.add_argument("--embedding", type=int, default=512, help="fc5 outputs, the face embedding size (default 512)")
    ap.add_argument("--source", default="data/CASIA-WebFace-112X96.txt",
                    help="train: image list ('path label' per line) read by ImageData")
    ap.add_argument("--root-folder", default="", help="train: folder the list's paths are relative to")
    ap.add_argument("--batch-size", type=int, default=256, help="train: images per batch (default 256)")
    ap.add_argument("--num-classes", type=int, default=10572,
                    help="train: fc6 outputs, identities in the list (default 10572, CASIA-WebFace)")
    ap.add_argument("-o", "--output", help="prototxt to write (default: print to stdout)")
    args = ap.parse_args(argv)
    caffe_io.write_or_print_net(sphereface(
        args.depth, args.variant, widths=args.widths, embedding=args.embedding, bn=args.bn, source=args.source,
        root_folder=args.root_folder, batch_size=args.batch_size, num_classes=args.num_classes,
        asoftmax=args.asoftmax), args.output)
    return 0


if __name__ == "__main__":
    cli.run(main)
