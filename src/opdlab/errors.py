"""The one exception type that means "the user gave us something wrong".

The CLI prints a `UserError` as one line on stderr and exits with code 2; anything else
is a bug and keeps its traceback. Messages name the file, line, tensor or field at
fault and say what to do, e.g.::

    raise UserError(f"{path}: line 3: field 'prompt' is missing; every line needs a 'prompt' string")
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
