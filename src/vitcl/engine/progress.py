"""One progress line: task, phase, epoch, loss, images/s and ETA. Redrawn in place on a terminal (at most
twice a second), one line per epoch otherwise."""
from __future__ import annotations

import sys
import time


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, enabled: bool = True, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.tty = enabled and stream.isatty()
        self._last_draw = 0.0

    def start_phase(self, label: str, total_batches: int):
        self.label, self.total, self.done = label, total_batches, 0
        self.images, self.loss_sum, self.loss_n = 0, 0.0, 0
        self.t0 = self.epoch_t0 = time.perf_counter()
        self.epoch_images = 0

    def start_epoch(self):
        """The loss shown is the mean over the current epoch's steps."""
        self.loss_sum, self.loss_n = 0.0, 0
        self.epoch_t0, self.epoch_images = time.perf_counter(), 0

    def step(self, n_images: int, loss, epoch_label: str):
        """`loss`: a float or a tensor (kept on its device and summed there; read only when a line is drawn)."""
        self.done += 1
        self.images += n_images
        self.epoch_images += n_images
        if loss is not None:
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        if self.tty and time.perf_counter() - self._last_draw > 0.5:
            self._draw(epoch_label, end="\r")

    @property
    def throughput(self) -> float:
        """Images per second since the phase began (the progress line's, and its ETA's)."""
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    @property
    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_t0

    @property
    def epoch_throughput(self) -> float:
        """Images per second of the current epoch alone (the loggers' per-epoch figure)."""
        return self.epoch_images / max(self.epoch_seconds, 1e-9)

    def _draw(self, epoch_label: str, end: str):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        loss = f"{float(self.loss_sum) / max(self.loss_n, 1):.4f}" if self.loss_n else "-"
        line = (f"{self.label} · {epoch_label} · loss {loss} · {self.throughput:,.0f} img/s · "
                f"ETA {fmt_time(eta)}")
        self.stream.write("\r\033[K" + line + end if self.tty else line + end)
        self.stream.flush()
        self._last_draw = time.perf_counter()

    def end_epoch(self, epoch_label: str, extra: str = ""):
        if self.enabled:
            self._draw(epoch_label + (f" · {extra}" if extra else ""), end="\n")

    def message(self, text: str):
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()
