"""Image lists and image trees: which images a tool reads.

The list format is what Caffe's ImageData reads: one ``relative/path label``
per line, the label (an integer 0..K-1) after the last space, the path
relative to the layer's ``root_folder`` (which Caffe prepends as a plain
string, so it must end with ``/``: see ``image_data_root``).  A tree is a
folder of identity folders (ROOT/identity/*.jpg, the CASIA-WebFace layout).

``image_files`` picks the images a sampler or a check reads from either.
"""
import os

import numpy as np

from .errors import ToolkitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


class ListError(ToolkitError):
    """An image list or image tree that cannot be used; names file and line."""


def image_data_root(root):
    """``root`` as ImageData's root_folder wants it: with a trailing slash."""
    root = os.path.abspath(os.fspath(root))
    return root if root.endswith(os.sep) else root + os.sep


def parse_line(line, source, lineno):
    """``path label`` -> (path, label); the label follows the last space, as in ImageData."""
    text = line.rstrip("\r\n")
    path, _, label = text.rstrip().rpartition(" ")
    if not path.strip() or not label:
        raise ListError("%s:%d: expected 'relative/path label', got %r" % (source, lineno, text))
    try:
        value = int(label)
    except ValueError:
        raise ListError("%s:%d: label %r is not an integer" % (source, lineno, label)) from None
    if value < 0:
        raise ListError("%s:%d: label %d is negative" % (source, lineno, value))
    return path.strip(), value


def read_list(path, root="", num_classes=None, check_files=True):
    """Read and validate an image list -> [(root-joined path, label), ...].

    A malformed line, a label outside 0..num_classes-1 or (``check_files``) an
    image that does not exist raises ListError naming the list file, the
    line and the image.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ListError("cannot read image list %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rel, label = parse_line(line, path, lineno)
        if num_classes is not None and label >= num_classes:
            raise ListError("%s:%d: label %d is out of range for %d classes (0..%d)"
                            % (path, lineno, label, num_classes, num_classes - 1))
        full = os.path.join(root, rel) if root else rel
        if check_files and not os.path.isfile(full):
            raise ListError("%s:%d: image %s does not exist" % (path, lineno, full))
        items.append((full, label))
    if not items:
        raise ListError("image list %s is empty" % path)
    return items


def check_images_decode(items, source):
    """Refuse a list naming a file that is not an image (Caffe's ImageData aborts the process on one, in the
    middle of training): every file's signature is read, once per list and process."""
    key = (os.path.abspath(source), os.path.getmtime(source), os.path.getsize(source), tuple(items[:1]), len(items))
    if key in _DECODED:
        return
    import cv2
    for path, _ in items:
        if not cv2.haveImageReader(path):   # OpenCV's decoders (Caffe's) by the file's signature
            raise ListError("%s names %s, which is not an image OpenCV (Caffe's ImageData) can decode"
                            % (source, path))
    _DECODED.add(key)


_DECODED = set()


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
