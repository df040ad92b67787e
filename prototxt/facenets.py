"""VGG-like, SqueezeNet-, MobileNetV2- and ResNet-50-based face nets as Caffe NetParameters (deploy).

Each takes a 1x3x112x112 ``Input`` named ``data`` (the MobileFaceNet
alignment and scaling) and ends in the face embedding ``fc5`` (InnerProduct,
512 outputs by default), so the toolkit prunes, fine-tunes and evaluates them
like SphereFace. The trunks follow the published ImageNet designs; what
replaces the 1000-way classifier is said per net:

* ``vgg``: the VGG-like face net of the channel-prioritisation method: nine
  3x3 convs (pad 1, no bias) each with BatchNorm+Scale+ReLU, in five stages
  of doubling width 16-32-64-128-256 (1, 2, 2, 2, 2 convs, VGG's names
  conv<stage>_<k>) with 2x2 max pools between stages, so that stages 2-5
  cost the same 43M MACs each; then global AVERAGE pooling over the 7x7 map and
  fc5 (about 1.3M params, 179M MACs: the size of SphereFace-4 and the
  MobileFaceNet, trainable on a CPU). Every conv has its own Scale, so the
  BN-scale criterion, ``--threshold`` and ``python -m apps.prioritise``
  apply as they are.
* ``squeezenet``: SqueezeNet 1.0 (conv1 7x7/2 96, fire2..fire9 of squeeze 1x1,
  expand 1x1 and 3x3 joined by ``Concat``, max pools after conv1, fire4 and
  fire8, ReLU). conv10 keeps its 1x1 conv + ReLU with 512 outputs, then a
  global AVERAGE pooling and fc5. No dropout (deploy).
* ``mobilenetv2``: MobileNetV2 1.0 (conv1 3x3/2 32, 17 inverted residuals:
  1x1 expand, 3x3 depthwise with group = channels, 1x1 linear projection,
  ``Eltwise`` SUM when stride 1 and same width; final 1x1 conv 1280;
  BatchNorm+Scale after every conv; ReLU, as BVLC Caffe has no ReLU6). The
  4x4 map is reduced by a global DEPTHWISE 4x4 conv (linear, + BatchNorm,
  as in MobileFaceNet), then fc5.
* ``resnet50``: ResNet-50 in the layout and names of Kaiming He's Caffe
  release (bottlenecks 1x1-3x3-1x1 with BatchNorm+Scale, stride on the first
  1x1, projection shortcut ``resNx_branch1`` at each stage start, ``Eltwise``
  SUM + ReLU), global AVERAGE pooling ``pool5``, then fc5.

    python -m prototxt.facenets --net mobilenetv2 -o mobilenetv2_face.prototxt
    python -m prune.stats mobilenetv2_face.prototxt
"""

from base import caffe_io, cli  # first: it quiets glog before caffe loads
from base.proto import caffe_pb2
from prototxt import NetSpecError

INPUT = (3, 112, 112)
P = caffe_pb2.PoolingParameter


PROG = "python -m prototxt.facenets"
DESCRIPTION = ("Write a deploy prototxt of a VGG-like (BatchNorm+Scale, global average pooling), "
               "SqueezeNet-, MobileNetV2- or ResNet-50-based face net "
               "(Input 1x3x112x112 'data' -> embedding InnerProduct 'fc5').")


