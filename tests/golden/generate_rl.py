"""Write the RL golden fixtures: the reference agent's outputs on fixed inputs and hidden states.

    python tests/golden/generate_rl.py --reference /path/to/continuous-thought-machines

Builds the reference's PPO agent (``tasks/rl/train.py``'s ``Agent`` around its RL CTM or LSTM)
from an ``args`` Namespace as its script makes one, rounds every weight to bfloat16, sets some
decays outside the [0, 4] clamp, and records, for a random hidden state and a few environment
steps of two environments with an episode reset in between: one step of ``recurrent_model``
(features, next state, tracked pre/post-activations) and the agent's ``get_action_and_value`` over
the steps (log-probabilities, entropies, values, logits, last state). Writes
``tests/golden/rl/rl_<case>.safetensors``; the case's args go in the metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from reference_runs import bf16_weights, reference_parser, save_fixture

HERE = Path(__file__).resolve().parent / "rl"
STEPS, ENVS = 3, 2

_ARGS = dict(
    model_type="ctm",
    d_model=12,
    d_input=6,
    synapse_depth=1,
    n_synch_out=4,
    neuron_select_type="first-last",
    iterations=2,
    memory_length=5,
    deep_memory=True,
    memory_hidden_dims=3,
    dropout=0.0,
    do_normalisation=False,
    continuous_state_trace=True,
    env_id="CartPole-v1",
)

# name -> (args overrides, actions)
CASES = {
    "ctm_cartpole": (dict(), 2),
    "ctm_acrobot_unet_shallow": (
        dict(
            env_id="Acrobot-v1",
            synapse_depth=3,
            deep_memory=False,
            do_normalisation=True,
            iterations=3,
            continuous_state_trace=False,
        ),
        3,
    ),
    "ctm_minigrid": (dict(env_id="MiniGrid-FourRooms-v0", d_input=3, iterations=1), 7),
    "lstm_cartpole": (dict(model_type="lstm", d_model=10), 2),
    "lstm_minigrid": (dict(model_type="lstm", env_id="MiniGrid-FourRooms-v0", d_input=3), 7),
}


def case_args(name: str) -> dict:
    return {**_ARGS, **CASES[name][0]}


def observations(env_id: str, generator: torch.Generator) -> torch.Tensor:
    """``[STEPS, ENVS, ...]``: MiniGrid cell indices, or classic-control vectors."""
    if env_id.startswith("MiniGrid"):
        cells = [
            torch.randint(0, high, (STEPS, ENVS, 7, 7, 1), generator=generator)
            for high in (11, 6, 3)
        ]
        return torch.cat(cells, dim=-1).float()
    dims = {"CartPole-v1": 4, "Acrobot-v1": 6}[env_id]
    return torch.randn((STEPS, ENVS, dims), generator=generator)


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if "decay_params" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 6 - 1)
            elif name.endswith(".T"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(".bias") or "start_" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            tensor.copy_(tensor.to(torch.bfloat16).float())


def reference_agent_class(reference: Path):
    """``tasks/rl/train.py``'s ``Agent``, its plotting imports (seaborn, imageio) left out."""
    sys.path.insert(0, str(reference))
    for module, name in (
        ("tasks.rl.plotting", "make_rl_gif"),
        ("tasks.image_classification.plotting", "plot_neural_dynamics"),
    ):
        stub = types.ModuleType(module)
        setattr(stub, name, None)
        sys.modules[module] = stub
    from tasks.rl.train import Agent  # noqa: E402  (the user's reference checkout)

    return Agent


def generate(reference: Path, seed: int = 4321) -> None:
    Agent = reference_agent_class(reference)
    for index, name in enumerate(CASES):
        args = case_args(name)
        n_actions = CASES[name][1]
        generator = torch.Generator().manual_seed(seed + index)
        torch.manual_seed(seed + index)
        xs = observations(args["env_id"], generator)
        with contextlib.redirect_stdout(io.StringIO()):
            agent = Agent(n_actions, argparse.Namespace(**args), "cpu")
            with torch.no_grad():  # materialise lazy layers
                agent.get_value(xs[0], agent.get_initial_state(ENVS), torch.zeros(ENVS))
        randomise(agent, generator)
        agent.eval()
        weights = bf16_weights(agent)
        start = agent.get_initial_state(ENVS)
        hidden = tuple(s.detach() + 0.3 * torch.randn(s.shape, generator=generator) for s in start)
        dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        actions = torch.randint(0, n_actions, (STEPS * ENVS,), generator=generator)
        with torch.no_grad():
            sync, step_hidden, pre, post = agent.recurrent_model(xs[0], hidden, track=True)
            _, logprob, entropy, value, last, _, logits, _ = agent.get_action_and_value(
                xs.flatten(0, 1), hidden, dones.flatten(), actions
            )
        tensors = {
            **weights,
            "obs": xs,
            "hidden_0": hidden[0],
            "hidden_1": hidden[1],
            "dones": dones,
            "actions": actions,
            "step_features": sync,
            "step_hidden_0": step_hidden[0],
            "step_hidden_1": step_hidden[1],
            "step_pre_activations": torch.from_numpy(np.asarray(pre)),
            "step_post_activations": torch.from_numpy(np.asarray(post)),
            "logprob": logprob,
            "entropy": entropy,
            "value": value.squeeze(-1),
            "logits": logits,
            "last_hidden_0": last[0],
            "last_hidden_1": last[1],
        }
        metadata = {"args": json.dumps(args), "n_actions": str(n_actions)}
        save_fixture(tensors, metadata, HERE / f"rl_{name}.safetensors")


def main() -> None:
    parser = reference_parser(__doc__, seed=4321)
    args = parser.parse_args()
    generate(args.reference, args.seed)


if __name__ == "__main__":
    main()
