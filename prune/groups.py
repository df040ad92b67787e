"""List the channel-dependency groups of a Caffe net.

    python -m prune.groups NET.prototxt           # readable listing
    python -m prune.groups NET.prototxt --json    # every slice, for scripts

A group is a set of channels removed together: its producers' output rows,
its per-channel passengers (PReLU, BatchNorm, Scale, depthwise conv ...) and
the input channels of its consumers (the layers a ThiNet-style selector
reconstructs). Groups that cannot be pruned are listed with the reason.

Nets of Caffe forks (SphereFace, SSD, ShuffleNet, SENet, MobileNet ports...)
are read too: their layers are listed first, by fork; a fork layer the graph
has no channel rule for is a fixed point (the groups reaching it stay, with
the reason), the rest of the net stays prunable.
"""
import json
from collections import OrderedDict

from base import caffe_io, cli, forks, netcheck
from prune.graph import build_graph, phase_view


def _consumer_text(c, channels):
    end = c.start + channels * c.block - 1 if channels is not None else "?"
    if c.block == 1:
        return "%s [reads %s, input channels %s..%s]" % (c.layer, c.bottom, c.start, end)
    return "%s [reads %s, columns %s..%s, %d per channel]" % (c.layer, c.bottom, c.start, end, c.block)


def fork_layers(net):
    """{fork in words: [layer (type[: fork fields])]} of the TEST-phase layers this Caffe build cannot run."""
    known, found = netcheck.known_types(), OrderedDict()
    for layer in phase_view(net)[0]:
        fields = forks.fork_fields(layer)
        if layer.type in known and not fields:
            continue
        fork = forks.TYPES.get(layer.type) or (fields[0][1] if fields and layer.type in known else None)
        where = forks.fork_name(fork) if fork else "types this Caffe build does not have (a Caffe fork's?)"
        shown = ": " + ", ".join(f for f, _ in fields) if fields and layer.type in known else ""
        found.setdefault(where, []).append("%s (%s%s)" % (layer.name, layer.type, shown))
    return found


def describe(graph, net=None):
    """The readable listing, one block per group (``net``: list the layers of Caffe forks first)."""
    groups = list(graph.groups.values())
    lines = ["%s: %d channel groups, %d prunable" % (graph.source, len(groups), len(graph.prunable()))]
    found = fork_layers(net) if net is not None else {}
    if found:
        lines.append("layers of Caffe forks (this Caffe build cannot run them; the channel graph treats those it "
                     "has no rule for as fixed points):")
        lines += ["  %s: %s" % (fork, ", ".join(layers)) for fork, layers in found.items()]
    for g in groups:
        state = "prunable" if g.prunable else "fixed: " + "; ".join(g.reasons)
        lines.append("")
        lines.append("%s  (%s channels, %s)" % (g.id, g.channels if g.channels is not None else "?", state))
        if g.producers:
            lines.append("  producers:  " + ", ".join(g.layers("producers")))
        if g.passengers:
            lines.append("  passengers: " + ", ".join(g.layers("passengers")))
        if g.consumers:
            lines.append("  consumers:  " + ", ".join(_consumer_text(c, g.channels) for c in g.consumers))
        blobs = list(dict.fromkeys(b.blob for b in g.blobs))
        if blobs:
            lines.append("  blobs:      " + ", ".join(blobs))
    return "\n".join(lines)


@cli.entry("python -m prune.groups")
def main(argv=None):
    parser = cli.parser("python -m prune.groups", description=__doc__, raw=True)
    parser.add_argument("prototxt", help="net definition (.prototxt); the TEST-phase view is analysed")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of groups with every parameter slice (layer, blob, axis, start, "
                             "block) instead of the listing")
    args = parser.parse_args(argv)
    cli.check_file(args.prototxt, "net definition")
    net = caffe_io.read_net(args.prototxt)
    graph = build_graph(net, args.prototxt)
    if args.json:
        print(json.dumps([g.to_dict() for g in graph.groups.values()], indent=1))
    else:
        print(describe(graph, net))
    return 0


if __name__ == "__main__":
    cli.run(main)
