"""Progress of long commands: ``autopar: ...`` lines on stderr and, on a terminal, a transient
rich bar for each phase (tracing, solving, a mesh search) that lasts over ``DELAY_S``.

Library code reports to ``progress``, any callable taking a message (``print`` will do), and
marks a long phase with ``with phase(progress, "solving", total=limit_s, clock=True):``, which
does nothing unless ``progress`` has a ``phase`` method, as :class:`Reporter` (the CLI's) has.
"""

from __future__ import annotations

import sys
import threading
import time

DELAY_S = 1.0  # a phase gets a bar once it has lasted this long; shorter ones leave no trace


class _Null:
    """The phase of a plain callable: nothing to draw."""

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NULL = _Null()


def phase(progress, name: str, total: float | None = None, clock: bool = False):
    """A phase of ``progress``: a handle with ``advance(n)`` and ``close()``, also a context
    manager. ``total`` counts steps (advanced by the caller) or, with ``clock``, seconds (a time
    limit; the bar follows the clock). A no-op for plain callables."""
    start = getattr(progress, "phase", None)
    return start(name, total, clock) if callable(start) else NULL


class _Phase(_Null):
    def __init__(self, reporter: Reporter, name: str, total: float | None, clock: bool):
        self.reporter, self.name, self.total, self.clock = reporter, name, total, clock
        self.t0, self.done, self.task = time.perf_counter(), 0, None

    def advance(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        self.reporter._end(self)

    def count(self) -> str:
        if self.total is None:
            return ""
        if self.clock:
            return f"{min(time.perf_counter() - self.t0, self.total):.0f}/{self.total:g} s"
        return f"{self.done}/{self.total:g}"


class Reporter:
    """The CLI's ``progress=``: ``reporter(msg)`` prints ``autopar: msg`` on stderr, nothing when
    ``quiet``; ``reporter.phase(...)`` (see :func:`phase`) draws bars when ``live`` (default:
    stderr is a terminal). A thread shows a phase's bar once it is ``DELAY_S`` old and follows
    clocked phases; the bars vanish when their phases end."""

    def __init__(self, quiet: bool = False, live: bool | None = None):
        self.quiet = quiet
        self.live = not quiet and (sys.stderr.isatty() if live is None else live)
        self._phases: list[_Phase] = []
        self._lock = threading.Lock()
        self._bars = None  # rich.progress.Progress while drawn
        self._ticker: threading.Thread | None = None

    def __call__(self, *args, **_) -> None:
        if not self.quiet:  # while bars are drawn, rich's stderr proxy prints this above them
            print("autopar:", *args, file=sys.stderr, flush=True)

    def phase(self, name: str, total: float | None = None, clock: bool = False) -> _Null:
        if not self.live:
            return NULL
        ph = _Phase(self, name, total, clock)
        with self._lock:
            self._phases.append(ph)
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, daemon=True, name="autopar-progress")
                self._ticker.start()
        return ph

    def close(self) -> None:
        """End every phase still open (the CLI calls this when a command ends, however it ends)."""
        for ph in list(self._phases):
            ph.close()

    def _end(self, ph: _Phase) -> None:
        with self._lock:
            if ph in self._phases:
                self._phases.remove(ph)
            if self._bars is not None and ph.task is not None:
                self._bars.remove_task(ph.task)
            if not self._phases and self._bars is not None:
                self._bars.stop()
                self._bars = None

    def _tick(self) -> None:
        while True:
            time.sleep(0.1)
            with self._lock:
                if not self._phases:
                    self._ticker = None
                    return
                now = time.perf_counter()
                for ph in self._phases:
                    if ph.task is None and now - ph.t0 >= DELAY_S:
                        if self._bars is None:
                            self._bars = _new_bars()
                            self._bars.start()
                        ph.task = self._bars.add_task(ph.name, total=ph.total, count="")
                    if ph.task is not None:
                        done = min(now - ph.t0, ph.total) if ph.clock and ph.total else ph.done
                        self._bars.update(ph.task, completed=done, count=ph.count())


def _new_bars():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("autopar: {task.description}"), BarColumn(),
                    TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=Console(file=sys.stderr),
                    transient=True, redirect_stdout=False)
