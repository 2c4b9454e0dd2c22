"""A stand-in launcher with the launchers' preemption contract, for testing cluster scripts.

It attaches to the Ray cluster in RAY_ADDRESS, runs one Ray task per "step", and records
the step reached in ``{storage}/{name}/step``. SIGUSR1 or SIGTERM makes it record its step
and exit 75 (preempted); started again with the same --name it resumes from that step.
"""

import argparse
import os
import signal
import sys
import time

import ray

EX_TEMPFAIL = 75


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.2)
    args, _ = parser.parse_known_args()

    run_dir = os.path.join(args.storage.removeprefix("file://"), args.name)
    os.makedirs(run_dir, exist_ok=True)
    step_file = os.path.join(run_dir, "step")

    def save(step: int) -> None:
        with open(step_file + ".tmp", "w") as f:
            f.write(str(step))
        os.replace(step_file + ".tmp", step_file)

    stop = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    step = 0
    if os.path.exists(step_file):
        step = int(open(step_file).read())
        print(f"resumed from step {step}", flush=True)

    ray.init()
    print(f"ray nodes: {len(ray.nodes())}", flush=True)

    @ray.remote(num_cpus=1)
    def train_step(i: int) -> int:
        time.sleep(args.step_seconds)
        return i + 1

    while step < args.max_steps:
        if stop:
            save(step)
            print(f"preempted at step {step}", flush=True)
            return EX_TEMPFAIL
        step = ray.get(train_step.remote(step))
        save(step)
        print(f"step {step}", flush=True)
    print(f"finished at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
