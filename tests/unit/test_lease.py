"""``RunLease.is_free``: which leases a job may take over at once (what ``live_writer`` and
``acquire`` decide by)."""

from __future__ import annotations

import time

from ctm_dist.storage import Location
from ctm_dist.train.lease import RunLease


def test_a_lease_is_free_when_nobody_this_job_or_a_stale_holder_has_it(tmp_path):
    lease = RunLease(Location.parse(str(tmp_path)), owner="job-a", ttl=30)
    now = time.time()
    assert lease.is_free(None)
    assert lease.is_free({"owner": "job-a", "heartbeat": now})  # a restarted worker group
    assert not lease.is_free({"owner": "job-b", "heartbeat": now, "ttl": 30})
    assert lease.is_free({"owner": "job-b", "heartbeat": now - 31, "ttl": 30})
    # the holder's own ttl counts, not the newcomer's
    assert not lease.is_free({"owner": "job-b", "heartbeat": now - 31, "ttl": 60})
    assert not lease.is_free({"owner": "job-b", "heartbeat": "garbage"})
