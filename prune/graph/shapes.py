"""Blob shapes from a NetParameter alone, by Caffe's own formulas (tests compare them with real Caffe)."""
import math

import numpy as np

from base.proto import caffe_pb2


def _pair(repeated, h, w, default, spatial):
    """Caffe's kernel/stride/pad fields -> one value per spatial axis."""
    if h or w:
        return [h, w]
    values = list(repeated) or [default]
    return values * spatial if len(values) == 1 else values


def conv_geometry(p, spatial):
    return (_pair(p.kernel_size, p.kernel_h, p.kernel_w, None, spatial),
            _pair(p.stride, p.stride_h, p.stride_w, 1, spatial),
            _pair(p.pad, p.pad_h, p.pad_w, 0, spatial),
            (list(p.dilation) or [1]) * (spatial if len(p.dilation) <= 1 else 1))


def conv_output(size, kernel, stride, pad, dilation):
    """Caffe's output size of a convolution along one axis of ``size``."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def conv_shape(layer, shape, deconv):
    p = layer.convolution_param
    if shape is None:
        return None
    kernel, stride, pad, dil = conv_geometry(p, len(shape) - 2)
    out = []
    for i, size in enumerate(shape[2:]):
        out.append(stride[i] * (size - 1) + dil[i] * (kernel[i] - 1) + 1 - 2 * pad[i] if deconv
                   else conv_output(size, kernel[i], stride[i], pad[i], dil[i]))
    return (shape[0], p.num_output) + tuple(out)


def pool_shape(layer, shape):
    p = layer.pooling_param
    if shape is None:
        return None
    if p.global_pooling:
        return tuple(shape[:2]) + (1, 1)
    kernel = [p.kernel_h, p.kernel_w] if p.kernel_h else [p.kernel_size] * 2
    stride = [p.stride_h, p.stride_w] if p.stride_h else [p.stride] * 2
    pad = [p.pad_h, p.pad_w] if (p.pad_h or p.pad_w) else [p.pad] * 2
    rnd = math.floor if p.round_mode == caffe_pb2.PoolingParameter.FLOOR else math.ceil
    if p.HasField("ceil_mode"):  # the forks' spelling (BVLC pull request #3057) of the same choice
        rnd = math.ceil if p.ceil_mode else math.floor
    out = []
    for size, k, s, q in zip(shape[2:], kernel, stride, pad):
        n = int(rnd((size + 2 * q - k) / s)) + 1
        if q and (n - 1) * s >= size + q:
            n -= 1
        out.append(n)
    return tuple(shape[:2]) + tuple(out)


def data_shapes(layer):
    """Top shapes of a data layer, where the prototxt fixes them (else None)."""
    if layer.type == "Input":
        shapes = [tuple(s.dim) for s in layer.input_param.shape]
        return [shapes[min(i, len(shapes) - 1)] if shapes else None for i in range(len(layer.top))]
    if layer.type == "DummyData":
        p = layer.dummy_data_param
        shapes = [tuple(s.dim) for s in p.shape] or [
            (n, c, h, w) for n, c, h, w in zip(p.num, p.channels, p.height, p.width)]
        return [shapes[min(i, len(shapes) - 1)] if shapes else None for i in range(len(layer.top))]
    if layer.type == "MemoryData":
        p = layer.memory_data_param
        return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)][:len(layer.top)]
    if layer.type == "ImageData":
        p, t = layer.image_data_param, layer.transform_param
        h, w = (t.crop_size, t.crop_size) if t.crop_size else (p.new_height, p.new_width)
        image = (p.batch_size, 3 if p.is_color else 1, h, w) if h and w else None
        return [image, (p.batch_size,)][:len(layer.top)]
    return [None] * len(layer.top)


def reshape_shape(layer, shape):
    p = layer.reshape_param
    if shape is None:
        return None
    dims = list(p.shape.dim)
    axis = p.axis if p.axis >= 0 else len(shape) + 1 + p.axis
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    out = [shape[axis + i] if d == 0 else d for i, d in enumerate(dims)]
    new = list(shape[:axis]) + out + list(shape[end:])
    if -1 in new:
        known = int(np.prod([d for d in new if d != -1]))
        new[new.index(-1)] = int(np.prod(shape)) // known
    return tuple(new)
