"""A dependency-free progress line: step, loss, lr, tokens/s, ETA. Redraws in place on a terminal,
prints a line every `every` steps otherwise (CI logs)."""

from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str, every: int = 10, enabled: bool = True, start: int = 0):
        self.total, self.desc, self.every, self.enabled = total, desc, max(every, 1), enabled
        self.start_step, self.t0 = start, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, **fields) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        parts = [f"{self.desc} {step}/{self.total}"]
        for k, v in fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"{_fmt_time(elapsed)}<{_fmt_time(eta)}")
        line = " | ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(120))
            if step == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
