"""Image lists and image trees: which images a tool reads.

The list format is what Caffe's ImageData reads: one ``relative/path label``
per line, the label (an integer 0..K-1) after the last space, the path
relative to the layer's ``root_folder`` (which Caffe prepends as a plain
string, so it must end with ``/``: see ``image_data_root``).  A tree is a
folder of identity folders (ROOT/identity/*.jpg, the CASIA-WebFace layout).

``image_files`` picks the images a sampler or a check reads from either.
"""
import contextlib
import hashlib
import json
import os
import re
import sys

import numpy as np

from .errors import ToolkitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


class ListError(ToolkitError):
    """An image list or image tree that cannot be used; names file and line."""


def image_data_root(root):
    """``root`` as ImageData's root_folder wants it: with a trailing slash."""
    root = os.path.abspath(os.fspath(root))
    return root if root.endswith(os.sep) else root + os.sep


def caffe_path(root, rel):
    """The file ImageData opens for a list's ``rel``: root_folder + path as plain strings (an absolute path
    after a root stays after it), root_folder ending with one slash as finetune.trainnet writes it."""
    return (root.rstrip("/") + "/" if root else "") + rel


def parse_line(line, source, lineno):
    """One line as ImageData reads it (``getline``, then ``find_last_of(' ')``): the path is everything before
    the last space, spaces and all; the label the digits after it (a CRLF file's ``\\r`` is what ``atoi``
    skips).  Whatever ImageData would read differently from what the line seems to say is refused."""
    where = "%s:%d" % (source, lineno)
    path, space, label = line.rpartition(" ")
    if not line.strip():
        raise ListError("%s: the line is empty; ImageData reads it as an image with no path" % where)
    if not space or not path:
        raise ListError("%s: expected 'relative/path label', got %r" % (where, line))
    if not label.strip():
        raise ListError("%s: %r ends with a space; ImageData takes the label after the last space, here none"
                        % (where, line))
    m = re.fullmatch(r"(-?[0-9]+)\r?", label)
    if not m:
        raise ListError("%s: label %r is not an integer" % (where, label.rstrip("\r")))
    value = int(m.group(1))
    if value < 0:
        raise ListError("%s: label %d is negative" % (where, value))
    if value > 2 ** 31 - 1:
        raise ListError("%s: label %d is beyond what ImageData reads (an int, at most 2147483647)" % (where, value))
    return path, value


