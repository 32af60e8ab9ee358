"""The one exception type that means "the user gave us something wrong".

The CLI prints a `UserError` as one line on stderr and exits with code 2; anything else
is a bug and keeps its traceback. Messages name the file, line, tensor or field at
fault and say what to do, e.g.::

    raise UserError(f"{path}: line 3: field 'prompt' is missing; every line needs a 'prompt' string")
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# Failures of the machine rather than of opdlab: a full disk, a read-only or forbidden folder.
# The CLI reports these as one line (like a UserError); any other OSError is a bug and keeps its traceback.
_ENVIRONMENT_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG"}


def environment_error(exc: BaseException) -> UserError | None:
    """A one-line `UserError` for a full disk / read-only / forbidden path, else None."""
    import errno

    codes = {getattr(errno, name) for name in _ENVIRONMENT_ERRNOS if hasattr(errno, name)}
    if not isinstance(exc, OSError) or exc.errno not in codes:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return UserError(f"{where}{exc.strerror or exc}; free disk space or fix the folder's permissions, then run again "
                     "(an interrupted distill run continues with --resume RUN_DIR)")
