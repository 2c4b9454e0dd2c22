"""Train an RL agent with PPO (CartPole, Acrobot, MiniGrid four-rooms): `python launch/rl.py --help`."""

import sys

from ctm_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main("rl"))
