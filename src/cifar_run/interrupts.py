"""Ctrl-C in `cifar-run`: one KeyboardInterrupt in this process's main thread, at a moment where
it cannot be lost or turned into another error, and none in the helper processes a run starts.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. In two kinds of
place that goes wrong. Inside an import, C code that imports (numpy's, torch's) may swallow it
and the run goes on as if nothing was pressed, or the module is left half imported and a later
import of it fails in a way that has nothing to do with Ctrl-C. Inside Hydra's and OmegaConf's
code (composing the config, between sweep jobs), a `finally` block that assumes its `try` got
further can replace it with an error of its own and a traceback. So a Ctrl-C that arrives there
is asked again shortly after, until it meets the main thread elsewhere (torch takes a few
seconds to import: the longest wait). Should some other library still turn it into another
exception, `pressed` tells the entry point that this was Ctrl-C. No heavy imports here: the
entry point installs this before it imports Hydra or torch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

ASK_AGAIN_SECONDS = 0.05
# After this long a deferred press is raised wherever the main thread is: never lose it.
DEFER_AT_MOST_SECONDS = 10.0
# Packages whose cleanup code can mistake a KeyboardInterrupt for an error of its own (Hydra's
# config sources close a file they may not have opened); antlr4 is their parser.
_FRAGILE = frozenset({"hydra", "omegaconf", "antlr4"})

_state = {"pressed": False, "deferred_since": None}


def _package(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "")).partition(".")[0]


def _unsafe(frame: FrameType | None) -> bool:
    """Whether a KeyboardInterrupt raised in `frame` could be lost or changed (see above): an
    import anywhere on the stack, or Hydra's code the first one below the standard library's."""
    deciding = None
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        if deciding is None and _package(frame) not in sys.stdlib_module_names:
            deciding = _package(frame)
        frame = frame.f_back
    return deciding in _FRAGILE


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    since = _state["deferred_since"]
    waited = 0.0 if since is None else time.monotonic() - since
    if _unsafe(frame) and waited < DEFER_AT_MOST_SECONDS:
        if since is None:
            _state["deferred_since"] = time.monotonic()
        again = threading.Timer(ASK_AGAIN_SECONDS, os.kill, (os.getpid(), signal.SIGINT))
        again.daemon = True
        again.start()
        return
    _state["pressed"], _state["deferred_since"] = True, None
    raise KeyboardInterrupt


def pressed() -> bool:
    """Whether Ctrl-C was pressed in this process (raised, or still waiting to be)."""
    return bool(_state["pressed"] or _state["deferred_since"] is not None)


def install() -> None:
    """Take over Ctrl-C in the main thread (as above), unless SIGINT is ignored: a command
    started in the background of a script (`cifar-run ... &`) starts so, and stays so."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def to_this_process_only() -> None:
    """The terminal's Ctrl-C reaches every process of its group, and a helper process still
    starting up (a sweep's joblib worker: seconds of imports) would print a traceback of its
    own. So SIGINT is blocked in this (the main) thread, a mask the threads and processes it
    starts inherit, and taken by a thread that does nothing else: Python runs its handler in
    the main thread all the same, and this process stops its helpers. Python's resource
    tracker, which the helpers need, is started first: starting it unblocks SIGINT in the
    thread that starts it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    threading.Thread(target=threading.Event().wait, name="cifar-run-ctrl-c", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
