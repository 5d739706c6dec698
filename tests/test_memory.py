"""mote_jax.training.memory.RssMonitor: RSS against phases and log lines, checked against allocations of a known size."""

import json
import logging
import sys
import time

import numpy as np
import pytest

from mote_jax.training.memory import RssMonitor, read_status_gb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")

_MB = 2 ** 20 / 2 ** 30  # one MiB in GB


def test_a_phase_peak_holds_what_the_phase_allocated(tmp_path):
  path = tmp_path / "rss.jsonl"
  with RssMonitor(path, interval=0.05) as monitor:
    monitor.set_phase("small")
    time.sleep(0.2)
    with monitor.phase("big"):
      block = np.ones(300 * 2 ** 20, np.uint8)  # 300 MiB, every page touched
      logging.getLogger("probe").warning("allocated %d bytes", block.nbytes)
      time.sleep(0.2)
      del block
    time.sleep(0.2)
  summary = monitor.summary()
  assert list(summary) == ["start", "small", "big"]  # "start": the default name of the first phase
  big, small = summary["big"], summary["small"]
  # The block was resident within "big": its peak is at least 300 MiB above its start (up to rounding), and the
  # phase "small", which allocated nothing, peaked at no more than its start plus noise.
  assert big["peak_gb"] - big["start_gb"] >= 300 * _MB - 0.02
  assert small["peak_gb"] - small["start_gb"] < 0.05
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert {r["phase"] for r in records} >= {"small", "big"}
  assert all(r["t"] >= 0 and r["rss_gb"] > 0 for r in records)
  logged = [r for r in records if "log" in r]
  assert [r["phase"] for r in logged if r["log"].startswith("probe: allocated")] == ["big"]
  # The record at the log line saw the block: above the sample at "big"'s start by ~300 MiB.
  at_log = next(r for r in logged if r["log"].startswith("probe: allocated"))
  assert at_log["rss_gb"] >= big["start_gb"] + 300 * _MB - 0.02
  # The monitor no longer listens once stopped.
  logging.getLogger("probe").warning("after")
  assert len(path.read_text().splitlines()) == len(records)


def test_without_a_thread_phases_are_measured_at_their_boundaries():
  monitor = RssMonitor(None, interval=0, log_records=False)
  with monitor:
    with monitor.phase("holds"):
      block = np.ones(200 * 2 ** 20, np.uint8)
    rss_now = read_status_gb()
  summary = monitor.summary()
  assert summary["holds"]["end_gb"] - summary["holds"]["start_gb"] >= 200 * _MB - 0.02
  assert summary["holds"]["end_gb"] <= rss_now + 0.01
  del block
  with pytest.raises(ValueError, match="interval"):
    RssMonitor(None, interval=-1)
