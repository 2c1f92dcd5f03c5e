"""Ctrl-C in `cifar-run`: one KeyboardInterrupt in this process's main thread, at a moment where
it cannot be lost, and none in the helper processes a run starts.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Inside an
import that can go wrong twice over: C code that imports (numpy's, torch's) may swallow it, and
the run goes on as if nothing was pressed; or the module is left half imported, and a later
import of it fails in a way that has nothing to do with Ctrl-C. So a Ctrl-C that arrives during
an import is asked again shortly after, until it meets the main thread outside one (torch
takes a few seconds to import: the longest wait). No heavy imports here: the entry point
installs this before it imports Hydra or torch.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

ASK_AGAIN_SECONDS = 0.05


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _importing(frame):
        again = threading.Timer(ASK_AGAIN_SECONDS, os.kill, (os.getpid(), signal.SIGINT))
        again.daemon = True
        again.start()
        return
    raise KeyboardInterrupt


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
    own. So SIGINT is blocked in this (the main) thread, a mask the
    threads and processes it starts inherit, and taken by a thread that does nothing else:
    Python runs its handler in the main thread all the same, and this process stops its
    helpers. Python's resource tracker, which the helpers need, is started first: starting it
    unblocks SIGINT in the thread that starts it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    threading.Thread(target=threading.Event().wait, name="cifar-run-ctrl-c", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
