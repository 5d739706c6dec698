"""Host memory of a job: this process's resident set size sampled against the job's phases.

`RssMonitor` reads VmRSS from /proc/self/status on a daemon thread every `interval` seconds and tags each sample
with the phase the job last named (`monitor.phase("dev step 50")`); with `log_records` it also records every log
record's time and message with the RSS at that moment, so a rise can be placed between two log lines. The
samples go to a JSON-lines file (`path`, local or gs://, written through `metrics.JsonlLog`):

    {"t": seconds since start, "rss_gb": 2.71, "phase": "train steps 1-50"}
    {"t": 12.5, "rss_gb": 3.02, "phase": "dev step 0", "log": "mote_jax.retrieval.encode: ... shard 1/1 ..."}

and `summary()` gives, per phase in order of first entry, the RSS at entry, at exit and the peak. A phase's peak
is exact when the process's high-water mark (VmHWM) rose during it (the kernel's own peak); otherwise it is the
largest sample, which may miss a spike shorter than the interval but is below the process peak anyway.

Linux only (/proc); elsewhere the monitor records nothing and `summary()` is empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Iterator

from mote_jax.training.metrics import JsonlLog

_STATUS = "/proc/self/status"


def read_status_gb(field: str = "VmRSS") -> float | None:
  """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in GB; None off Linux."""
  try:
    with open(_STATUS, encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 2 ** 20  # kB
  except OSError:
    return None
  return None


class _LogTap(logging.Handler):
  def __init__(self, monitor: "RssMonitor"):
    super().__init__(level=logging.INFO)
    self._monitor = monitor

  def emit(self, record: logging.LogRecord) -> None:
    try:
      message = f"{record.name}: {record.getMessage()}"
    except Exception:  # a malformed record must not break the job's logging
      return
    self._monitor._sample(log=message[:300])


class RssMonitor:
  """Samples this process's RSS every `interval` seconds on a daemon thread, tagged with the current phase.

  Use as a context manager (`with RssMonitor(path) as monitor:`), or `start()` / `stop()`. `path` (None: keep
  the samples in memory only) receives one JSON line per sample and per log record (`log_records`).
  `interval` 0 or None: no thread; phases are measured at their boundaries only (and by VmHWM). `phase`: the
  name of the first phase.
  """

  def __init__(self, path: str | os.PathLike | None = None, interval: float | None = 0.5, log_records: bool = True,
               phase: str = "start"):
    if interval is not None and interval < 0:
      raise ValueError(f"RssMonitor interval={interval}: expected a number of seconds >= 0 (0 or None: no sampling "
                       "thread, phases measured at their boundaries only)")
    self.interval = interval
    self._path = path
    self._log_records = log_records
    self._jsonl: JsonlLog | None = None
    self._lock = threading.RLock()  # a log record emitted while sampling (e.g. by a gs:// write) re-enters
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._running = False
    self._tap: _LogTap | None = None
    self._t0 = time.monotonic()
    self._phase = phase
    self._phases: dict[str, dict] = {}
    self._hwm_at_entry = 0.0

  # --- lifecycle --------------------------------------------------------------------------------------------
  def start(self) -> "RssMonitor":
    if self._running:
      return self
    if self._path is not None:
      self._jsonl = JsonlLog(self._path)
    self._t0 = time.monotonic()
    self._enter(self._phase)
    self._running = True
    if self.interval:
      self._thread = threading.Thread(target=self._run, name="RssMonitor", daemon=True)
      self._thread.start()
    if self._log_records:
      self._tap = _LogTap(self)
      logging.getLogger().addHandler(self._tap)
    return self

  def stop(self) -> None:
    if not self._running:
      return
    if self._tap is not None:
      logging.getLogger().removeHandler(self._tap)
      self._tap = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    with self._lock:
      self._leave()
    self._running = False
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> "RssMonitor":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  # --- phases -----------------------------------------------------------------------------------------------
  def set_phase(self, name: str) -> None:
    """Ends the current phase and starts `name` (a phase entered again accumulates into its first entry)."""
    with self._lock:
      self._leave()
      self._phase = name
      self._enter(name)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """`name` for the duration of the block; the phase before it resumes afterwards."""
    previous = self._phase
    self.set_phase(name)
    try:
      yield
    finally:
      self.set_phase(previous)

  def summary(self) -> dict[str, dict[str, float]]:
    """{phase: {"start_gb", "end_gb", "peak_gb"}} in order of first entry (GB, rounded to 0.01)."""
    with self._lock:
      if self._running:
        self._sample_locked()
      return {name: {k: round(v, 2) for k, v in stats.items() if k in ("start_gb", "end_gb", "peak_gb")}
              for name, stats in self._phases.items()}

  # --- sampling ---------------------------------------------------------------------------------------------
  def _enter(self, name: str) -> None:
    rss = read_status_gb("VmRSS")
    if rss is None:
      return
    self._hwm_at_entry = read_status_gb("VmHWM") or rss
    stats = self._phases.setdefault(name, {"start_gb": rss, "peak_gb": rss, "end_gb": rss})
    stats["peak_gb"] = max(stats["peak_gb"], rss)
    self._write(rss)

  def _leave(self) -> None:
    rss, hwm = read_status_gb("VmRSS"), read_status_gb("VmHWM")
    stats = self._phases.get(self._phase)
    if rss is None or stats is None:
      return
    stats["end_gb"] = rss
    stats["peak_gb"] = max(stats["peak_gb"], rss)
    if hwm is not None and hwm > self._hwm_at_entry:  # the process peak was reached in this phase
      stats["peak_gb"] = max(stats["peak_gb"], hwm)
    self._write(rss)

  def _sample(self, log: str | None = None) -> None:
    with self._lock:
      self._sample_locked(log)

  def _sample_locked(self, log: str | None = None) -> None:
    rss = read_status_gb("VmRSS")
    if rss is None:
      return
    stats = self._phases.get(self._phase)
    if stats is not None:
      stats["peak_gb"] = max(stats["peak_gb"], rss)
    self._write(rss, log)

  def _write(self, rss: float, log: str | None = None) -> None:
    if self._jsonl is None:
      return
    record = {"t": round(time.monotonic() - self._t0, 2), "rss_gb": round(rss, 3), "phase": self._phase}
    if log is not None:
      record["log"] = log
    self._jsonl.append(record)

  def _run(self) -> None:
    while not self._stop.wait(self.interval):
      self._sample()
