"""Per-input-channel contributions of a consumer at sampled outputs (ThiNet).

For a Convolution consumer with weight W (F x C/g x kh x kw) reading a bottom
activation A (N x C x H x W), the output at filter f and position (i, j),
minus the bias, is sum_c x_c with

    x_c = sum_{u,v} W[f, c, u, v] * A_pad[c, i*s + u*d, j*s + v*d].

For an InnerProduct consumer reading a C x H x W bottom as C*H*W columns,
channel c owns the H*W consecutive columns c*HW .. (c+1)*HW - 1 and
x_c = W[f, block c] . A[block c].

Only sampled (f, i, j) triples are computed, so memory is
O(samples x C) per batch, never the full im2col of the layer.
"""
import numpy as np


def conv_geometry(p):
    """(kernel, stride, pad, dilation) as (h, w) pairs from a 2-D ConvolutionParameter."""
    from prune.graph import conv_geometry as geometry
    return tuple(tuple(v) for v in geometry(p, 2))


def output_hw(geometry, H, W):
    """(rows, cols) of a 2-D convolution of ``geometry`` (conv_geometry) on an H x W input."""
    from prune.graph import conv_output
    return tuple(conv_output(size, *axis) for size, axis in zip((H, W), zip(*geometry)))


def conv_windows(A, geometry, images, rows, cols):
    """The input windows of the sampled output positions: S x C x kh x kw, gathered
    without forming the im2col matrix of the whole layer (zero padding as Caffe)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    if (kh, kw, ph, pw) == (1, 1, 0, 0):      # 1x1: no window, no padding to copy
        return A[images, :, rows * sh, cols * sw][:, :, None, None]
    C = A.shape[1]
    r = rows[:, None] * sh + (np.arange(kh) * dh)[None, :] - ph    # S x kh, in unpadded coordinates
    c = cols[:, None] * sw + (np.arange(kw) * dw)[None, :] - pw    # S x kw
    inside = ((r >= 0) & (r < A.shape[2]))[:, :, None] & ((c >= 0) & (c < A.shape[3]))[:, None, :]
    win = A[images[:, None, None, None], np.arange(C)[None, :, None, None],
            np.clip(r, 0, A.shape[2] - 1)[:, None, :, None], np.clip(c, 0, A.shape[3] - 1)[:, None, None, :]]
    return win * inside[:, None, :, :]


def conv_contributions(A, W, geometry, group, filters, images, rows, cols):
    """x[n, c] for the sampled outputs n = (images[n], filters[n], rows[n], cols[n]).

    A: N x C x H x W bottom data; W: F x C/group x kh x kw.  Returns an
    array of shape (samples, C), zeros outside each filter's channel group.
    """
    C = A.shape[1]
    F, Cg = W.shape[:2]
    win = conv_windows(A, geometry, images, rows, cols)
    S = len(filters)
    out = np.zeros((S, C), dtype=np.float64)
    fper = F // group
    g_of = filters // fper
    for g in np.unique(g_of):
        sel = g_of == g
        chans = slice(g * Cg, (g + 1) * Cg)
        out[sel, chans] = np.einsum("scuv,scuv->sc", win[sel, chans].astype(np.float64),
                                    W[filters[sel]].astype(np.float64))
    return out


def ip_contributions(A, W, filters, images, block):
    """x[n, c] for InnerProduct outputs (images[n], filters[n]); channel c owns
    `block` consecutive input columns."""
    flat = A.reshape(A.shape[0], -1).astype(np.float64)
    C = flat.shape[1] // block
    prod = flat[images] * W[filters].astype(np.float64)       # S x (C*block)
    return prod.reshape(len(filters), C, block).sum(axis=2)


def sample_positions(rng, n_images, n_per_image, n_filters, out_h=1, out_w=1):
    """Random (image, filter, row, col) with n_per_image samples per image (filter None without ``n_filters``:
    every output of the position is used)."""
    images = np.repeat(np.arange(n_images), n_per_image)
    S = len(images)
    filters = rng.integers(0, n_filters, S) if n_filters else None
    return images, filters, rng.integers(0, out_h, S), rng.integers(0, out_w, S)


def layer_positions(layer, bottom_shape, per_image, n, rng):
    """(images, rows, cols) of ``per_image`` random output positions per image of a consumer (one per image
    for an InnerProduct, whose output has no positions)."""
    if layer.type == "InnerProduct":
        return (np.arange(n),)
    out_h, out_w = output_hw(conv_geometry(layer.convolution_param), *bottom_shape[2:])
    images, _, rows, cols = sample_positions(rng, n, per_image, None, out_h, out_w)
    return images, rows, cols
