"""The net's image input and the one crop rule.

Every tool that feeds images to a deploy net asks here what the net takes
(``input_layer``: its single ``Input`` layer, N x 3 x H x W) and whether the
image files need the SphereFace crop (``crop_rule``): 112x112 aligned faces
(the ArcFace five-point template, which is the SphereFace 96x112 template
moved 8 px right) feed a 112x96 net through columns 8..103 (``CROP_COLUMNS``);
every other pairing goes in whole.
"""
ALIGNED_SIZE = (112, 112)            # (H, W) of the aligned face images
SPHEREFACE_SIZE = (112, 96)          # (H, W) of the SphereFace input
CROP_COLUMNS = slice(8, 104)         # the SphereFace crop of an aligned image: all rows, these columns
CROPS = ("112x96", "none")


def input_layer(net, source="net"):
    """The single Input layer of a deploy NetParameter and its (N, C, H, W); C must be 3."""
    from .caffe_io import CaffeFileError   # here: image workers import this module without Caffe
    inputs = [layer for layer in net.layer if layer.type == "Input"]
    if len(inputs) != 1 or len(inputs[0].top) != 1:
        raise CaffeFileError("%s: a deploy net with exactly one Input layer and one top is needed, found %d Input "
                             "layers; pass a deploy prototxt" % (source, len(inputs)))
    shape = tuple(inputs[0].input_param.shape[0].dim) if len(inputs[0].input_param.shape) else ()
    if len(shape) != 4 or shape[1] != 3:
        raise CaffeFileError("%s: input %r has shape %s; an N x 3 x H x W image input is needed"
                             % (source, inputs[0].top[0], shape))
    return inputs[0], shape


def crop_rule(net_hw, image_hw):
    """'112x96' when aligned 112x112 images feed a 112x96 net, else 'none'."""
    return "112x96" if tuple(image_hw) == ALIGNED_SIZE and tuple(net_hw) == SPHEREFACE_SIZE else "none"


def crop_112x96(image):
    """An aligned 112x112 image (H x W x C array) -> its SphereFace 112x96 crop."""
    return image[:, CROP_COLUMNS]
