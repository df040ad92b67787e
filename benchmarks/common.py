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

import prune  # noqa: E402,F401  (quiets glog before caffe is imported)
from prune.data import shared_dir  # noqa: E402

SHARED = shared_dir()
MFN = os.path.join(SHARED, "models", "mobilefacenet", "mobilefacenet-v0")
LFW_DIR = os.path.join(SHARED, "data", "lfw", "images-112x112")
PAIRS = os.path.join(SHARED, "data", "lfw", "pairs.txt")


def parser(doc):
    """The script's parser: its docstring's first paragraph as description, defaults shown in --help."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def machine():
    """Where and when a result was measured."""
    return {"node": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
