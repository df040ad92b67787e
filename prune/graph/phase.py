"""The layers Caffe instantiates in one phase (its FilterNet rules: phase, level, stage)."""
from caffe.proto import caffe_pb2


def _meets(rule, state):
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    return not any(s in state.stage for s in rule.not_stage)


def phase_view(net, phase=caffe_pb2.TEST):
    """(layers Caffe instantiates in ``phase``, layers it leaves out), as Caffe's FilterNet."""
    state = caffe_pb2.NetState(phase=phase, level=net.state.level, stage=list(net.state.stage))
    kept, dropped = [], []
    for layer in net.layer:
        if len(layer.include):
            on = any(_meets(r, state) for r in layer.include)
        else:
            on = not any(_meets(r, state) for r in layer.exclude)
        (kept if on else dropped).append(layer)
    return kept, dropped
