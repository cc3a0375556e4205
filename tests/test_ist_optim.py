"""The IST layer-masked AdamW: parity with torch AdamW + grad=None, bitwise freezing of inactive
layers, one compilation for every mask, chaining with clipping, and input validation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pifi_jax.ist.optim import LayerMaskedAdamState, groups_from_paths, layer_masked_adam
from pifi_jax.train.optim import make_schedule
from pifi_jax.train.partition import flatten, unflatten

NUM_LAYERS = 2
TOTAL, WARMUP, PEAK = 12, 3, 0.05
B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 0.1
SHAPES = {
    "layer_0/kernel": (3, 4),
    "layer_0/bias": (4,),
    "layer_1/kernel": (3, 4),
    "layer_1/bias": (4,),
    "head/kernel": (4, 2),
    "head/bias": (2,),
}
NO_DECAY = ("layer_1/bias", "head/bias")


def _layer_of(path):
    match = re.match(r"layer_(\d+)/", path)
    return int(match.group(1)) if match else None


def _count(state, path: str) -> int:
    """A leaf's torch-style step count: its layer's entry, or the global count (group -1)."""
    layer = _layer_of(path)
    return int(state.count if layer is None else state.counts[layer])


def _params(rng):
    return unflatten(
        {path: jnp.asarray(rng.normal(size=shape), jnp.float32) for path, shape in SHAPES.items()}
    )


def _grads(rng, scale=1.0):
    return unflatten(
        {
            path: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
            for path, shape in SHAPES.items()
        }
    )


def _decay_mask():
    return unflatten({path: path not in NO_DECAY for path in SHAPES})


def _schedule():
    return make_schedule("linear", PEAK, total_steps=TOTAL, warmup_steps=WARMUP)


def _tx(weight_decay=WD, learning_rate=None):
    params = unflatten({path: 0 for path in SHAPES})
    return layer_masked_adam(
        _schedule() if learning_rate is None else learning_rate,
        b1=B1,
        b2=B2,
        eps=EPS,
        weight_decay=weight_decay,
        decay_mask=_decay_mask(),
        groups=groups_from_paths(params, _layer_of),
        num_groups=NUM_LAYERS,
    )


def _masks(rng, steps):
    """Random per-step layer masks in which every layer is both active and inactive sometimes."""
    while True:
        masks = rng.random((steps, NUM_LAYERS)) < 0.5
        if masks.any(axis=0).all() and (~masks).any(axis=0).all():
            return masks


def _jit_update(tx):
    return jax.jit(lambda g, s, p, a: tx.update(g, s, p, active=a))


def test_groups_from_paths():
    params = unflatten({path: jnp.zeros(shape) for path, shape in SHAPES.items()})
    assert groups_from_paths(params, _layer_of) == {
        "layer_0": {"kernel": 0, "bias": 0},
        "layer_1": {"kernel": 1, "bias": 1},
        "head": {"kernel": -1, "bias": -1},
    }


def test_parity_with_torch_adamw_and_grad_none():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = _params(rng)
    masks = _masks(rng, TOTAL)

    tensors = {
        path: torch.nn.Parameter(torch.tensor(np.asarray(p))) for path, p in flatten(params).items()
    }
    opt = torch.optim.AdamW(
        [
            {"params": [t for path, t in tensors.items() if path not in NO_DECAY]},
            {"params": [t for path, t in tensors.items() if path in NO_DECAY], "weight_decay": 0.0},
        ],
        lr=PEAK,
        betas=(B1, B2),
        eps=EPS,
        weight_decay=WD,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / WARMUP if s < WARMUP else max(0.0, (TOTAL - s) / (TOTAL - WARMUP))
    )

    tx = _tx()
    state = tx.init(params)

    @jax.jit
    def train_step(grads, state, params, active):
        updates, state = tx.update(grads, state, params, active=active)
        return optax.apply_updates(params, updates), state

    for step in range(TOTAL):
        grads = _grads(rng)
        active = masks[step]
        for path, g in flatten(grads).items():
            layer = _layer_of(path)
            live = layer is None or active[layer]
            tensors[path].grad = torch.tensor(np.asarray(g)) if live else None
        opt.step()
        sched.step()

        params, state = train_step(grads, state, params, jnp.asarray(active))

        for path, p in flatten(params).items():
            np.testing.assert_allclose(
                np.asarray(p),
                tensors[path].detach().numpy(),
                atol=1e-6,
                rtol=0,
                err_msg=f"{path} after step {step}",
            )
        for path, t in tensors.items():
            torch_step = int(opt.state[t]["step"]) if t in opt.state else 0
            assert _count(state, path) == torch_step, f"{path} after step {step}"
        assert int(state.count) == step + 1

    # The torch counts above are themselves the number of live steps of each layer.
    for layer in range(NUM_LAYERS):
        expected = int(masks[:, layer].sum())
        assert _count(state, f"layer_{layer}/kernel") == expected
    assert _count(state, "head/kernel") == TOTAL


@pytest.mark.parametrize("fill", ["random", "nan"])
def test_inactive_layers_are_frozen_bitwise(fill):
    rng = np.random.default_rng(1)
    params = _params(rng)
    tx = _tx()
    state = tx.init(params)
    update = _jit_update(tx)
    for _ in range(WARMUP + 1):  # past the zero-lr first step, so that updates are non-zero
        updates, state = update(_grads(rng), state, params, jnp.ones(NUM_LAYERS, bool))
        params = optax.apply_updates(params, updates)

    grads = _grads(rng)
    if fill == "nan":
        grads["layer_0"] = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads["layer_0"])
    before = state
    updates, state = update(grads, state, params, jnp.array([False, True]))

    for name in ("kernel", "bias"):
        assert np.array_equal(
            np.asarray(updates["layer_0"][name]), np.zeros(SHAPES[f"layer_0/{name}"])
        )
        for field in ("mu", "nu"):
            old = np.asarray(getattr(before, field)["layer_0"][name])
            new = np.asarray(getattr(state, field)["layer_0"][name])
            assert np.array_equal(old, new), f"{field} of layer_0/{name}"
        assert _count(state, f"layer_0/{name}") == _count(before, f"layer_0/{name}")
        for live in ("layer_1", "head"):
            assert np.all(np.asarray(updates[live][name]) != 0), f"{live}/{name}"
            assert not np.array_equal(
                np.asarray(before.mu[live][name]), np.asarray(state.mu[live][name])
            )
            assert _count(state, f"{live}/{name}") == _count(before, f"{live}/{name}") + 1
    assert int(state.count) == int(before.count) + 1

    # All layers off: only the head moves, and the global count still advances.
    before = state
    updates, state = update(_grads(rng), state, params, jnp.zeros(NUM_LAYERS, bool))
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates["layer_0"]))
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates["layer_1"]))
    assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates["head"]))
    assert int(state.count) == int(before.count) + 1
    assert _count(state, "layer_1/kernel") == _count(before, "layer_1/kernel")


@pytest.mark.parametrize("weight_decay", [0.0, WD])
def test_all_active_matches_optax_adamw(weight_decay):
    rng = np.random.default_rng(2)
    params = _params(rng)
    ours = _tx(weight_decay=weight_decay)
    if weight_decay:
        ref = optax.adamw(_schedule(), B1, B2, EPS, weight_decay=weight_decay, mask=_decay_mask())
    else:
        ref = optax.adam(_schedule(), B1, B2, EPS)
    state, ref_state = ours.init(params), ref.init(params)
    ours_update, ref_update = _jit_update(ours), jax.jit(ref.update)
    for _ in range(6):
        grads = _grads(rng)
        updates, state = ours_update(grads, state, params, jnp.ones(NUM_LAYERS, bool))
        ref_updates, ref_state = ref_update(grads, ref_state, params)
        for path, u in flatten(updates).items():
            np.testing.assert_allclose(u, flatten(ref_updates)[path], atol=1e-6, rtol=0)
        params = optax.apply_updates(params, updates)


def test_state_is_a_plain_pytree_of_arrays():
    params = _params(np.random.default_rng(3))
    state = _tx().init(params)
    assert isinstance(state, LayerMaskedAdamState)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    assert state.counts.dtype == jnp.int32 and state.counts.shape == (NUM_LAYERS,)
    assert jax.tree.structure(state.mu) == jax.tree.structure(params)
    # optax.tree_map_params finds the parameter-shaped parts (mu, nu) and nothing else, as the
    # trainer's sharding of optimizer states needs.
    kinds = optax.tree_map_params(
        _tx(), lambda p, s: "param", state, params, transform_non_params=lambda _: "other"
    )
    assert set(jax.tree.leaves(kinds.mu)) == set(jax.tree.leaves(kinds.nu)) == {"param"}
    assert kinds.count == kinds.counts == "other"


def test_one_compilation_serves_every_mask():
    rng = np.random.default_rng(4)
    params = _params(rng)
    tx = _tx(learning_rate=1e-2)
    state = tx.init(params)
    traces = []

    def step(grads, state, params, active):
        traces.append(None)
        return tx.update(grads, state, params, active=active)

    jitted = jax.jit(step)
    masks = [[True, False], [False, True], [False, False], [True, True], [True, False]]
    for mask in masks:
        updates, state = jitted(_grads(rng), state, params, jnp.array(mask))
        for layer, on in enumerate(mask):
            moved = any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates[f"layer_{layer}"]))
            assert moved == on
    assert len(traces) == 1
    if hasattr(jitted, "_cache_size"):
        assert jitted._cache_size() == 1
    assert _count(state, "layer_0/kernel") == 3
    assert _count(state, "layer_1/kernel") == 2

    # A 0/1 integer mask means the same as a bool one.
    grads = _grads(rng)
    as_bool, _ = jitted(grads, state, params, jnp.array([True, False]))
    as_int, _ = jitted(grads, state, params, jnp.array([1, 0], jnp.int32))
    for a, b in zip(jax.tree.leaves(as_bool), jax.tree.leaves(as_int), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_chain_with_clip_by_global_norm_forwards_active():
    rng = np.random.default_rng(5)
    params = _params(rng)
    max_norm = 0.5
    chained = optax.chain(optax.clip_by_global_norm(max_norm), _tx())
    alone = _tx()
    state, alone_state = chained.init(params), alone.init(params)
    update, alone_update = _jit_update(chained), _jit_update(alone)
    for mask in ([True, False], [False, True], [True, True], [False, False], [True, False]):
        grads = _grads(rng, scale=3.0)
        norm = np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads)))
        assert norm > max_norm
        clipped = jax.tree.map(lambda g, n=norm: jnp.asarray(np.asarray(g) * (max_norm / n)), grads)
        active = jnp.array(mask)
        updates, state = update(grads, state, params, active)
        expected, alone_state = alone_update(clipped, alone_state, params, active)
        for path, u in flatten(updates).items():
            np.testing.assert_allclose(u, flatten(expected)[path], atol=1e-6, rtol=1e-6)
        params = optax.apply_updates(params, updates)
    ours = state[1]
    assert int(ours.count) == 5
    assert _count(ours, "layer_0/bias") == 3
    assert _count(ours, "layer_1/bias") == 2
    # Extra arguments meant for other chain members are ignored (tracing is enough to show it).
    jax.eval_shape(
        lambda g, s, p: chained.update(g, s, p, active=jnp.ones(NUM_LAYERS, bool), value=1.0),
        _grads(rng),
        state,
        params,
    )


def test_invalid_groups_name_the_leaf():
    groups = {"layer_0": {"kernel": 0}, "layer_1": {"kernel": 2}}
    with pytest.raises(ValueError, match=r"'layer_1/kernel' has layer index 2.*num_groups=2"):
        layer_masked_adam(1e-3, groups=groups, num_groups=2)
    groups = {"layer_0": {"kernel": -2}, "head": -1}
    with pytest.raises(ValueError, match=r"'layer_0/kernel' has layer index -2"):
        layer_masked_adam(1e-3, groups=groups, num_groups=2)
    with pytest.raises(TypeError, match=r"'layer_0/kernel' is 0.5"):
        layer_masked_adam(1e-3, groups={"layer_0": {"kernel": 0.5}}, num_groups=2)
    with pytest.raises(ValueError, match="num_groups must be at least 1"):
        layer_masked_adam(1e-3, groups={"head": -1}, num_groups=0)


def test_decay_mask_and_params_must_match_the_groups():
    groups = {"layer_0": {"kernel": 0, "bias": 0}, "head": {"kernel": -1}}
    mask = {"layer_0": {"kernel": True}, "head": {"kernel": True}}
    with pytest.raises(ValueError, match=r"decay_mask .*missing leaves \['layer_0/bias'\]"):
        layer_masked_adam(1e-3, weight_decay=0.1, decay_mask=mask, groups=groups, num_groups=1)

    tx = layer_masked_adam(1e-3, groups=groups, num_groups=1)
    params = {"layer_0": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2), "w": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"params .*missing leaves \['layer_0/bias'\].*head/w"):
        tx.init(params)


def test_active_of_the_wrong_shape_fails_at_trace_time():
    rng = np.random.default_rng(6)
    params = _params(rng)
    tx = _tx()
    state = tx.init(params)
    update = _jit_update(tx)
    with pytest.raises(ValueError, match=r"shape \(2,\).*got shape \(3,\)"):
        update(_grads(rng), state, params, jnp.ones(3, bool))
    with pytest.raises(ValueError, match=r"shape \(2,\).*got shape \(\)"):
        update(_grads(rng), state, params, jnp.array(True))
    with pytest.raises(TypeError, match="active="):
        tx.update(_grads(rng), state, params)