class _Builder:
    """Appends layers to a NetParameter; every helper returns the top blob name."""

    def __init__(self, name):
        self.net = caffe_pb2.NetParameter(name=name)
        self.net.layer.add(name="data", type="Input", top=["data"],
                           input_param=caffe_pb2.InputParameter(shape=[caffe_pb2.BlobShape(dim=(1,) + INPUT)]))

    def add(self, name, type, bottom, top=None, **params):
        self.net.layer.add(name=name, type=type, bottom=[bottom] if isinstance(bottom, str) else bottom,
                           top=[top or name], **params)
        return top or name

    def conv(self, name, bottom, num_output, kernel, stride=1, pad=0, group=1, bias=True):
        cp = caffe_pb2.ConvolutionParameter(
            num_output=num_output, kernel_size=[kernel], stride=[stride], pad=[pad], bias_term=bias,
            weight_filler=caffe_pb2.FillerParameter(type="msra"))
        if group > 1:
            cp.group = group
        if bias:
            cp.bias_filler.MergeFrom(caffe_pb2.FillerParameter(type="constant", value=0))
        return self.add(name, "Convolution", bottom, convolution_param=cp)

    def bn(self, bn_name, scale_name, blob):
        """BatchNorm + Scale (with bias) in place on ``blob``."""
        self.add(bn_name, "BatchNorm", blob, blob)
        self.add(scale_name, "Scale", blob, blob, scale_param=caffe_pb2.ScaleParameter(bias_term=True))
        return blob

    def relu(self, name, blob):
        return self.add(name, "ReLU", blob, blob)

    def pool(self, name, bottom, kernel=3, stride=2, method=P.MAX):
        return self.add(name, "Pooling", bottom, pooling_param=P(pool=method, kernel_size=kernel, stride=stride))

    def global_avg(self, name, bottom):
        return self.add(name, "Pooling", bottom, pooling_param=P(pool=P.AVE, global_pooling=True))

    def eltwise_sum(self, name, bottoms):
        return self.add(name, "Eltwise", bottoms,
                        eltwise_param=caffe_pb2.EltwiseParameter(operation=caffe_pb2.EltwiseParameter.SUM))

    def embedding(self, bottom, num_output):
        return self.add("fc5", "InnerProduct", bottom, inner_product_param=caffe_pb2.InnerProductParameter(
            num_output=num_output, weight_filler=caffe_pb2.FillerParameter(type="xavier"),
            bias_filler=caffe_pb2.FillerParameter(type="constant", value=0)))


# ------------------------------------------------------------------ VGG-like

# (width, convs) per stage; a 2x2 max pool after every stage but the last.
VGG = ((16, 1), (32, 2), (64, 2), (128, 2), (256, 2))


def vgg(embedding=512):
    b = _Builder("VGG-face-GAP")
    x = "data"
    for stage, (width, convs) in enumerate(VGG, start=1):
        for k in range(1, convs + 1):
            x = _conv_bn(b, "conv%d_%d" % (stage, k), x, width, 3, pad=1)
        if stage < len(VGG):
            x = b.pool("pool%d" % stage, x, kernel=2, stride=2)
    b.embedding(b.global_avg("pool%d" % len(VGG), x), embedding)
    return b.net


# ------------------------------------------------------------------ SqueezeNet

# (squeeze, expand) per fire module 2..9, and the max pools that follow fire4 and fire8 (SqueezeNet 1.0).
FIRES = ((16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256))
FIRE_POOLS = {4: "pool4", 8: "pool8"}


def squeezenet(embedding=512):
    b = _Builder("SqueezeNet-face")
    x = b.relu("relu_conv1", b.conv("conv1", "data", 96, 7, stride=2))
    x = b.pool("pool1", x)
    for i, (squeeze, expand) in enumerate(FIRES, start=2):
        f = "fire%d/" % i
        s = b.relu(f + "relu_squeeze1x1", b.conv(f + "squeeze1x1", x, squeeze, 1))
        e1 = b.relu(f + "relu_expand1x1", b.conv(f + "expand1x1", s, expand, 1))
        e3 = b.relu(f + "relu_expand3x3", b.conv(f + "expand3x3", s, expand, 3, pad=1))
        x = b.add(f + "concat", "Concat", [e1, e3])
        if i in FIRE_POOLS:
            x = b.pool(FIRE_POOLS[i], x)
    x = b.relu("relu_conv10", b.conv("conv10", x, 512, 1))
    b.embedding(b.global_avg("pool10", x), embedding)
    return b.net


# ------------------------------------------------------------------ MobileNetV2

# (expansion t, channels c, repeats n, first stride s), the MobileNetV2 paper's table 2.
INVERTED = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))


def _conv_bn(b, name, bottom, num_output, kernel, stride=1, pad=0, group=1, relu=True):
    """conv (no bias: BatchNorm's shift replaces it) + BatchNorm + Scale (+ ReLU), all in place."""
    x = b.bn(name + "/bn", name + "/scale", b.conv(name, bottom, num_output, kernel, stride, pad, group, bias=False))
    return b.relu(name + "/relu", x) if relu else x


