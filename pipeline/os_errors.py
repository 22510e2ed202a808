"""One line for the operating system's errors that concern the whole workspace, not one slide.

A full disk, an exceeded quota or a read-only file system stop a batch (every further slide
would fail the same way); they are named as such, also when a library wrapped them (PyTorch's
DataLoader turns a worker's ``OSError`` into a ``RuntimeError`` that only quotes its text).
"""

from __future__ import annotations

import errno

__all__ = ["WORKSPACE_ERRNOS", "workspace_problem", "describe_os_error"]

#: errno -> what to call it.
WORKSPACE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
          "Read-only file system": errno.EROFS}


def workspace_problem(exc: BaseException) -> str | None:
    """``'disk full'``, ``'disk quota exceeded'`` or ``'read-only file system'`` when ``exc`` (or
    an exception it was raised from, or its text) is one of :data:`WORKSPACE_ERRNOS`; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WORKSPACE_ERRNOS:
            return WORKSPACE_ERRNOS[exc.errno]
        for text, number in _TEXTS.items():
            if text in str(exc):
                return WORKSPACE_ERRNOS[number]
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(exc: OSError) -> str:
    """``<path>: <what> (<strerror>)`` with a hint for the workspace-wide cases."""
    where = exc.filename if exc.filename is not None else "?"
    problem = workspace_problem(exc)
    hint = {
        "disk full": "free space (or move the workspace) and rerun the same command; finished slides are kept",
        "disk quota exceeded": "free space within your quota and rerun the same command; finished slides are kept",
        "read-only file system": "the command must write here; use a writable --workspace",
    }.get(problem or "", "")
    head = f"{where}: {problem} ({exc.strerror})" if problem else f"{where}: {exc.strerror or exc}"
    return f"{head}; {hint}" if hint else head
