"""One progress line per stage: done / total, rate, loss and ETA, updated in place on a terminal and printed as a
plain line per interval otherwise (logs of submitted jobs, CI).

The training workers already log ``train/images_seen``, ``train/images_per_s`` and the loss to the stage's MLflow
run; the driver reads them back from there, so the same line works for a local run and for a job on a cluster.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class ProgressLine:
    """``label  done/total unit  rate/s  loss  ETA``; in place on a TTY, else one line every ``every_s`` seconds."""

    def __init__(self, label: str, total: int, unit: str = "images", stream: TextIO | None = None, every_s=30.0):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s, self.start, self.last_plain, self.base = every_s, time.monotonic(), 0.0, None
        self.printed: float | None = None  # the count on the last plain line: a final line repeats no count

    def render(self, done: float, extra: str = "") -> str:
        elapsed = time.monotonic() - self.start
        self.base = done if self.base is None else self.base  # a resumed stage: the rate of this session only
        rate = (done - self.base) / elapsed if elapsed > 0 and done > self.base else 0.0
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 0.0
        parts = [f"{self.label}", f"{int(done)}/{self.total} {self.unit} ({pct:.0f}%)", f"{rate:.1f}/s"]
        parts += [extra] if extra else []
        parts += [f"elapsed {_duration(elapsed)}", f"ETA {eta}"]
        return "  ".join(parts)

    def update(self, done: float, extra: str = "", final: bool = False) -> None:
        line = self.render(done, extra)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif (final and done != self.printed) or time.monotonic() - self.last_plain >= self.every_s:
            self.stream.write(line + "\n")
            self.last_plain, self.printed = time.monotonic(), done
        self.stream.flush()


@contextlib.contextmanager
def polling(line: ProgressLine, read: Callable[[], tuple[float, str]], every_s: float = 2.0) -> Iterator[None]:
    """Update ``line`` from ``read() -> (done, extra)`` every ``every_s`` seconds while the body runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a tracking hiccup must never stop the stage
                line.update(*read())

    thread = threading.Thread(target=loop, name="oftsr-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            line.update(*read(), final=True)


def progress_of(run, label: str, total: int):
    """A progress line for a training stage, read from its MLflow run's ``train/*`` metrics."""
    from pipelines.tracking import client

    c = client(run.tracking_uri)

    def read() -> tuple[float, str]:
        m = c.get_run(run.run_id).data.metrics
        loss = m.get("train/total", m.get("train/loss"))
        return m.get("train/images_seen", 0.0), "" if loss is None else f"loss {loss:.4g}"

    return polling(ProgressLine(label, total), read)
