"""CTMConfig, presets and CTM behaviour: shapes, tick checkpointing, torch.compile, bf16."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ctm_dist.model import CTM, PRESET_NAMES, CTMConfig, preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> CTMConfig:
    values = dict(
        iterations=6,
        d_model=32,
        d_input=16,
        heads=2,
        n_synch_out=8,
        n_synch_action=6,
        synapse_depth=2,
        memory_length=4,
        deep_nlms=True,
        memory_hidden_dims=3,
        backbone_type="none",
        positional_embedding_type="none",
        in_channels=5,
        out_dims=4,
        dropout=0.3,
    )
    values.update(overrides)
    return CTMConfig(**values)


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(heads=3), "divisible by heads"),
        (dict(neuron_select_type="pairs"), "neuron_select_type"),
        (dict(backbone_type="resnet19-2"), "backbone_type"),
        (dict(positional_embedding_type="learnable-fourier"), "needs a backbone"),
        (dict(neuron_select_type="first-last", n_synch_out=30), "first-last"),
        (dict(n_random_pairing_self=6), "n_random_pairing_self"),
        (dict(iterations=0), "iterations"),
        (dict(dropout=1.5), "dropout"),
        (dict(tick_checkpointing=-1), "tick_checkpointing"),
        (dict(recompute_nlms=1), "recompute_nlms"),
        (dict(recompute_nlms=True, tick_checkpointing=2), "choose one"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(prediction_reshaper=[3, 2]), "prediction_reshaper"),
    ],
)
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_config_round_trips_and_rejects_unknown_fields():
    cfg = tiny(prediction_reshaper=[2, 2], tick_checkpointing=3)
    assert CTMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        CTMConfig.from_dict({**cfg.to_dict(), "d_modle": 3})


def test_presets_follow_reference_scripts():
    imagenet = preset("imagenet")
    assert (imagenet.d_model, imagenet.iterations, imagenet.memory_length) == (4096, 75, 25)
    assert (imagenet.n_synch_out, imagenet.n_synch_action, imagenet.n_random_pairing_self) == (
        8192,
        2048,
        32,
    )
    assert imagenet.backbone_type == "resnet152-4" and imagenet.synapse_depth == 8
    mazes = preset("mazes", route_length=50)
    assert (mazes.d_model, mazes.out_dims, mazes.prediction_reshaper) == (2048, 250, [50, 5])
    assert mazes.neuron_select_type == "first-last" and mazes.backbone_type == "resnet34-2"
    parity = preset("parity")
    assert (parity.d_model, parity.out_dims, parity.prediction_reshaper) == (1024, 128, [64, 2])
    assert parity.neuron_select_type == "random" and parity.backbone_type == "parity_backbone"
    cifar = preset("cifar10")
    assert (cifar.d_model, cifar.iterations, cifar.memory_length, cifar.synapse_depth) == (
        256,
        50,
        15,
        5,
    )
    assert preset("demo", iterations=3).iterations == 3
    assert set(PRESET_NAMES) == {
        "imagenet",
        "mazes",
        "mazes-small",
        "parity",
        "parity-small",
        "cifar10",
        "demo",
        "sort",
        "sort-small",
    }
    with pytest.raises(ValueError, match="unknown preset"):
        preset("mnist")
    with pytest.raises(ValueError, match="unknown CTMConfig fields"):
        preset("demo", width=3)


# --- structure ------------------------------------------------------------------------------------


def test_demo_forward_shapes_and_synch_sizes():
    cfg = preset("demo", iterations=3)
    model = CTM(cfg).eval()
    with torch.no_grad():
        model.output_projector[0].weight.mul_(300)  # confident, tick-dependent predictions
        predictions, certainties, sync = model(torch.randn(2, 3, 32, 32))
    assert predictions.shape == (2, 10, 3) and certainties.shape == (2, 2, 3)
    assert sync.shape == (2, cfg.n_synch_out)  # random-pairing: one value per pair
    # each tick's certainty is 1 - the normalised entropy of that tick's own prediction
    probabilities = predictions.softmax(1)
    entropy = -(probabilities * probabilities.log()).sum(1) / math.log(10)
    torch.testing.assert_close(certainties[:, 0], entropy)
    torch.testing.assert_close(certainties[:, 1], 1 - entropy)


@pytest.mark.parametrize(
    "select, out_size", [("first-last", 36), ("random", 36), ("random-pairing", 8)]
)
def test_synchronisation_sizes(select, out_size):
    model = CTM(tiny(neuron_select_type=select, n_synch_out=8, n_synch_action=6))
    assert model.decay_params_out.shape == (out_size,)
    assert model.q_proj.in_features == (6 if select == "random-pairing" else 21)


def test_random_selection_draws_with_replacement_from_numpy():
    np.random.seed(3)
    model = CTM(tiny(neuron_select_type="random", d_model=32, n_synch_out=40, n_synch_action=40))
    left = model.out_neuron_indices_left
    assert left.dtype == torch.int64 and left.numel() == 40 and left.unique().numel() < 40
    np.random.seed(3)
    action_first = np.random.choice(32, size=40)
    assert torch.equal(model.action_neuron_indices_left, torch.from_numpy(action_first))


def test_random_pairing_self_pairs():
    model = CTM(tiny(neuron_select_type="random-pairing", n_synch_out=8, n_random_pairing_self=3))
    assert torch.equal(model.out_neuron_indices_left[:3], model.out_neuron_indices_right[:3])


def test_decays_are_clamped_with_the_gradient_passed_through():
    x = torch.randn(2, 5, 3)
    outside, inside = CTM(tiny()).eval(), CTM(tiny()).eval()
    inside.load_state_dict(outside.state_dict())
    with torch.no_grad():
        outside.decay_params_out.fill_(20.0)
        outside.decay_params_action.fill_(-3.0)
        inside.decay_params_out.fill_(15.0)
        inside.decay_params_action.fill_(0.0)
    p_outside, c_outside, _ = outside(x)
    p_inside, c_inside, _ = inside(x)
    assert torch.equal(p_outside, p_inside) and torch.equal(c_outside, c_inside)
    assert (outside.decay_params_out == 20).all(), "the stored parameters must not be mutated"
    p_outside.sum().backward()
    assert (
        outside.decay_params_out.grad is not None and outside.decay_params_out.grad.abs().sum() > 0
    )


def test_tracking_shapes_and_each_ticks_attention():
    model = CTM(tiny()).eval()
    x = torch.randn(2, 5, 7)
    with torch.no_grad():
        predictions, _, _, tracking = model(x, track=True)
    assert tracking.attention.shape == (6, 2, 2, 1, 7)
    assert tracking.pre_activations.shape == tracking.post_activations.shape == (6, 2, 32)
    assert tracking.sync_out.shape == (6, 2, 8) and tracking.sync_action.shape == (6, 2, 6)
    # the weights torch's own attention gives the query of that tick's action synchronisation
    reference = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    reference.load_state_dict(model.attention.state_dict())
    with torch.no_grad():
        tokens = model.compute_features(x)
        for tick in range(6):
            query = model.q_proj(tracking.sync_action[tick]).unsqueeze(1)
            _, weights = reference(
                query, tokens, tokens, need_weights=True, average_attn_weights=False
            )
            torch.testing.assert_close(tracking.attention[tick], weights, msg=f"tick {tick}")


# --- tick checkpointing ---------------------------------------------------------------------------------


def _loss_and_grads(model, x, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    predictions, certainties, sync = model(x)
    loss = predictions.square().mean() + certainties[:, 1].mean() + sync.sum()
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("segment", [1, 4])  # 4 does not divide T=6
def test_tick_checkpointing_gives_the_same_gradients_with_dropout(segment):
    torch.manual_seed(0)
    model = CTM(tiny(dropout=0.3, dropout_nlm=0.2, neuron_select_type="random")).train()
    x = torch.randn(3, 5, 7)
    loss_plain, plain = _loss_and_grads(model, x, seed=11)
    model.cfg.tick_checkpointing = segment
    loss_ckpt, ckpt = _loss_and_grads(model, x, seed=11)
    assert loss_plain == loss_ckpt
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=0, msg=name)
    _, other_dropout = _loss_and_grads(model, x, seed=12)  # the test would notice different masks
    assert any(not torch.allclose(other_dropout[n], plain[n]) for n in plain)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_tick_checkpointing_replays_matmuls_and_attention_instead_of_recomputing(dropout):
    from ctm_dist.model.tick_checkpoint import collecting_tapes

    model = CTM(tiny(dropout=dropout, tick_checkpointing=2, synapse_depth=1)).train()
    x = torch.randn(3, 5, 7)
    with collecting_tapes() as tapes:
        _loss_and_grads(model, x, seed=3)
    assert len(tapes) == 3  # T=6 in segments of 2
    # per tick: q_proj, the attention's query projection, its out_proj, the synapse and (without attention
    # dropout) the fused attention itself; the output projector runs once, after the ticks
    per_tick = 4 + (1 if dropout == 0 else 0)
    for tape in tapes:
        assert (
            len(tape.outputs) == 2 * per_tick
            and tape.replaying
            and tape.position == len(tape.outputs)
        )


def _saved_bytes(**overrides) -> int:
    """Bytes of the distinct storages autograd keeps for backward (d_model 64, M 8, hidden 8, T 12)."""
    model = CTM(
        tiny(iterations=12, d_model=64, memory_length=8, memory_hidden_dims=8, **overrides)
    ).train()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        predictions, _, _ = model(torch.randn(4, 5, 7))
    predictions.sum().backward()
    return sum(storages.values())


def test_tick_checkpointing_keeps_less_for_backward():
    plain = _saved_bytes()
    assert _saved_bytes(tick_checkpointing=4) < 0.25 * plain
    assert (
        _saved_bytes(recompute_nlms=True) < 0.6 * plain
    )  # the NLM histories and hidden activations go


@pytest.mark.parametrize(
    "overrides, by_hand",
    [
        (dict(dropout=0.0), True),
        (dict(dropout=0.0, deep_nlms=False, synapse_depth=1), True),
        (dict(dropout=0.3, dropout_nlm=0.2, neuron_select_type="random"), True),
        (dict(dropout=0.3, dropout_nlm=0.2, do_layernorm_nlm=True), False),
        (dict(dropout=0.0, do_layernorm_nlm=True), False),
    ],
)
def test_recomputed_nlms_give_the_same_gradients(overrides, by_hand, monkeypatch):
    """Written-out backward (without NLM layernorms) and autograd run again (with them)."""
    from ctm_dist.model import nlm

    calls = []
    written_out = nlm._nlm_backward
    monkeypatch.setattr(nlm, "_nlm_backward", lambda *a: (calls.append(1), written_out(*a))[1])
    torch.manual_seed(0)
    model = CTM(tiny(**overrides)).train()
    x = torch.randn(3, 5, 7)
    loss_plain, plain = _loss_and_grads(model, x, seed=11)
    model.cfg.recompute_nlms = True
    loss_recomputed, recomputed = _loss_and_grads(model, x, seed=11)
    assert len(calls) == (model.cfg.iterations if by_hand else 0)
    assert loss_recomputed == loss_plain
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0, msg=name)
    if model.cfg.nlm_dropout:
        _, other_dropout = _loss_and_grads(
            model, x, seed=12
        )  # the test would notice different masks
        assert any(not torch.allclose(other_dropout[n], plain[n]) for n in plain)


# --- compile and mixed precision -----------------------------------------------------------------------


def test_tick_and_read_out_compile_without_graph_breaks():
    model = CTM(tiny()).eval()
    with torch.no_grad():
        state, ctx = model.start(torch.randn(2, 5, 7))
        eager_state, eager_out = model.tick(state, ctx)
        new_state, out = torch.compile(model.tick, backend="eager", fullgraph=True)(state, ctx)
        activations = torch.stack((out.post_activation, out.post_activation))
        eager_readout = model.read_out(activations, ctx)
        readout = torch.compile(model.read_out, backend="eager", fullgraph=True)(activations, ctx)
    torch.testing.assert_close(out.post_activation, eager_out.post_activation)
    torch.testing.assert_close(new_state.trace, eager_state.trace)
    torch.testing.assert_close(readout.predictions, eager_readout.predictions)
    torch.testing.assert_close(readout.certainties, eager_readout.certainties)


def test_recomputed_nlms_under_bf16_autocast_give_the_plain_gradients():
    torch.manual_seed(0)
    model = CTM(tiny(dropout=0.0)).train()
    x = torch.randn(3, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_plain, plain = _loss_and_grads(model, x, seed=1)
        model.cfg.recompute_nlms = True
        loss_recomputed, recomputed = _loss_and_grads(model, x, seed=1)
    assert loss_recomputed == loss_plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0, msg=name)


def test_bf16_parameters_as_training_casts_them_follow_fp32():
    """Training runs the model in bf16 parameters and inputs (``engine.build_engine``): outputs
    and gradients stay within bf16's rounding of the fp32 model's (measured 2026-12-01: outputs
    0.5 %, gradients 0.4 % of their scale)."""
    torch.manual_seed(0)
    model = CTM(tiny(backbone_type="resnet18-1", in_channels=3, dropout=0.0)).train()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(4, 3, 12, 12)
    predictions, certainties, _ = model(x)
    bf16_predictions, bf16_certainties, _ = bf16(x.to(torch.bfloat16))
    assert bf16_predictions.dtype == torch.float32
    scale = predictions.abs().max().item()
    torch.testing.assert_close(bf16_predictions, predictions, atol=0.03 * scale, rtol=0)
    torch.testing.assert_close(bf16_certainties, certainties, atol=0.01, rtol=0)
    predictions.square().mean().backward()
    bf16_predictions.square().mean().backward()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    assert names == [n for n, p in bf16.named_parameters() if p.grad is not None]
    grads = dict(model.named_parameters())
    bf16_grads = dict(bf16.named_parameters())
    error = torch.cat([(bf16_grads[n].grad.float() - grads[n].grad).flatten() for n in names])
    reference = torch.cat([grads[n].grad.flatten() for n in names])
    assert error.norm() < 0.03 * reference.norm(), (error.norm(), reference.norm())


@pytest.mark.parametrize(
    "dropout, segment, max_bytes", [(0.0, 0, None), (0.2, 0, None), (0.0, 4, None), (0.0, 0, 1024)]
)
def test_tick_summed_gradients_equal_per_tick_autograd(dropout, segment, max_bytes, monkeypatch):
    """Banked weight and key/value gradients (tick_grads.py) against plain autograd: without and
    with dropout (keys/values then take the plain path), with tick checkpointing, with partial sums."""
    from ctm_dist.model.tick_grads import Bank, new_banks

    if max_bytes:
        monkeypatch.setattr(Bank, "max_bytes", max_bytes)
    adds = []
    add = Bank.add
    monkeypatch.setattr(Bank, "add", lambda self, lhs, rhs: (adds.append(1), add(self, lhs, rhs)))
    torch.manual_seed(0)
    model = CTM(tiny(dropout=dropout, synapse_depth=3, tick_checkpointing=segment)).train()
    x = torch.randn(3, 5, 7)
    model.cfg.cpu_kernels = False
    loss_plain, plain = _loss_and_grads(model, x, seed=4)
    assert not adds
    model.cfg.cpu_kernels = True
    loss_batched, batched = _loss_and_grads(model, x, seed=4)
    # the same forward up to rounding: banked layers multiply by a reordered weight copy on CPU
    torch.testing.assert_close(loss_batched, loss_plain, rtol=1e-6, atol=0)
    assert plain.keys() == batched.keys()
    for name in plain:
        torch.testing.assert_close(batched[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    per_tick = len(new_banks(model)) + (2 if dropout == 0 else 0)
    assert (
        len(adds) == per_tick * model.cfg.iterations
    )  # every banked path was taken, once per tick
    assert (
        model.q_proj._bank is None and model.attention._bank is None
    )  # switched off after forward


def test_banked_linear_with_a_reordered_weight_equals_plain_linear():
    """The oneDNN-reordered weight copies (tick_grads.py) give F.linear's products, forward and backward,
    are made once per bank, and are not used where they do not apply (few rows, autocast)."""
    from ctm_dist.model import tick_grads
    from ctm_dist.model.tick_grads import Bank

    if not tick_grads._ONEDNN:
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40), torch.randn(48)
    x, grad_out = (
        torch.randn(tick_grads.REORDER_MIN_ROWS, 40),
        torch.randn(tick_grads.REORDER_MIN_ROWS, 48),
    )
    bank = Bank(weight)
    few_rows = bank.linear(x[:2], weight, bias)
    assert not bank._reordered and torch.equal(
        few_rows, torch.nn.functional.linear(x[:2], weight, bias)
    )
    copies = []
    for _ in range(3):
        torch.testing.assert_close(
            bank.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias)
        )
        torch.testing.assert_close(
            bank.linear(grad_out, weight, None, transposed=True), grad_out @ weight
        )
        copies.append(dict(bank._reordered))
    assert set(copies[0]) == {False, True}  # a reordered weight and a reordered transpose
    assert all(c[k] is copies[0][k] for c in copies for k in c)  # made once, then reused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bank.linear(x, weight, bias).dtype == torch.bfloat16  # autocast's own path


def test_banked_forward_without_reordering_is_bit_identical(monkeypatch):
    from ctm_dist.model import tick_grads

    monkeypatch.setattr(tick_grads, "_ONEDNN", False)
    torch.manual_seed(0)
    model = CTM(tiny(synapse_depth=3)).train()
    x = torch.randn(3, 5, 7)
    model.cfg.cpu_kernels = False
    loss_plain, _ = _loss_and_grads(model, x, seed=4)
    model.cfg.cpu_kernels = True
    loss_batched, _ = _loss_and_grads(model, x, seed=4)
    assert loss_batched == loss_plain
