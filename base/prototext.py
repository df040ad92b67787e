"""Where things are in a prototxt's text: the layer block a line falls in (for error messages).

Protobuf's text parser reports a line and column; a user also wants the
layer.  ``layer_at(text, line)`` scans the text's tokens (strings, comments
and braces understood) for the top-level ``layer { ... }`` (or V1
``layers``) block holding that line, and reads its ``name`` and ``type``.
"""
import re

_TOKEN = re.compile(r'''(?P<space>\s+)|(?P<comment>\#[^\n]*)|(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')'''
                    r'''|(?P<open>[{<])|(?P<close>[}>])|(?P<punct>[:;,\[\]])|(?P<word>[^\s{}<>:;,\[\]"'\#]+)'''
                    r'''|(?P<other>.)''', re.S)


def _tokens(text):
    """(kind, value, line) of every meaningful token."""
    line = 1
    for m in _TOKEN.finditer(text):
        kind, value = m.lastgroup, m.group()
        if kind not in ("space", "comment"):
            yield kind, value, line
        line += value.count("\n")


def _unquote(value):
    return value[1:-1] if value[:1] in "\"'" else value


def layer_blocks(text):
    """[(first line, last line or None when unclosed, name, type)] of the top-level layer blocks."""
    blocks, depth, current, last = [], 0, None, []
    for kind, value, line in _tokens(text):
        if kind == "open":
            if depth == 0 and last and last[-1][1] in ("layer", "layers"):
                current = dict(start=last[-1][2], name=None, type=None)
            depth += 1
        elif kind == "close":
            depth = max(depth - 1, 0)
            if depth == 0 and current is not None:
                blocks.append((current["start"], line, current["name"], current["type"]))
                current = None
        elif current is not None and depth == 1 and len(last) >= 2 and last[-1][1] == ":" and \
                last[-2][1] in ("name", "type") and current[last[-2][1]] is None and kind in ("string", "word"):
            current[last[-2][1]] = _unquote(value)
        last = (last + [(kind, value, line)])[-2:]
    if current is not None:
        blocks.append((current["start"], None, current["name"], current["type"]))
    return blocks


def layer_at(text, line):
    """(name, type) of the layer block holding ``line`` (either may be None), or None outside any layer."""
    for start, end, name, kind in layer_blocks(text):
        if start <= line and (end is None or line <= end):
            return name, kind
    return None
