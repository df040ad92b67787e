"""The toolkit's error classes: what a user can fix, told apart from a bug.

``ToolkitError`` is the base of every error the toolkit raises on purpose
for a user's mistake (a bad file, flag, net or setting); each library has its
own subclass naming what it checks.  ``base.cli.entry`` prints one of these
(and a missing or unreadable file) as one line with exit status 2; any other
exception is a bug of the toolkit and is reported as an internal error.

Not a ValueError on purpose: a ValueError out of numpy, protobuf or the
toolkit's own code is a bug, and must not pass for bad input.
"""


class ToolkitError(Exception):
    """A user's mistake, named in one line: the file, layer or flag, and what is wrong with it."""


class UsageError(ToolkitError):
    """A flag that is missing, malformed or contradicts another."""


class CaffeFileError(ToolkitError):
    """A Caffe file that cannot be read, or does not fit its net (or a net Caffe would not build)."""
