"""The layers Caffe instantiates in one phase (its FilterNet rules: phase, level, stage): base.netcheck's."""
from base.netcheck import phase_view  # noqa: F401  (re-exported: the graph's one phase filter)
