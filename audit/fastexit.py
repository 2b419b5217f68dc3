"""How the ``medaudit`` command ends: with ``os._exit`` once Python's own exit work is done.

:func:`medaudit.cli.main` records the command's exit code with :func:`exit_when_done`. At
interpreter exit Python first joins the non-daemon threads, then runs the ``atexit`` handlers
in reverse order of registration; the handler here is registered when the ``medaudit`` package
is first imported, before torch, logging or multiprocessing register theirs, so it runs after
all of them. It flushes the standard streams and ends the process, skipping only the
interpreter's teardown of the modules and libraries it loaded (torch, matplotlib,
scikit-learn), which took 0.5-0.9 s of every run and does nothing a finished command needs.
Without a recorded code (``medaudit`` used as a library, an exception escaping a command) the
process exits the usual way.
"""

from __future__ import annotations

import atexit
import os
import sys

_code: list[int] = []


def exit_when_done(code: object) -> None:
    """Record the exit code of a finished command (a ``SystemExit.code``)."""
    _code.append(0 if code is None else code if isinstance(code, int) else 1)


def _exit_now() -> None:
    if not _code:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`medaudit ... | head`) or stream
            pass
    os._exit(_code[0])


atexit.register(_exit_now)
