"""A small world for the reliability tests: a tiny 112x96 face net, its weights, generated LFW-like images with
pairs and a training list, and helpers to run a ``python -m`` tool as a user would (a real process)."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import caffe
from caffe import layers as L

from base import caffe_io
from conftest import ROOT
from nets import random_weights


def tiny_net(path, width=4, emb=8, size=(112, 96), extra=None):
    """Input -> conv1 (stride 4) -> PReLU -> conv2 (stride 2) -> PReLU -> fc5: two prunable groups."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, size[0], size[1]]))
    n.conv1 = L.Convolution(n.data, num_output=width, kernel_size=3, stride=4, pad=1, weight_filler=dict(type="xavier"))
    n.relu1 = L.PReLU(n.conv1, in_place=True)
    n.conv2 = L.Convolution(n.conv1, num_output=width, kernel_size=3, stride=2, pad=1,
                            weight_filler=dict(type="xavier"))
    n.relu2 = L.PReLU(n.conv2, in_place=True)
    n.fc5 = L.InnerProduct(n.conv2, num_output=emb, weight_filler=dict(type="xavier"))
    net = n.to_proto()
    net.name = "tiny"
    if extra:
        extra(net)
    return caffe_io.write_net(net, str(path))


def make_kit(folder):
    """{name: path} of the kit's files under ``folder`` (created)."""
    from apps.synthetic import make_dataset
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    k = dict(folder=folder)
    k["net"] = tiny_net(os.path.join(folder, "net.prototxt"))
    k["weights"] = caffe_io.write_weights(caffe_io.read_net(k["net"]), random_weights(k["net"], seed=1),
                                          os.path.join(folder, "net.caffemodel"))
    k["lfw"], k["pairs"] = make_dataset(os.path.join(folder, "lfw"), identities_per_fold=2, images_per_identity=3,
                                        pairs_per_fold=3)
    people = sorted(os.listdir(k["lfw"]))
    lines = ["%s/%s %d" % (p, f, i) for i, p in enumerate(people[:8]) for f in sorted(os.listdir(os.path.join(
        k["lfw"], p)))]
    k["list"] = os.path.join(folder, "train.txt")
    with open(k["list"], "w") as f:
        f.write("\n".join(lines) + "\n")
    return k


def run_module(module, args, env=None, timeout=600, **kw):
    """``python -m module args`` from the repository root, as a user runs it."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", module] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env, **kw)


def tree_digest(folder):
    """{relative path: sha256} of every file under ``folder`` (inputs must stay byte-identical)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def litter(folder):
    """Staging files (``.NAME.PID.XXXX.tmp``) under ``folder``."""
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
            if f.startswith(".") and f.endswith(".tmp")]


def namespaces_work():
    """Whether this machine lets a test mount a private tmpfs (a user + mount namespace)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def in_tmpfs(mount, script, options="size=64k", timeout=600):
    """Run the shell ``script`` with a private tmpfs mounted at ``mount`` (gone when the script ends)."""
    os.makedirs(mount, exist_ok=True)
    body = "mount -t tmpfs -o %s tmpfs %s && cd %s && %s" % (options, mount, ROOT, script)
    return subprocess.run(["unshare", "-rm", "sh", "-c", body], capture_output=True, text=True, timeout=timeout)


def same_weights(a, b):
    wa, wb = caffe_io.read_weights(a), caffe_io.read_weights(b)
    return list(wa) == list(wb) and all(np.array_equal(x, y) for k in wa for x, y in zip(wa[k], wb[k]))
