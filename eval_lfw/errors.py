"""The evaluator's one error type: bad input, named precisely."""
from base.errors import ToolkitError


class EvalError(ToolkitError):
    """Input the evaluator cannot use: the message names the file, line, blob or image."""
