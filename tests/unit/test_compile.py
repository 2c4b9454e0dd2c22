"""How the CTM runs per device (model/execution.py): the compiled forward, channels-last backbones,
weights cast once under autocast, and the config switches that choose them.

Inductor's CPU backend compiles C++ kernels, about 100 s for even the smallest CTM on a busy
two-core machine with a cold cache (2026-12-01), so it runs one forward-only test; gradients and
graph structure are checked with ``aot_eager`` (the same Dynamo graph and AOTAutograd joint
graph, run by eager kernels) and a backend that only records the graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch.utils._python_dispatch import TorchDispatchMode

from ctm_dist.model import CTM, EXECUTION_FIELDS, CTMConfig, ctm, execution
from ctm_dist.model.execution import compiles, uses_channels_last, uses_cpu_kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def tiny(**overrides) -> CTMConfig:
    values = dict(
        iterations=4,
        d_model=16,
        d_input=8,
        heads=2,
        n_synch_out=4,
        n_synch_action=4,
        synapse_depth=2,
        memory_length=3,
        deep_nlms=True,
        memory_hidden_dims=2,
        backbone_type="none",
        positional_embedding_type="none",
        in_channels=5,
        out_dims=4,
        dropout=0.0,
    )
    values.update(overrides)
    return CTMConfig(**values)


def _model(**overrides) -> CTM:
    torch.manual_seed(0)
    np.random.seed(0)
    return CTM(tiny(**overrides))


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    predictions, certainties, sync = model(x)
    loss = predictions.square().mean() + certainties[:, 1].mean() + sync.sum()
    loss.backward()
    return predictions.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- switches ----------------------------------------------------------------------------------------


def test_auto_switches_follow_the_device():
    auto = tiny()
    assert compiles(auto, CUDA) and not compiles(auto, CPU)
    assert uses_cpu_kernels(auto, CPU) and not uses_cpu_kernels(auto, CUDA)
    assert not uses_cpu_kernels(
        tiny(compile=True), CPU
    )  # nothing Python-side in a compiled forward
    assert not compiles(tiny(tick_checkpointing=2), CUDA)  # recomputation stays eager
    assert not compiles(tiny(recompute_nlms=True), CUDA)
    assert compiles(tiny(compile=True), CPU) and not compiles(tiny(compile=False), CUDA)
    assert uses_cpu_kernels(tiny(cpu_kernels=True), CUDA)
    resnet = tiny(backbone_type="resnet18-1", in_channels=3)
    assert uses_channels_last(resnet, CUDA) and not uses_channels_last(resnet, CPU)
    assert uses_channels_last(resnet.replace(channels_last=True), CPU)
    assert not uses_channels_last(tiny(channels_last=True), CUDA)  # no convolutions to lay out
    assert {"compile", "cpu_kernels", "channels_last"} <= set(
        EXECUTION_FIELDS
    )  # resume and export ignore them


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(compile="sometimes"), "compile must be true, false or"),
        (dict(cpu_kernels=1), "cpu_kernels must be true, false or"),
        (dict(compile=True, cpu_kernels=True), "cannot run inside a compiled forward"),
        (dict(compile=True, tick_checkpointing=2), "run eager only"),
    ],
)
def test_bad_switch_values_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_switches_are_dotted_overrides_of_every_launcher():
    from ctm_dist.train.config import ConfigError, build_config

    cfg = build_config(
        overrides=["model.compile=true", "model.cpu_kernels=false", "model.channels_last=auto"]
    )
    assert cfg.model.overrides == {"compile": True, "cpu_kernels": False, "channels_last": "auto"}
    from ctm_dist.model import preset

    model_cfg = preset(cfg.model.preset, **cfg.model.overrides)
    assert (model_cfg.compile, model_cfg.cpu_kernels, model_cfg.channels_last) == (
        True,
        False,
        "auto",
    )
    assert tiny(compile="False").compile is False
    with pytest.raises(ConfigError, match="compile"):
        build_config(overrides=["model.compile=maybe"])


# --- the compiled forward --------------------------------------------------------------------------------


def test_compiled_forward_and_gradients_equal_eager():
    """Whole forward and backward through AOTAutograd, without a graph break (fullgraph)."""
    model = _model(compile=True).train()
    x = torch.randn(3, 5, 7)
    eager_predictions, eager_grads = _loss_and_grads(model, x)
    model.compile(
        backend="aot_eager", fullgraph=True, **execution.compile_options(model.cfg)
    )  # in place
    predictions, grads = _loss_and_grads(model, x)
    torch.testing.assert_close(predictions, eager_predictions, atol=1e-5, rtol=0)
    assert grads.keys() == eager_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_tick_is_compiled_once_and_reused_without_graph_breaks_or_recompiles():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    model = _model(compile=True, iterations=5).eval()
    x = torch.randn(3, 5, 7)
    # fullgraph: a graph break is an error (torch._dynamo.explain cannot run invoke_subgraph graphs in torch 2.13)
    compiled = torch.compile(
        model, backend=recording_backend, fullgraph=True, **execution.compile_options(model.cfg)
    )
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x)  # a second call reuses the graph (no guard on Python-side tick state)
    assert len(graphs) == 1
    calls = [
        n
        for n in graphs[0].graph.nodes
        if n.op == "call_function" and "invoke_subgraph" in str(n.target)
    ]
    # one body, reused by every tick after the first (which reads the broadcast start state, and is inlined)
    assert len(calls) >= model.cfg.iterations - 1 and len({n.args[1] for n in calls}) == 1


def test_inductor_forward_equals_eager():
    model = _model(compile=True, iterations=2, synapse_depth=1).eval()
    x = torch.randn(3, 5, 7)
    compiled = torch.compile(
        model, backend="inductor", fullgraph=True, **execution.compile_options(model.cfg)
    )
    with torch.no_grad():
        eager = model(x)
        out = compiled(x)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_trainer_compiles_the_engine_where_the_config_says(process_group, monkeypatch):
    from ctm_dist.train.config import build_config
    from ctm_dist.train.engine import build_engine
    from ctm_dist.train.loop import compile_engine

    monkeypatch.setattr(execution, "COMPILE_BACKEND", "aot_eager")
    cfg = build_config(
        overrides=[
            "scale.workers=1",
            "data.batch_size=3",
            "deepspeed.gradient_clipping=0",
            "deepspeed.precision=fp32",
            "deepspeed.zero_stage=1",
        ]
    )
    x = torch.randn(3, 5, 7)
    losses = {}
    for setting in (False, True):
        model = _model(compile=setting)
        engine = build_engine(model, cfg)
        assert compile_engine(engine, model.cfg, CPU) is setting and engine.is_compiled is setting
        # ZeRO keeps the parameters as views of one flat buffer, which a reused tick region refuses
        assert model.tick_region is not setting
        predictions, certainties, _ = engine(x)
        losses[setting] = predictions.square().mean() + certainties.mean()
        engine.backward(losses[setting])
        engine.step()
    torch.testing.assert_close(losses[True], losses[False], atol=1e-6, rtol=0)
    assert not compile_engine(engine, _model().cfg, CPU)  # "auto" stays eager on CPU


# --- channels-last backbone ------------------------------------------------------------------------------


def test_channels_last_backbone_gives_the_same_outputs_and_gradients():
    seen = []
    x = torch.randn(2, 3, 12, 12)
    results = {}
    for setting in (False, True):
        model = _model(backbone_type="resnet18-1", in_channels=3, channels_last=setting).train()
        hook = model.backbone.conv1.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        results[setting] = _loss_and_grads(model, x)
        hook.remove()
    assert seen == [False, True]
    (plain, plain_grads), (nhwc, nhwc_grads) = results[False], results[True]
    torch.testing.assert_close(nhwc, plain, atol=1e-5, rtol=0)
    for name in plain_grads:
        torch.testing.assert_close(
            nhwc_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name
        )


# --- casts under autocast ---------------------------------------------------------------------------------


class _WeightCasts(TorchDispatchMode):
    """Counts dtype casts of tensors shaped like the weights the ticks read."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.shapes:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _tick_weight_shapes(model) -> set:
    shapes = {tuple(t.shape) for w in model.trace_processor.neuron_major_weights() for t in w}
    shapes |= {tuple(t.shape) for t in model.attention.query_weight()}
    for module in (model.q_proj, model.attention.out_proj, model.synapses):
        shapes |= {tuple(p.shape) for p in module.parameters()}
    return shapes


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_tick_weights_are_cast_once_per_forward_under_autocast(cpu_kernels, monkeypatch):
    """The forward casts the per-forward weights once, not once per tick (with the cast-once step
    disabled the count grows with the ticks), and outputs and gradients are exactly autocast's own:
    backward still hands each tick's gradient back in fp32, so the sum over ticks stays fp32."""
    x = torch.randn(3, 5, 7)
    # DeepSpeed's ZeRO-3 Init replaces F.linear for the rest of the process (an autograd function
    # whose casts bypass autocast's cache); this test counts torch's own linear.
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)

    def run(iterations):
        model = _model(iterations=iterations, cpu_kernels=cpu_kernels).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with _WeightCasts(_tick_weight_shapes(model)) as casts:
                predictions, certainties, sync = model(x)
            (predictions.square().mean() + certainties[:, 1].mean() + sync.sum()).backward()
        return casts.count, predictions.detach(), {n: p.grad for n, p in model.named_parameters()}

    once_short, predictions, grads = run(3)
    once_long, _, _ = run(6)
    assert once_short == once_long
    monkeypatch.setattr(
        ctm, "autocast_dtype", lambda device: None
    )  # let autocast cast at every tick
    per_tick_short, per_tick_predictions, per_tick_grads = run(3)
    per_tick_long, _, _ = run(6)
    assert per_tick_long > per_tick_short > once_short
    torch.testing.assert_close(predictions, per_tick_predictions, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], per_tick_grads[name], atol=0, rtol=0, msg=name)
