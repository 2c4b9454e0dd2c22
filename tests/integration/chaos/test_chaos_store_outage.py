"""The object store goes away: the real ``weed mini`` is stopped and started again on the same ports.

~10 s outages are ridden out (reads and checkpoint writes retry with backoff); outages longer than
the configured deadline end in one clear StorageError, and nothing already stored is damaged.
"""

from __future__ import annotations

import re
import threading
import time

import chaos_harness as H
import pytest
from test_chaos_bad_inputs import _samples, _write

OUTAGE_S = 10.0


def _reader(location, deadline: float):
    from ctm_dist.data.reader import ShardLoader
    from ctm_dist.storage import Location

    loc = Location.parse(
        location.url,
        endpoint_url=location.endpoint_url,
        key=location.key,
        secret=location.secret,
        retry_deadline=deadline,
    )
    return ShardLoader(loc, "train", batch_size=4, seed=0, train=False)


def _keys(batches):
    return [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v]


@pytest.mark.timeout(120)
def test_reads_ride_out_a_short_outage_and_fail_clearly_after_the_deadline(
    chaos_store, chaos_location, scenario
):
    """One ~10 s outage, two readers mid-epoch: one with a 60 s deadline (rides it out, same samples),
    one with a 3 s deadline (one clear error, well before the store returns). Afterwards the split
    reads back unchanged."""
    from ctm_dist.storage import StorageError

    data = chaos_location.child("outage-read")
    _write(data, "train", _samples(30), per_shard=10)
    expected = _keys(list(_reader(data, 5)))
    assert len(expected) == 30
    patient, hasty = iter(_reader(data, deadline=60)), iter(_reader(data, deadline=3))
    got = [next(patient) for _ in range(2)]  # mid-epoch, in shard 0 of 3
    next(hasty)
    failure: dict = {}

    def drain_hasty():
        t0 = time.monotonic()
        try:
            for _ in hasty:
                pass
        except StorageError as e:
            failure.update(error=e, took=time.monotonic() - t0, at=time.monotonic())

    outage = H.Outage(chaos_store, OUTAGE_S, until="/outage-read/train-").start()
    try:
        H.wait_until(lambda: outage.stopped_at, 30, what="the store to stop")
        t_down = time.monotonic()
        thread = threading.Thread(target=drain_hasty, daemon=True)
        thread.start()
        times = []
        for batch in patient:  # blocks (retrying) while the store is down
            got.append(batch)
            times.append(time.monotonic())
    finally:
        outage.join()  # the store is back for the next scenarios whatever happened
    thread.join(30)

    rec = scenario("store outage 10s: shard reads")
    assert _keys(got) == expected, "a short outage must not skip or repeat samples"
    reads = outage.attempted("GET", containing="/outage-read/train-")
    assert reads, f"no shard read was attempted while the store was down: {outage.requests}"
    after = [t for t in times if t > outage.restart_at]
    assert after, "the reader should have needed the store again after it came back"
    rec.trial(
        True,
        recover_s=max(0.0, after[0] - outage.up_at),
        note=f"blocked {after[0] - t_down:.1f}s; {len(reads)} shard reads attempted while down",
    )

    rec = scenario("store outage > deadline: shard reads")
    assert "error" in failure, "the 3 s-deadline reader should have failed with a StorageError"
    assert re.search(r"endpoint unreachable", str(failure["error"])), failure["error"]
    assert chaos_store.secret_key not in str(failure["error"])
    assert failure["at"] < outage.restart_at, (
        f"the deadline should end the wait while the store is still down ({failure['took']:.1f}s)"
    )
    assert _keys(list(_reader(data, 10))) == expected  # nothing was damaged
    rec.trial(True, recover_s=failure["took"], note="clear error")
