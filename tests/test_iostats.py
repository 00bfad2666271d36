import threading
import time

from worker.stream.iostats import Channel


def test_busy_time_counts_overlapping_transfers_once_and_survives_reset():
    ch = Channel("x")

    def transfer():
        ch.begin()
        time.sleep(0.05)
        ch.end(100)

    ts = [threading.Thread(target=transfer) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s = ch.stats()
    assert s["bytes"] == 400 and 0.04 < s["busy_s"] < 0.15  # four overlapping 50 ms reads ≈ 50 ms busy
    ch.begin()
    ch.reset()  # a transfer in flight across a reset still ends the busy span
    time.sleep(0.02)
    ch.end(10)
    s = ch.stats()
    assert s["bytes"] == 10 and s["busy_s"] >= 0.015 and s["gbps"] > 0


def test_a_channel_that_never_goes_idle_still_reports_its_bandwidth():
    """The bottleneck channel (SSD reads in ssd mode) always has a read in flight, also when the run's
    stats are read: its busy time runs up to that moment (it read 0 s and no GB/s before)."""
    ch = Channel("ssd_read")
    ch.begin()  # a prefetch that stays in flight
    ch.reset()
    for _ in range(3):  # reads overlapping it end, but the channel is never idle
        ch.begin()
        time.sleep(0.01)
        ch.end(1000)
    s = ch.stats()
    assert s["bytes"] == 3000 and s["busy_s"] >= 0.025 and s["gbps"] is not None


def test_untimed_bytes_count_but_take_no_part_in_the_rate():
    """Bytes moved inside CUDA graph replays have no clock: they add to the bytes, not to the rate."""
    ch = Channel("kv_h2d")
    ch.add_untimed(1000)
    assert ch.stats() == {"bytes": 1000, "busy_s": 0.0, "gbps": None, "untimed_bytes": 1000}
    ch.begin()
    time.sleep(0.01)
    ch.end(10**7)
    s = ch.stats()
    assert s["bytes"] == 10**7 + 1000 and s["untimed_bytes"] == 1000
    assert abs(s["gbps"] - 10**7 / s["busy_s"] / 1e9) < 1e-12  # the timed transfers' own rate
    ch.reset()
    assert ch.stats() is None


def test_mean_inflight_is_the_queue_depth_while_busy():
    """Four reads at once for 60 ms, then one alone for 60 ms: 2.5 in flight on average while busy,
    which tells a full queue from a thin one where the rate alone cannot."""
    ch = Channel("ssd_read")
    gate = threading.Barrier(4)

    def read(hold: float) -> None:
        gate.wait()
        ch.begin()
        time.sleep(hold)
        ch.end(100)

    ts = [threading.Thread(target=read, args=(0.06,)) for _ in range(3)] + [threading.Thread(target=read, args=(0.12,))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s = ch.stats()
    assert 2.1 < s["mean_inflight"] < 2.9, s
    ch.reset()
    ch.begin()  # one read that stays in flight: depth 1 up to the moment the stats are read
    time.sleep(0.02)
    assert ch.stats() is None  # no bytes ended yet: nothing to report
    ch.end(10)
    assert 0.9 < ch.stats()["mean_inflight"] <= 1.0 + 1e-9
