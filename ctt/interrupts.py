"""SIGINT / SIGTERM of a run or study: stop at a safe point, keep what finished, say how to go on.

:class:`SignalGuard` turns both signals into :class:`Interrupted` (a ``BaseException``, like
``KeyboardInterrupt``, so no ``except Exception`` swallows it), raised in the main thread:

- at once, by default (data loading, evaluation, Ray start: nothing to keep half-done);
- inside :meth:`SignalGuard.deferred` blocks (training steps, Ray start-up) the signal is held
  and raised by the next :meth:`SignalGuard.check`, so the state it leaves is consistent; a
  second signal stops at once (``Interrupted.forced``: do not save that state);
- inside :meth:`SignalGuard.delegating` blocks (a Ray Tune fit) the library's own SIGINT handler
  runs its graceful stop, and the first SIGTERM is passed to it as well; a second signal raises.

The entry points catch :class:`Interrupted`, print one line (where it stopped and
:func:`continue_command`) and exit with ``128 + signal`` (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["SIGNALS", "Interrupted", "SignalGuard", "continue_command",
           "exit_quietly_while_loading"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``exit_code`` is the shell's ``128 + signal``.

    ``forced``: a second signal cut a :meth:`SignalGuard.deferred` block short, so the state
    that block was changing may be half-done (do not save it). Whoever knows sets ``where``
    (the phase it stopped in, for the message) and ``resumable`` (whether ``--resume`` finds
    something to continue) on the way out."""

    where: str = ""
    resumable: bool = True

    def __init__(self, signum: int, *, forced: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.forced = forced

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalGuard:
    """Context manager owning the SIGINT and SIGTERM handlers of the main thread.

    ``signum`` is the first signal received (``None`` until one arrives), ``count`` how many
    arrived. Handlers are restored on exit. Libraries that install their own handlers
    (``ray.init``, ``Tuner.fit``) replace ours: call :meth:`install` again after them.

    A received signal stays pending until :meth:`check` raises it, even after the handler
    raised it at once: Python ignores (prints and drops) an exception raised where it cannot
    propagate (at-fork hooks, ``__del__``, weakref callbacks), and the next safe point must
    still stop.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._pending = False
        self._defer: list[bool] = []  # open deferred() blocks: whether a 2nd signal may cut each
        self._delegate = False
        self._old: dict[int, Any] = {}
        self._handler = self._handle  # one bound-method object, so identity checks work

    def __enter__(self) -> SignalGuard:
        self._old = {s: signal.getsignal(s) for s in SIGNALS}
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            if getattr(handler, "_ctt_loading", False):  # loading is over: Python's defaults
                handler = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
            signal.signal(s, handler)

    def install(self) -> None:
        for s in SIGNALS:
            signal.signal(s, self._handler)

    def is_installed(self, signum: int = signal.SIGINT) -> bool:
        return signal.getsignal(signum) == self._handler

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
        self._pending = True
        if self._defer:
            if self.count > 1 and all(self._defer):  # asked twice: stop now
                raise Interrupted(self.signum, forced=True)
            return
        if self._delegate and self.count == 1:
            graceful = signal.getsignal(signal.SIGINT)
            if callable(graceful) and graceful != self._handler:
                graceful(signal.SIGINT, frame)
                return
        raise Interrupted(self.signum)

    @contextlib.contextmanager
    def deferred(self, forcible: bool = True) -> Iterator[None]:
        """Hold signals until the next :meth:`check`. ``forcible``: a second signal raises
        at once anyway (``Interrupted.forced``), so a hung block can still be stopped; use
        False only for short blocks that must complete (a final save)."""
        self._defer.append(forcible)
        try:
            yield
        finally:
            self._defer.pop()

    def check(self) -> None:
        """A safe point: raise :class:`Interrupted` if a signal is pending (also inside a
        :meth:`deferred` block: the caller says its state is consistent here)."""
        if self._pending and self.signum is not None:
            self._pending = False
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """Inside a :meth:`deferred` block, a stretch a signal may cut short (e.g. an
        evaluation, which changes no state): a held signal raises on entry, a new one at once."""
        held, self._defer = self._defer, []
        try:
            self.check()
            yield
        finally:
            self._defer = held

    @contextlib.contextmanager
    def delegating(self) -> Iterator[None]:
        """Around a library call that stops gracefully on SIGINT with its own handler: the
        first SIGTERM is handed to that handler too; a further signal raises at once."""
        self.install()
        self._delegate = True
        try:
            yield
        finally:
            self._delegate = False


def exit_quietly_while_loading() -> None:
    """Call first thing in a script, before its slow imports (torch, Ray: seconds): until
    ``main`` enters its :class:`SignalGuard`, SIGINT/SIGTERM exit 130/143 with one line
    instead of a ``KeyboardInterrupt`` traceback out of some import."""

    def loading(signum: int, frame: FrameType | None) -> None:
        again = continue_command(None, [], resume=False)
        print(f"interrupted ({signal.Signals(signum).name}) while loading; nothing was "
              f"written; run again with: {again}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    loading._ctt_loading = True  # type: ignore[attr-defined]
    for s in SIGNALS:
        signal.signal(s, loading)


def continue_command(argv: list[str] | None, prog: list[str], *, resume: bool = True,
                     drop: tuple[str, ...] = ()) -> str:
    """The shell command that continues an interrupted run.

    Args:
        argv: the arguments ``main`` parsed; ``None`` means the process's own command line,
            repeated as typed (``sys.orig_argv``: interpreter, ``-m``, script and all).
        prog: the command before the arguments when ``argv`` is given (e.g. ``python -m
            ctt.train``).
        resume: append ``--resume`` (unless present); ``False`` when nothing was written yet
            and the same command starts it again.
        drop: flags without a value to leave out (``--overwrite`` would contradict
            ``--resume``).
    """
    if argv is None:
        words = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    else:
        words = [*prog, *argv]
    words = [w for w in words if w not in drop]
    if resume and "--resume" not in words:
        words.append("--resume")
    return shlex.join(words)
