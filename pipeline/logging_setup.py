"""Logging for the command line: the terminal (level by -v/-q) and a log file per run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(verbose: int = 0, quiet: bool = False, log_file: Path | None = None) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)
    if verbose < 2:
        for noisy in ("PIL", "matplotlib", "h5py", "timm"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def attach_run_log(workspace: Path, command: str, create_workspace: bool = True) -> Path | None:
    """Also log (INFO and up, whatever -q says) to ``<workspace>/logs/<command>-<time>-<pid>.log``.

    Returns the log's path, or None (with a warning) where the workspace cannot be written, and
    None where it does not exist and ``create_workspace`` is False (train and evaluate need one
    that earlier stages made: a mistyped --workspace must not leave an empty folder behind).
    """
    import os
    import time

    if not create_workspace and not Path(workspace).is_dir():
        return None
    path = Path(workspace) / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError as exc:
        # A read-only workspace still serves what only reads it; whatever must be written there
        # fails with its own message where it is written.
        logging.getLogger(__name__).warning("no log file: cannot write %s (%s)", path.parent, exc.strerror or exc)
        return None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO:  # -q quiets the terminal, not the file
        for h in root.handlers:
            if h is not handler and h.level == logging.NOTSET:
                h.setLevel(root.level)
        root.setLevel(logging.INFO)
    return path
