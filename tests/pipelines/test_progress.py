"""The stage progress line: in place on a terminal, one plain line per interval otherwise."""

from __future__ import annotations

import io

from pipelines.progress import ProgressLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_plain_stream_gets_a_line_per_interval_and_one_final_line():
    out = io.StringIO()
    line = ProgressLine("teacher", 100, stream=out, every_s=3600)
    line.update(0)
    line.update(50, "loss 0.1")  # within the interval: not printed
    line.update(100, "loss 0.05", final=True)
    line.update(100, "loss 0.05", final=True)  # the same count again: not repeated
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("teacher  0/100 images (0%)") and lines[0].endswith("ETA ?")
    assert lines[1].startswith("teacher  100/100 images (100%)") and "loss 0.05" in lines[1]
    assert lines[1].endswith("ETA 0:00")


def test_a_terminal_gets_the_line_rewritten_in_place():
    out = Terminal()
    line = ProgressLine("distill", 10, stream=out)
    line.update(5)
    line.update(10, final=True)
    text = out.getvalue()
    assert text.count("\r\033[K") == 2 and text.endswith("ETA 0:00\n") and text.count("\n") == 1
