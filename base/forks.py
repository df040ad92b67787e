"""What the common Caffe forks add to BVLC Caffe: their fields (read through base.proto) and layer types.

* ``FIELDS``: the fields of ``base/caffe_superset.proto`` that BVLC lacks,
  ``(message, field) -> fork``; ``RENUMBERED``: those whose fork number BVLC
  gave to a field of its own since (read by name at a spare number);
* ``UNREAD_FIELDS``: fields of other forks, which the superset does not
  read (named in the error when a prototxt uses one);
* ``TYPES``: layer types of forks, ``type -> fork``;
* ``FORKS``: fork -> its name and where it lives (``fork_name``).

``fork_fields(message)`` lists the fork fields a message (a net, a layer)
sets; ``describe_type``/``describe_field`` make the words of an error.
"""

FORKS = {   # fork -> (its name, where it lives)
    "sphereface": ("SphereFace's Caffe", "wy1iu/sphereface"),
    "ssd": ("SSD's Caffe", "weiliu89/caffe, branch ssd; MobileNet-SSD and most Caffe detectors build on it"),
    "shufflenet": ("the ShuffleNet Caffe forks", "farmingyard/ShuffleNet and its followers"),
    "ceil_mode": ("the Caffe forks with pooling ceil_mode", "BVLC pull request #3057; OpenCV reads it too"),
    "deeplab": ("the DeepLab v2 / PSPNet Caffe forks", "Interp"),
    "senet": ("SENet's Caffe", "hujie-frank/SENet"),
    "depthwise": ("the depthwise-convolution Caffe forks", "yonghenglh6/DepthwiseConvolution; MobileNet ports"),
    "segnet": ("SegNet's Caffe", "alexgkendall/caffe-segnet"),
    "rcnn": ("the Fast/Faster R-CNN and R-FCN Caffe forks", "rbgirshick/py-faster-rcnn and followers"),
    "yolo": ("the YOLO Caffe forks", "MobileNet-YOLO and others"),
    "bn": ("the Caffe forks with a 'BN' layer", "yjxiong/caffe and others"),
    "nvcaffe": ("NVIDIA's Caffe", "NVIDIA/caffe"),
    "mobilenet": ("the MobileNet Caffe ports", "ReLU6"),
}


def fork_name(fork, detail=True):
    """A fork in words: "SSD's Caffe (weiliu89/caffe, ...)", or without ``detail`` just "SSD's Caffe"."""
    name, where = FORKS[fork]
    return "%s (%s)" % (name, where) if detail else name


# Fields of base/caffe_superset.proto that BVLC's caffe.proto lacks (tests/test_forks.py checks this list
# against the compiled schemas).
FIELDS = {
    ("LayerParameter", "margin_inner_product_param"): "sphereface",
    ("LayerParameter", "shuffle_channel_param"): "shufflenet",
    ("LayerParameter", "annotated_data_param"): "ssd",
    ("LayerParameter", "multibox_loss_param"): "ssd",
    ("LayerParameter", "permute_param"): "ssd",
    ("LayerParameter", "prior_box_param"): "ssd",
    ("LayerParameter", "detection_output_param"): "ssd",
    ("LayerParameter", "detection_evaluate_param"): "ssd",
    ("LayerParameter", "norm_param"): "ssd",
    ("LayerParameter", "video_data_param"): "ssd",
    ("LayerParameter", "interp_param"): "deeplab",
    ("PoolingParameter", "ceil_mode"): "ceil_mode",
    ("TransformationParameter", "resize_param"): "ssd",
    ("TransformationParameter", "noise_param"): "ssd",
    ("TransformationParameter", "emit_constraint"): "ssd",
    ("TransformationParameter", "distort_param"): "ssd",
    ("TransformationParameter", "expand_param"): "ssd",
}

# (message, field) -> the fork's own number, which BVLC gave to another field since.
RENUMBERED = {
    ("LayerParameter", "margin_inner_product_param"): (147, "swish_param"),
    ("PoolingParameter", "ceil_mode"): (13, "round_mode"),
    ("LayerParameter", "interp_param"): (143, "input_param"),
}

# Fields of forks whose schema the superset leaves out: named in the error for a prototxt that uses them.
UNREAD_FIELDS = {
    "upsample_param": "segnet",
    "bn_param": "bn",
    "roi_pooling_param": "rcnn",
    "psroi_pooling_param": "rcnn",
    "proposal_param": "rcnn",
    "smooth_l1_loss_param": "rcnn",
    "box_annotator_ohem_param": "rcnn",
    "reorg_param": "yolo",
    "region_loss_param": "yolo",
    "yolo_detection_output_param": "yolo",
    "yolov3_detection_output_param": "yolo",
    "yolov3_param": "yolo",
    "relu6_param": "mobilenet",
    "raw_data_type": "nvcaffe",
    "raw_data": "nvcaffe",
    "scale_bias": "nvcaffe",
}

# Layer types of forks (none of them is in BVLC Caffe).
TYPES = {
    "MarginInnerProduct": "sphereface",
    "Permute": "ssd", "PriorBox": "ssd", "DetectionOutput": "ssd", "Normalize": "ssd", "MultiBoxLoss": "ssd",
    "DetectionEvaluate": "ssd", "AnnotatedData": "ssd", "VideoData": "ssd", "SmoothL1Loss": "rcnn",
    "ShuffleChannel": "shufflenet",
    "Axpy": "senet",
    "DepthwiseConvolution": "depthwise", "ConvolutionDepthwise": "depthwise",
    "Interp": "deeplab",
    "Upsample": "segnet",
    "BN": "bn",
    "ROIPooling": "rcnn", "PSROIPooling": "rcnn", "Proposal": "rcnn",
    "Reorg": "yolo", "Region": "yolo", "Yolov3DetectionOutput": "yolo",
    "ReLU6": "mobilenet",
}

# Fork types that are depthwise convolutions (per-channel, like a Convolution with group == channels).
DEPTHWISE_TYPES = ("DepthwiseConvolution", "ConvolutionDepthwise")


def describe_type(layer_type, detail=True):
    """'a layer of SSD's Caffe (...)' for a known fork type, else None."""
    fork = TYPES.get(layer_type)
    return "a layer of %s" % fork_name(fork, detail) if fork else None


def describe_field(name, message="LayerParameter"):
    """Which fork a field name comes from, in words, or None when unknown."""
    fork = FIELDS.get((message, name)) or UNREAD_FIELDS.get(name)
    if fork is None:
        fork = next((f for (m, n), f in FIELDS.items() if n == name), None)
    return fork_name(fork) if fork else None


def fork_fields(message, path=""):
    """[(dotted field path, fork)] of the fork fields set anywhere in ``message`` (a superset message)."""
    found = []
    for field, value in message.ListFields():
        key = (message.DESCRIPTOR.name, field.name)
        where = path + field.name
        if key in FIELDS:
            found.append((where, FIELDS[key]))
            continue
        if field.message_type is None:
            continue
        values = value if field.label == field.LABEL_REPEATED else [value]
        for v in values:
            found += fork_fields(v, where + ".")
    return found
