"""The evaluator's one error type: bad input, named precisely."""


class EvalError(ValueError):
    """Input the evaluator cannot use: the message names the file, line, blob or image."""
