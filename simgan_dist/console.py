"""Our own console lines, and Ray's console kept quiet unless `--verbose` asks for it."""

from __future__ import annotations

import os
import re
from pathlib import Path

QUIET_RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")

_verbose = False


def configure_console(verbose: bool) -> None:
    """Set Ray's own console settings for this process and the processes it starts.

    Must run before Ray is imported: Ray reads these variables at import and at start-up.
    Quiet (the default): workers' output stays in Ray's log folder, the driver prints
    warnings and errors only, Ray Data logs to its file. Verbose: everything, undeduplicated.
    """
    global _verbose
    _verbose = verbose
    # Ray 2.60 turns token auth on for a new local instance anyway; saying so explicitly
    # keeps it on without the per-command warning that it was turned on.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if os.environ.get("RAY_DATA_LOGGING_CONFIG") == str(QUIET_RAY_DATA_LOGGING):
            del os.environ["RAY_DATA_LOGGING_CONFIG"]  # left by a quiet command earlier in this process
    else:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(QUIET_RAY_DATA_LOGGING))


def verbose() -> bool:
    """Whether the command was asked for framework output (`--verbose`)."""
    return _verbose


def say(line: str) -> None:
    """One of our own console lines (stdout, flushed: `ray job logs` shows it at once)."""
    print(line, flush=True)


def failure_line(error: BaseException) -> str:
    """The line that says what went wrong: a Ray task error's last line (the exception), without colour codes."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def progress_printer(channel, done) -> None:
    """Print the lines rank 0 sends through `channel` (a ray.util.queue.Queue) until `done` is set."""
    from ray.util.queue import Empty

    while True:
        try:
            say(channel.get(timeout=1))
        except Empty:
            if done.is_set() and channel.empty():
                return
