"""What every long-running entry point does with a user's mistake."""
import functools
import sys


def entry(prog):
    """Decorate ``main(argv)``: a bad file, layer or flag (ValueError, OSError, with the message naming it)
    becomes one line ``PROG: error: ...`` on stderr and exit status 2 instead of a traceback."""
    def wrap(main):
        @functools.wraps(main)
        def guarded(argv=None):
            try:
                return main(argv)
            except (ValueError, OSError) as e:
                print("%s: error: %s" % (prog, e), file=sys.stderr)
                return 2
        return guarded
    return wrap
