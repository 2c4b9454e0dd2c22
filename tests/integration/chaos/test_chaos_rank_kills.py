"""Kills at the checkpoint protocol's exact points, on the real training loop's ranks without Ray.

One run (2 ranks on a gloo group, ZeRO-2, dropout and random augmentation on, a checkpoint every 2
steps, ``checkpoint.keep=2``) is launched five times with the same name; each of the first four
launches is killed at one point of the protocol, the ranks frozen there first (SIGSTOP), so the
kill lands at that point on any machine:

1. during a 2-rank save of step 4: rank 0 has uploaded all its files, rank 1 one of them; SIGKILL
   of both;
2. during the COMMIT write of step 4 (rank 0 about to send it, rank 1 waiting for it); SIGKILL of both;
3. during pruning, after the commit of step 6: rank 0 made its first deletion of step 2; SIGKILL of
   both;
4. of a non-zero rank: rank 1 SIGKILLed before step 9 while rank 0 trains on; rank 0 must fail
   on its own, without committing anything;
5. the last launch runs to the end.

After each kill every committed step is whole (each file its COMMIT lists is there with its size and
SHA-256) and no partial step is committed; each relaunch resumes from the newest commit; the final
checkpoint equals the uninterrupted reference run's (run by Ray Train with the same config) bit for
bit: weights, optimizer state and every rank's RNG state, so resuming restores the dropout stream
and the data position exactly.
"""

from __future__ import annotations

import signal
import time

import chaos_harness as H
import chaos_runs as R
import pytest
from chaos_runs import STEPS

WORKERS = 2


def _check_commits(loc, expected: list[int], label: str) -> None:
    committed = H.committed_steps(loc)
    assert committed == expected, f"{label}: committed {committed}, expected {expected}"
    for step in committed:
        problems = H.commit_problems(loc, step)
        assert not problems, f"{label}: committed step {step} is not whole: {problems}"


@pytest.mark.timeout(900)  # the first test to use reference_run also pays for it
def test_kills_during_save_commit_prune_and_of_rank_1_resume_bitwise(
    reference_run, chaos_store, run_bucket, demo_data, run_location, tmp_path, scenario
):
    name = "rank-kills"
    loc = run_location(name)
    env = chaos_store.env()
    run = dict(
        name=name,
        storage=f"s3://{run_bucket}/runs",
        data=demo_data,
        local_dir=str(tmp_path),
        steps=STEPS,
        checkpoint__keep=2,
    )

    def launch(label: str, pauses: list[dict], resumed: int | None) -> R.Ranks:
        ranks = R.Ranks(
            {"run": run, "pauses": pauses, "job": name, "out": str(tmp_path)},
            WORKERS,
            env,
            tmp_path,
            label,
        )
        for rank in range(WORKERS):
            started = ranks.wait_event("started", rank=rank)
            assert started["resumed_from"] == resumed, f"{label}: {started}"
        return ranks

    def kill_all(ranks: R.Ranks, label: str) -> float:
        t = time.monotonic()
        ranks.kill_all()
        assert ranks.wait() == [-signal.SIGKILL] * WORKERS, ranks.stderr_tail()
        return t

    # 1. A 2-rank save of step 4, cut with rank 0's files all uploaded and one of rank 1's.
    rec = scenario("kill during a 2-rank save")
    ranks = launch(
        "save",
        [
            {"rank": 0, "at": "upload", "step": 4, "files": "all"},
            {"rank": 1, "at": "upload", "step": 4, "files": 1},
        ],
        None,
    )
    ranks.wait_paused(0, "upload")
    ranks.wait_paused(1, "upload")
    kill_all(ranks, "save")
    assert "step-000000004" in H.all_checkpoint_dirs(loc), "step 4's files should be in the store"
    _check_commits(loc, [2], "killed mid-save")
    rec.trial(True, steps_lost=4 - max(H.committed_steps(loc)), note="both ranks, mid-upload")

    # 2. The COMMIT of step 4: every file uploaded, rank 0 about to write the marker.
    rec = scenario("kill during the COMMIT write")
    ranks = launch("commit", [{"rank": 0, "at": "commit", "step": 4}], 2)
    ranks.wait_paused(0, "commit")
    files_before_commit = set(loc.child("checkpoints").child("step-000000004").list())
    kill_all(ranks, "commit")
    assert {"extra-rank-00000.pt", "extra-rank-00001.pt"} <= files_before_commit
    _check_commits(loc, [2], "killed writing COMMIT")
    rec.trial(True, steps_lost=4 - max(H.committed_steps(loc)), note="every file up, no COMMIT")

    # 3. Pruning after step 6 is committed (keep 2: step 2 goes), cut after its first deletion.
    rec = scenario("kill during pruning")
    ranks = launch("prune", [{"rank": 0, "at": "prune", "step": 6}], 2)
    paused = ranks.wait_paused(0, "prune")
    kill_all(ranks, "prune")
    assert paused["step"] == 6 and "step-000000002" in paused["removed"], paused
    _check_commits(loc, [4, 6], "killed while pruning")
    rec.trial(
        True, steps_lost=6 - max(H.committed_steps(loc)), note=f"after rm {paused['removed']}"
    )

    # 4. Rank 1 alone, frozen before step 9 (step 8 committed) while rank 0 goes on into step 9.
    rec = scenario("kill of rank 1 (rank 0 trains on)")
    ranks = launch("rank1", [{"rank": 1, "at": "step", "step": 9}], 6)
    ranks.wait_paused(1, "step")
    killed = time.monotonic()
    ranks.procs[1].kill()
    ranks.procs[0].wait(300)  # rank 0 must notice on its own; the guard only ends a hang
    codes = ranks.wait()
    assert codes[1] == -signal.SIGKILL and codes[0] not in (0, None), (codes, ranks.stderr_tail())
    rank0_fail_s = time.monotonic() - killed
    reached = max(e["step"] for e in ranks.of("keys") if e["rank"] == 0)
    _check_commits(loc, [6, 8], "rank 1 killed")
    newest_before = max(H.committed_steps(loc))
    rec.trial(
        True,
        steps_lost=reached - max(H.committed_steps(loc)),
        recover_s=rank0_fail_s,
        note=f"rank 0 exited {codes[0]} on its own",
    )

    # 5. The last launch resumes from step 8 and ends where the uninterrupted run ended, bit for bit.
    rec = scenario("resume after the kills: bitwise = uninterrupted")
    t0 = time.monotonic()
    ranks = launch("final", [], 8)
    first = ranks.wait_event("keys", rank=0)
    assert ranks.wait() == [0] * WORKERS, ranks.stderr_tail()
    assert H.committed_steps(loc) == [STEPS - 2, STEPS]
    assert "step-000000002" not in H.all_checkpoint_dirs(loc), "pruning debris was left behind"
    diffs = R.bitwise_differences(R.checkpoint_tensors(loc, STEPS), reference_run["final"])
    assert not diffs, f"{len(diffs)} tensors differ from the uninterrupted run, e.g. {diffs[:5]}"
    rec.trial(
        True,
        steps_lost=newest_before - first["step"] + 1,
        recover_s=first["t"] - t0,
        note="launch to first step, from step 8",
    )
