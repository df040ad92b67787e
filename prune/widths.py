"""Standalone sub-networks of a channel-prioritised net, one per utilisation level.

A net trained with channel prioritisation (finetune.bnscale) holds its
channels in order of importance, so the p % sub-network is the FIRST
ceil(p * C) channels of every prunable channel group (prune.graph).  Each
level is written as a plain deploy prototxt + caffemodel (prune.surgery,
checked by loading it in real Caffe), with its params and MACs.

    python -m prune.widths --model NET.prototxt --weights NET.caffemodel \\
        --levels 1.0,0.75,0.5 --out DIR

For a BatchNorm net the p % sub-network computes exactly what the full net
computes with the Scale gamma and beta of the dropped channels set to zero
(``masked_weights``): those channels are then zero after Scale, and a
zero-preserving activation (ReLU, PReLU) keeps them zero for every consumer.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from prune import caffe_io
from prune.graph import build_graph
from prune.surgery import prune_net, save_pruned


def level_keep(graph, p):
    """{group id: first ceil(p * C) channels} for every prunable group."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError("utilisation level must be in (0, 1], got %r" % (p,))
    # the 1e-9 keeps 0.75 * 64 from becoming 49 by float rounding
    return {g.id: list(range(max(1, math.ceil(p * g.channels - 1e-9)))) for g in graph.prunable()}


def masked_weights(graph, weights, p):
    """Copies of the weights with gamma and beta of every Scale passenger zeroed
    on the channels the p % level drops (the masked full net of that level)."""
    out = {name: [np.array(a, dtype=np.float32) for a in arrays] for name, arrays in weights.items()}
    for gid, kept in level_keep(graph, p).items():
        group = graph[gid]
        gone = np.arange(len(kept), group.channels)
        scales = [s for s in group.passengers if s.type == "Scale"]
        if gone.size and not scales:
            raise ValueError("group %r has no Scale passenger to mask (layers %s)"
                             % (gid, ", ".join(group.layers("producers"))))
        for s in scales:
            a = out[s.layer][s.blob]
            flat = a.reshape(-1)
            flat[s.indices(gone)] = 0
    return out


def export_width(proto, weights, p, out_proto, out_model):
    """Write the p % sub-network of ``proto`` + ``weights`` (paths); returns its NetStats."""
    from prune.stats import net_stats
    net = caffe_io.read_net(proto)
    graph = build_graph(net, source=os.fspath(proto))
    keep = level_keep(graph, p)
    net2, weights2 = prune_net(net, caffe_io.read_weights(weights), keep, graph=graph)
    net2.name = "%s-%g" % (net.name or "net", 100 * p)
    save_pruned(net2, weights2, out_proto, out_model, inputs=(proto, weights))
    return net_stats(net2)


def parse_levels(text):
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--levels takes shares like 1.0,0.75,0.5, not %r" % text) from None
    if not levels or any(not 0 < p <= 1 for p in levels):
        raise argparse.ArgumentTypeError("--levels must be shares in (0, 1], got %r" % text)
    return levels


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m prune.widths",
        description="Export the utilisation levels of a channel-prioritised net: for each level p, the first "
                    "ceil(p * C) channels of every prunable channel group are kept and a standalone deploy "
                    "prototxt + caffemodel is written (each loaded in real Caffe before it is kept), with a "
                    "params/MACs table (OUT/widths.json).")
    ap.add_argument("--model", required=True, help="deploy prototxt of the full-width net")
    ap.add_argument("--weights", required=True, help="its caffemodel (never modified)")
    ap.add_argument("--levels", type=parse_levels, default=[1.0, 0.75, 0.5],
                    help="comma-separated shares of channels to keep (default 1.0,0.75,0.5)")
    ap.add_argument("--out", required=True, help="output folder: width<PCT>.prototxt/.caffemodel per level")
    a = ap.parse_args(argv)
    from tqdm import tqdm
    from prune.stats import CONVENTION
    rows = []
    for p in tqdm(a.levels, desc="widths", unit="level"):
        stem = os.path.join(a.out, "width%g" % (100 * p))
        try:
            stats = export_width(a.model, a.weights, p, stem + ".prototxt", stem + ".caffemodel")
        except ValueError as e:
            sys.exit("error: %s" % e)
        rows.append(dict(level=p, prototxt=stem + ".prototxt", caffemodel=stem + ".caffemodel",
                         params=stats.params, macs=stats.macs))
    print("%-8s %14s %16s  %s" % ("level", "params", "MACs", "prototxt"))
    for r in rows:
        print("%-8s %14d %16d  %s" % ("%g%%" % (100 * r["level"]), r["params"], r["macs"], r["prototxt"]))
    caffe_io.atomic_write(os.path.join(a.out, "widths.json"), json.dumps(
        dict(model=a.model, weights=a.weights, convention=CONVENTION, levels=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
