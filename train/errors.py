"""The three kinds of problem a user must fix, and the advice for a failed write.

Each error's message is one line naming the key, file or value and the fix; `python -m train`
prints it as `error: ...` and exits 2. They subclass ValueError so that code below train/ (octo's
ValueErrors) and train's own checks are caught the same way. This module imports nothing of the
project (and not torch), so the CLI can name a bad key before torch is imported.
"""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message is one line."""


class DataError(ValueError):
    """A data or tokenizer problem the user must fix; the message is one line naming the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; one line naming the file and the fix."""


def write_error_fix(
    e: OSError, key: str, *, too_big: str | None = None, other: str | None = None
) -> str:
    """What to do about a failed write into the folder config key `key` names, by e.errno: a full
    disk or quota, a file over the process's size limit (`too_big`: the second remedy, default
    another disk), anything else (`other`, default: a folder you can write to)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free disk space or set {key} to a larger disk"
    if e.errno == errno.EFBIG:
        remedy = too_big or f"set {key} to a disk without one"
        return (
            "a file is larger than this system allows: raise the file-size limit (ulimit -f) "
            f"or {remedy}"
        )
    return other or f"set {key} to a folder you can write to"