def read_lines(path):
    """The list's lines split at ``\\n`` only, as ``std::getline`` splits them (a final newline ends the last
    line, it does not start an empty one)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ListError("cannot read image list %s: %s" % (path, e.strerror or e)) from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [os.fsdecode(line) for line in lines]


def read_list(path, root="", num_classes=None, check_files=True, decode=False, progress=True):
    """Read and validate an image list -> [(ImageData's path, label), ...], parsed as ImageData parses it.

    A line ImageData would misread, a label outside 0..num_classes-1, (``check_files``) an image that does
    not exist or (``decode``) one OpenCV cannot decode raises ListError naming the list file, the line and
    the image: Caffe aborts the process on such a line, in the middle of training.
    """
    path = os.fspath(path)
    items, lines = [], read_lines(path)
    for lineno, line in enumerate(lines, 1):
        rel, label = parse_line(line, path, lineno)
        if num_classes is not None and label >= num_classes:
            raise ListError("%s:%d: label %d is out of range for %d classes (0..%d)"
                            % (path, lineno, label, num_classes, num_classes - 1))
        full = caffe_path(root, rel)
        if check_files and not os.path.isfile(full):
            raise ListError("%s:%d: image %s does not exist (line %r%s)" % (path, lineno, full, line, _hint(root, rel)))
        items.append((full, label))
    if not items:
        raise ListError("image list %s is empty" % path)
    if decode:
        check_decode(path, items, lines, progress)
    return items


def _hint(root, rel):
    if rel != rel.strip():
        return "; ImageData keeps the spaces around the path"
    if root and rel.startswith("/"):
        return "; ImageData puts the root folder before an absolute path too"
    return ""


def check_decode(source, items, lines, progress=True):
    """Decode every image fully with OpenCV (Caffe's ImageData reads them with ``cv::imread``, colour); a file
    it cannot decode is refused naming and quoting its line of ``lines`` (one per item).  Images decoded before are remembered by path, size
    and mtime (in .cache/decoded), so a second run only stats them."""
    import cv2
    from tqdm import tqdm
    from .caffe_io import atomic_write
    cache = os.path.join(CACHE, hashlib.sha256(os.path.abspath(source).encode("utf-8", "surrogateescape"))
                         .hexdigest()[:32] + ".json")
    try:
        with open(cache) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    good, todo = {}, []
    for lineno, (path, _) in enumerate(items, 1):
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns]
        if known.get(path) == stamp:
            good[path] = stamp
        else:
            todo.append((lineno, path, stamp))
    try:
        with native_stderr_off() as stderr:
            for lineno, path, stamp in tqdm(todo, desc="decode " + os.path.basename(source), unit="img", file=stderr,
                                            disable=not progress or len(todo) < 2000, leave=False):
                if path not in good:
                    if cv2.imread(path, cv2.IMREAD_COLOR) is None:
                        raise ListError("%s:%d: image %s cannot be decoded by OpenCV (Caffe's ImageData would "
                                        "abort on it; line %r)" % (source, lineno, path, lines[lineno - 1]))
                    good[path] = stamp
    finally:
        if todo and good:
            try:
                atomic_write(cache, json.dumps(good), sync=False)
            except (OSError, ValueError):
                pass                       # a cache that cannot be written costs only time


@contextlib.contextmanager
def native_stderr_off():
    """File descriptor 2 to /dev/null inside the block (libjpeg's "Premature end of JPEG file" lines would
    come before the one-line refusal); yields a file on the real stderr for the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        with os.fdopen(os.dup(saved), "w") as real:
            yield real
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "decoded")


def list_text(items):
    """[(relative path, label)] -> the list file's text."""
    out = []
    for rel, label in items:
        if "\n" in rel or "\r" in rel or rel != rel.strip():
            raise ListError("image path %r cannot be written to an ImageData list" % rel)
        out.append("%s %d\n" % (rel, label))
    return "".join(out)


def scan_tree(root):
    """ROOT/identity/image -> {identity: [identity/image, ...]}, both sorted."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ListError("image folder %s does not exist" % root)
    tree = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder)
                       if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(folder, f)))
        if files:
            tree[name] = [name + "/" + f for f in files]
    if not tree:
        raise ListError("%s holds no identity folders with images (expected ROOT/identity/*.jpg)" % root)
    return tree


def image_files(data, root="", people=None, limit=0, seed=0):
    """(root, [relative paths]) of the images to read.

    data: a list file ("path label" lines, relative to root) or a folder of
    identity sub-folders.  people: keep only these identity folders (a folder
    ``data`` only).  limit > 0 takes that many images, spread over
    identities by a seeded draw.
    """
    if os.path.isdir(data):
        root = data
        tree = scan_tree(data)
        if people is not None:
            tree = {k: v for k, v in tree.items() if k in people}
        rels = [r for files in tree.values() for r in files]
    elif os.path.isfile(data):
        if people is not None:
            raise ListError("a choice of people filters an image folder; %s is a list file" % data)
        rels = [os.path.relpath(path, root) if root else path for path, _ in read_list(data, root)]
        root = root or ""
    else:
        raise ListError("image data %s is neither a list file nor a folder" % data)
    if not rels:
        raise ListError("no images found in %s" % data)
    if limit and limit > len(rels):
        raise ListError("asked for %d images but %s has only %d" % (limit, data, len(rels)))
    if limit and limit < len(rels):
        pick = np.sort(np.random.default_rng(seed).choice(len(rels), limit, replace=False))
        rels = [rels[i] for i in pick]
    return root, rels
