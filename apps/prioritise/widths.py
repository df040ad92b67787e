"""Standalone sub-networks of a channel-prioritised net, one per utilisation level.

A net trained with channel prioritisation (apps.prioritise.penalty) holds its
channels in order of importance, so the p % sub-network is the FIRST
ceil(p * C) channels of every prunable channel group (prune.graph).  Each
level is written as a plain deploy prototxt + caffemodel (prune.surgery,
checked by loading it in real Caffe), with its params and MACs.

    python -m apps.prioritise.widths --model NET.prototxt --weights NET.caffemodel \\
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

import numpy as np

from base import caffe_io, cli
from base.errors import ToolkitError
from prune.graph import build_graph
from prune.surgery import prune_net, save_pruned


PROG = "python -m apps.prioritise.widths"
DESCRIPTION = ("Export the utilisation levels of a channel-prioritised net: for each level p, the first "
               "ceil(p * C) channels of every prunable channel group are kept and a standalone deploy "
               "prototxt + caffemodel is written (each loaded in real Caffe before it is kept), with a "
               "params/MACs table (OUT/widths.json).")


class WidthError(ToolkitError):
    pass


def level_keep(graph, p):
    """{group id: first ceil(p * C) channels} for every prunable group."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise WidthError("utilisation level must be in (0, 1], got %r" % (p,))
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
            raise WidthError("group %r has no Scale passenger to mask (layers %s)"
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


def add_levels(ap, default=(1.0, 0.75, 0.5)):
    """--levels: the utilisation levels (shares of every prunable group's channels)."""
    ap.add_argument("--levels", type=parse_levels, default=list(default),
                    help="comma-separated shares of channels, e.g. %s (default)" % ",".join("%g" % p for p in default))


def export_levels(model, weights, levels, out, progress=True):
    """Every level of ``levels`` as OUT/width<PCT>.prototxt/.caffemodel, and OUT/widths.json; returns the rows."""
    from tqdm import tqdm
    from prune.stats import CONVENTION
    rows = []
    for p in tqdm(levels, desc="widths", unit="level", disable=not progress):
        stem = os.path.join(out, "width%g" % (100 * p))
        stats = export_width(model, weights, p, stem + ".prototxt", stem + ".caffemodel")
        rows.append(dict(level=p, prototxt=stem + ".prototxt", caffemodel=stem + ".caffemodel",
                         params=stats.params, macs=stats.macs))
    caffe_io.atomic_write(os.path.join(out, "widths.json"), json.dumps(
        dict(model=model, weights=weights, convention=CONVENTION, levels=rows), indent=1))
    return rows


@cli.entry(PROG)
def main(argv=None):
    ap = cli.parser(PROG, DESCRIPTION)
    ap.add_argument("--model", required=True, help="deploy prototxt of the full-width net")
    ap.add_argument("--weights", required=True, help="its caffemodel (never modified)")
    add_levels(ap)
    ap.add_argument("--out", required=True, help="output folder: width<PCT>.prototxt/.caffemodel per level")
    a = ap.parse_args(argv)
    cli.check_files(model=a.model, weights=a.weights)
    stems = [os.path.join(a.out, "width%g" % (100 * p)) for p in a.levels]
    cli.check_outputs(dict(model=a.model, weights=a.weights), [os.path.join(a.out, "widths.json")] +
                      [s + ext for s in stems for ext in (".prototxt", ".caffemodel")])
    cli.check_out(a.out)
    caffe_io.probe_nets([("--model " + a.model, a.model, "test")])
    caffe_io.check_weights(caffe_io.net_from_param(caffe_io.read_net(a.model)), caffe_io.read_weights(a.weights),
                           a.weights, complete=True)
    rows = export_levels(a.model, a.weights, a.levels, a.out)
    print("%-8s %14s %16s  %s" % ("level", "params", "MACs", "prototxt"))
    for r in rows:
        print("%-8s %14d %16d  %s" % ("%g%%" % (100 * r["level"]), r["params"], r["macs"], r["prototxt"]))
    return 0


if __name__ == "__main__":
    cli.run(main)
