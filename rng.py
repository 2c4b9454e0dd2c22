# SCRATCH ONLY
import random, numpy as np, torch
def capture(): return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
def restore(s): torch.set_rng_state(s["torch"]); np.random.set_state(s["numpy"]); random.setstate(s["python"])
