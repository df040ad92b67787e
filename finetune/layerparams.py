"""param_str of the toolkit's Python layers: a JSON object checked against the layer's defaults."""
import json


def json_params(param_str, defaults, layer, error):
    """param_str -> dict with ``defaults`` filled in; not JSON, not an object or an unknown key raises
    ``error`` (a base.errors.ToolkitError subclass) naming the ``layer`` type."""
    try:
        given = json.loads(param_str) if param_str and param_str.strip() else {}
    except json.JSONDecodeError as e:
        raise error("%s param_str is not JSON (%s): %r" % (layer, e, param_str)) from None
    if not isinstance(given, dict):
        raise error("%s param_str must be a JSON object, got %r" % (layer, param_str))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise error("%s param_str: unknown key(s) %s; known: %s" % (layer, ", ".join(unknown), ", ".join(defaults)))
    return dict(defaults, **given)


def class_labels(blob, num_classes, layer, error):
    """A label blob as int64 class indices; a fractional, negative or too-large label raises ``error``
    naming the sample."""
    import numpy as np
    raw = blob.data.reshape(-1)
    labels = raw.astype(np.int64)
    bad = np.flatnonzero((labels != raw) | (labels < 0) | (labels >= num_classes))
    if bad.size:
        raise error("%s: label %r of sample %d is not a class in 0..%d"
                    % (layer, float(raw[bad[0]]), int(bad[0]), num_classes - 1))
    return labels