def mobilenetv2(embedding=512):
    b = _Builder("MobileNetV2-face")
    x, width = _conv_bn(b, "conv1", "data", 32, 3, stride=2, pad=1), 32
    for stage, (t, c, n, s) in enumerate(INVERTED, start=2):
        for k in range(1, n + 1):
            name, stride = "block%d_%d" % (stage, k), s if k == 1 else 1
            h = _conv_bn(b, name + "/expand", x, width * t, 1) if t != 1 else x
            h = _conv_bn(b, name + "/dw", h, width * t, 3, stride=stride, pad=1, group=width * t)
            h = _conv_bn(b, name + "/project", h, c, 1, relu=False)  # linear bottleneck
            x = b.eltwise_sum(name + "/add", [x, h]) if stride == 1 and width == c else h
            width = c
    x = _conv_bn(b, "conv_last", x, 1280, 1)
    x = _conv_bn(b, "gdconv", x, 1280, 4, group=1280, relu=False)  # 4x4 map at 112x112 input
    b.embedding(x, embedding)
    return b.net


# ------------------------------------------------------------------ ResNet-50

# (stage, bottleneck width, blocks)
RESNET50 = ((2, 64, 3), (3, 128, 4), (4, 256, 6), (5, 512, 3))


def _he_conv(b, unit, branch, bottom, num_output, kernel, stride=1, pad=0, relu=True):
    """res<unit>_<branch> + bn/scale<unit>_<branch> (+ ReLU), named as Kaiming He's release."""
    x = b.conv("res%s_%s" % (unit, branch), bottom, num_output, kernel, stride, pad, bias=False)
    b.bn("bn%s_%s" % (unit, branch), "scale%s_%s" % (unit, branch), x)
    return b.relu("res%s_%s_relu" % (unit, branch), x) if relu else x


def resnet50(embedding=512):
    b = _Builder("ResNet-50-face")
    x = b.conv("conv1", "data", 64, 7, stride=2, pad=3)  # the release's only conv with a bias
    x = b.relu("conv1_relu", b.bn("bn_conv1", "scale_conv1", x))
    x = b.pool("pool1", x)
    for stage, width, blocks in RESNET50:
        for k in range(blocks):
            unit, stride = "%d%s" % (stage, "abcdef"[k]), 2 if k == 0 and stage > 2 else 1
            shortcut = _he_conv(b, unit, "branch1", x, 4 * width, 1, stride, relu=False) if k == 0 else x
            h = _he_conv(b, unit, "branch2a", x, width, 1, stride)
            h = _he_conv(b, unit, "branch2b", h, width, 3, pad=1)
            h = _he_conv(b, unit, "branch2c", h, 4 * width, 1, relu=False)
            x = b.relu("res%s_relu" % unit, b.eltwise_sum("res" + unit, [shortcut, h]))
    b.embedding(b.global_avg("pool5", x), embedding)
    return b.net


NETS = {"vgg": vgg, "squeezenet": squeezenet, "mobilenetv2": mobilenetv2, "resnet50": resnet50}


def facenet(name, embedding=512):
    """One of NETS by name; returns a NetParameter (deploy, Input 1x3x112x112 -> fc5)."""
    if name not in NETS:
        raise NetSpecError("unknown face net %r; choose one of %s" % (name, ", ".join(NETS)))
    if embedding < 1:
        raise NetSpecError("the embedding size must be positive, not %r" % (embedding,))
    return NETS[name](embedding)


@cli.entry(PROG)
def main(argv=None):
    ap = cli.parser(PROG, DESCRIPTION)
    ap.add_argument("--net", required=True, choices=sorted(NETS), help="which trunk")
    ap.add_argument("--embedding", type=int, default=512, help="fc5 outputs, the face embedding size (default 512)")
    ap.add_argument("-o", "--output", help="prototxt to write (default: print to stdout)")
    args = ap.parse_args(argv)
    caffe_io.write_or_print_net(facenet(args.net, args.embedding), args.output)
    return 0


if __name__ == "__main__":
    cli.run(main)
