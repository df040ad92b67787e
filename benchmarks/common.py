"""What every benchmark script shares: the repository on sys.path (the scripts
run as files, not modules), the default data paths, the argument parser and
the machine record that goes into each JSON result."""
import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import base  # noqa: E402,F401  (quiets glog before caffe is imported)
from base.shared import shared_dir  # noqa: E402

SHARED = shared_dir()
MFN = os.path.join(SHARED, "models", "mobilefacenet", "mobilefacenet-v0")
LFW_DIR = os.path.join(SHARED, "data", "lfw", "images-112x112")
PAIRS = os.path.join(SHARED, "data", "lfw", "pairs.txt")


def parser(doc):
    """The script's parser: its docstring's first paragraph as description, defaults shown in --help."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_threads_and_seed(p, threads_help, seed_help):
    """--threads (BLAS threads) and --seed, as every timing benchmark has them."""
    p.add_argument("--threads", type=int, default=1,
                   help=threads_help + "; on a busy machine extra threads wait on each other")
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def add_face_model(p, pairs_help="LFW pairs.txt"):
    """--model, --weights, --blob (default: the MobileFaceNet of ../shared), --lfw-dir and --pairs."""
    p.add_argument("--model", default=MFN + ".prototxt", help="deploy prototxt")
    p.add_argument("--weights", default=MFN + ".caffemodel", help="caffemodel")
    p.add_argument("--blob", default="fc1", help="embedding blob")
    p.add_argument("--lfw-dir", default=LFW_DIR, help="aligned LFW images")
    p.add_argument("--pairs", default=PAIRS, help=pairs_help)


def machine():
    """Where and when a result was measured."""
    return {"node": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
