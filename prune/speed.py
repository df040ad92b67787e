"""Measured Caffe forward time: milliseconds per image, several nets side by side.

The nets are timed in one process and interleaved round by round (net A, net
B, net A, ...), so a noisy shared machine slows all of them alike and their
ratio stays meaningful.  Each number is the median over the rounds.
"""
import time

import numpy as np

from base import caffe_io


def forward_ms(nets, batches=(1, 32), rounds=7, min_seconds=0.2, seed=0):
    """{name: {batch: median ms per image}} for ``nets`` = {name: (prototxt, caffemodel)}.

    Every round runs each net for at least ``min_seconds`` (whole forward
    passes) on the same random input; the first pass of each net and batch is
    a warm-up and not counted."""
    import caffe
    caffe.set_mode_cpu()
    loaded = {name: caffe_io.open_net(proto, weights) for name, (proto, weights) in nets.items()}
    rng = np.random.default_rng(seed)
    out = {name: {} for name in nets}
    for batch in batches:
        inputs = {}
        for name, net in loaded.items():
            blob = net.inputs[0]
            shape = (batch,) + net.blobs[blob].data.shape[1:]
            net.blobs[blob].reshape(*shape)
            net.reshape()
            x = inputs.setdefault(shape, rng.uniform(-1, 1, shape).astype(np.float32))
            net.blobs[blob].data[...] = x
            net.forward()   # warm-up: memory allocation, caches
        ms = interleaved_ms({name: net.forward for name, net in loaded.items()}, rounds, min_seconds)
        for name in loaded:
            out[name][batch] = ms[name] / batch
    return out


def interleaved_ms(calls, rounds=7, min_seconds=0.2):
    """{key: median ms per call} of ``calls`` = {key: function of no arguments} (each warmed up by the
    caller), timed side by side: every round runs each in turn, whole calls, for at least ``min_seconds``."""
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            n, start = 0, time.perf_counter()
            while True:
                call()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            times[key].append(1000.0 * elapsed / n)
    return {key: float(np.median(t)) for key, t in times.items()}
