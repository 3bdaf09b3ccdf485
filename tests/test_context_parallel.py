"""Context parallelism computes the same attention, gradients and DiT output as one device.

Simulated CPU devices must be configured before JAX's backend starts, and the rest of the suite has
already started it on one device, so the multi-device checks run once in a subprocess (this file
run as a module) that prints its measurements as one JSON line; the tests below judge them.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from tests.conftest import run_module_result

NUM_DEVICES = 8
# float32 on CPU: the same sums split over devices or blocks move results by a few ulps.
TOL = 1e-5
ATTENTION_MESHES = {
    "context=8": dict(context=8),
    "data=2,context=4": dict(data=2, context=4),
    "data=2,context=2,tensor=2": dict(data=2, context=2, tensor=2),
}
DIT_MESH = dict(data=2, context=2, tensor=2)
B, L, H, K = 2, 256, 8, 16
# Segment lengths per pack, the rest padding (id 0); boundaries fall inside device shards.
SEGMENTS = ((37, 90, 61, 20), (128, 5, 77, 30))


def packed_segment_ids(lengths: tuple[tuple[int, ...], ...], seq_len: int) -> np.ndarray:
    seg = np.zeros((len(lengths), seq_len), np.int32)
    for b, row in enumerate(lengths):
        start = 0
        for i, n in enumerate(row):
            seg[b, start : start + n] = i + 1
            start += n
    return seg


def qkv(heads: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, L, heads, K)).astype(np.float32) for _ in range(4))


# ------------------------------------------------------------------------------ pytest (1 device)


def test_without_a_mesh_both_backends_are_the_reference():
    """Outside activation_sharding there is nothing to split: the dense path, exactly."""
    import jax.numpy as jnp

    from jaxsora.models.attention import xla_attention
    from jaxsora.models.context_parallel import context_parallel_attention, ring_attention

    q, k, v, _ = qkv(H)
    seg = jnp.asarray(packed_segment_ids(SEGMENTS, L))
    ref = np.asarray(xla_attention(q, k, v, seg, seg))
    for fn in (context_parallel_attention, ring_attention):
        np.testing.assert_array_equal(np.asarray(fn(q, k, v, seg, seg)), ref)


@pytest.fixture(scope="module")
def measured() -> dict:
    return run_module_result("tests.test_context_parallel")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["all_to_all", "ring"])
@pytest.mark.parametrize("mesh", list(ATTENTION_MESHES))
def test_context_attention_equals_reference(measured, mesh, impl):
    r = measured["attention"][mesh][impl]
    assert r["collective"], f"{impl} on {mesh}: compiled HLO has no {impl} collective"
    assert r["out_spec"] == r["in_spec"], f"{impl} on {mesh}: output left {r['out_spec']}"
    assert r["forward"] < TOL, f"{impl} on {mesh}: forward differs by {r['forward']}"
    for name in ("dq", "dk", "dv"):
        assert r[name] < TOL * max(1.0, r["grad_scale"]), (
            f"{impl} on {mesh}: {name} differs by {r[name]} (|grad| up to {r['grad_scale']})"
        )


@pytest.mark.slow
def test_dit_with_context_backend_equals_one_device(measured):
    r = measured["dit"]
    assert r["same_params"], "models built with the same seed must have the same weights"
    assert r["collective"], "the context DiT compiled without an all-to-all"
    assert r["scale"] > 0.1, "outputs must be non-trivial for the comparison to mean anything"
    assert r["diff"] < TOL * r["scale"], f"DiT output differs by {r['diff']} on {DIT_MESH}"


@pytest.mark.slow
def test_dit_with_ring_backend_equals_one_device_forward_and_gradients(measured):
    """model.attention="ring" on a (data=2, context=2, tensor=2) mesh against "xla" on one
    device, same perturbed weights: the output, and every weight's gradient (each to TOL of
    that weight's largest gradient)."""
    r, scale = measured["dit"]["ring"], measured["dit"]["scale"]
    assert r["collective"], "the ring DiT compiled without a collective-permute"
    assert r["diff"] < TOL * scale, f"ring DiT output differs by {r['diff']} on {DIT_MESH}"
    assert len(r["grads"]) > 50 and max(g for _, g in r["grads"].values()) > 0.1, r["grads"]
    for name, (diff, ref) in r["grads"].items():
        assert diff <= TOL * max(ref, 1.0), f"{name}: gradient off by {diff} (|g| up to {ref})"


@pytest.mark.slow
def test_heads_not_divisible_by_context_is_a_clear_error(measured):
    six_heads, four_heads_two_tensor = measured["errors"]
    assert "model.num_heads=6 " in six_heads and "mesh.context=4" in six_heads, six_heads
    assert "(2 per tensor shard)" in four_heads_two_tensor, four_heads_two_tensor
    assert "multiple of 8" in four_heads_two_tensor, four_heads_two_tensor


@pytest.mark.slow
def test_ring_takes_any_head_count(measured):
    r = measured["ring_odd_heads"]
    worst = max(r["forward"], r["dq"], r["dk"], r["dv"])
    assert worst < TOL * max(1.0, r["grad_scale"]), f"6 heads on context=4: {r}"


# -------------------------------------------------------------- subprocess (8 simulated devices)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@functools.cache
def _reference(heads: int) -> tuple:
    """Dense one-device forward and gradients (for a random cotangent), computed once."""
    import jax

    from jaxsora.models.attention import xla_attention

    q, k, v, ct = qkv(heads, seed=heads)
    seg = packed_segment_ids(SEGMENTS, L)
    out, vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, seg, seg), q, k, v)
    return (q, k, v, ct, seg), out, vjp(ct)


def _check_attention(mesh, fn, heads: int) -> dict:
    """Forward and gradients under jit on the mesh against the dense one-device reference."""
    import jax
    from jax.sharding import NamedSharding

    from jaxsora.sharding import DEFAULT_RULES, activation_sharding, logical_to_mesh

    (q, k, v, ct, seg), ref_out, ref_grads = _reference(heads)
    in_spec = logical_to_mesh(("batch", "length", "heads", "kv"), DEFAULT_RULES)
    seg_spec = logical_to_mesh(("batch", "length"), DEFAULT_RULES)
    args = [jax.device_put(x, NamedSharding(mesh, in_spec)) for x in (q, k, v, ct)]
    args.append(jax.device_put(seg, NamedSharding(mesh, seg_spec)))

    def fwd_and_grads(q, k, v, ct, seg):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, seg), q, k, v)
        return out, vjp(ct)

    with activation_sharding(mesh, DEFAULT_RULES):
        compiled = jax.jit(fwd_and_grads).lower(*args).compile()
    out, grads = compiled(*args)
    collective = (
        "all-to-all" if fn.__name__ == "context_parallel_attention" else "collective-permute"
    )
    return {
        "forward": _max_diff(out, ref_out),
        **{
            n: _max_diff(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)
        },
        "grad_scale": max(float(np.abs(np.asarray(r)).max()) for r in ref_grads),
        "collective": collective in compiled.as_text(),
        "in_spec": str(in_spec),
        "out_spec": str(out.sharding.spec),
    }


def _check_dit(mesh) -> dict:
    """The whole model, weights and inputs sharded like training, against one device: the
    `context` backend's forward, and the `ring` backend's forward and weight gradients."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxsora.models.dit import DiTConfig, make_model
    from jaxsora.sharding import (
        DEFAULT_RULES,
        activation_sharding,
        logical_to_mesh,
        state_shardings,
    )

    cfg = dict(patch_dim=12, width=64, depth=2, num_heads=8, text_vocab=64, text_len=6)
    cfg.update(text_width=16, text_depth=1, text_heads=2)
    seq_len, S = 128, 4
    backends = ("xla", "context", "ring")
    graphdefs, states = {}, {}
    for a in backends:
        graphdefs[a], states[a] = nnx.split(make_model(DiTConfig(**cfg, attention=a), seed=0))
    leaves = [jax.tree.leaves(states[a]) for a in backends]
    same_params = all(
        np.array_equal(a, b) for other in leaves[1:] for a, b in zip(leaves[0], other, strict=True)
    )
    # adaLN-Zero zero-inits every block's output and the model's, so perturb all weights as
    # tests/conftest.py::randomize_params does, but in NumPy: its ~150 tiny eager ops each
    # compile, which would be most of this test's time on a busy 2-core machine.
    noise = np.random.default_rng(1)
    state = jax.tree.map(
        lambda x: (
            np.asarray(x) + 0.2 * noise.standard_normal(x.shape).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        states["xla"],
    )

    rng = np.random.default_rng(0)
    seg = packed_segment_ids(((50, 23, 41), (7, 64, 30, 20)), seq_len)
    inputs = {
        "x": (rng.standard_normal((B, seq_len, 12)).astype(np.float32), ("length", None)),
        "t": (rng.uniform(size=(B, S)).astype(np.float32), (None,)),
        "seg": (seg, ("length",)),
        "pos": (rng.integers(0, 8, (B, seq_len, 3)).astype(np.int32), ("length", None)),
        "ids": (rng.integers(1, 64, (B, S, 6)).astype(np.int32), (None, None)),
        "mask": (np.arange(6)[None, None] < rng.integers(1, 7, (B, S, 1)), (None, None)),
    }
    cotangent = rng.standard_normal((B, seq_len, 12)).astype(np.float32)

    def forward(graphdef, state, *args):
        return nnx.merge(graphdef, state)(*args)

    def weight_grads(graphdef, state, *args):
        """d sum(out * cotangent) / d weights: every backward path through attention."""
        params, rest = state.split(nnx.Param, ...)

        def score(params):
            out = nnx.merge(graphdef, params, rest)(*args)
            return jnp.sum(out.astype(jnp.float32) * cotangent)

        return jax.grad(score)(params)

    host_args = [x for x, _ in inputs.values()]
    ref = jax.jit(forward, static_argnums=0)(graphdefs["xla"], state, *host_args)
    ref_grads = jax.jit(weight_grads, static_argnums=0)(graphdefs["xla"], state, *host_args)

    # Stacked (scanned) blocks carry a leading `layers` axis, never sharded.
    rules = tuple(DEFAULT_RULES) + (
        (("layers", None),) if "layers" not in dict(DEFAULT_RULES) else ()
    )
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    args = [
        jax.device_put(x, NamedSharding(mesh, logical_to_mesh(("batch", *n), rules)))
        for x, n in inputs.values()
    ]

    def on_mesh(fn, backend):
        with jax.set_mesh(mesh), activation_sharding(mesh, rules):
            compiled = jax.jit(fn, static_argnums=0).lower(graphdefs[backend], state, *args)
            compiled = compiled.compile()
            return compiled(state, *args), compiled.as_text()

    out, hlo = on_mesh(forward, "context")
    ring_out, ring_hlo = on_mesh(forward, "ring")
    ring_grads, _ = on_mesh(weight_grads, "ring")
    ring_grads = dict(jax.tree_util.tree_leaves_with_path(ring_grads))
    return {
        "same_params": same_params,
        "collective": "all-to-all" in hlo,
        "scale": float(np.abs(np.asarray(ref)).max()),
        "diff": _max_diff(out, ref),
        "ring": {
            "collective": "collective-permute" in ring_hlo,
            "diff": _max_diff(ring_out, ref),
            # Per weight: max |g - g_ref| and max |g_ref|.
            "grads": {
                jax.tree_util.keystr(path): [
                    _max_diff(ring_grads[path], r),
                    float(np.abs(np.asarray(r)).max()),
                ]
                for path, r in jax.tree_util.tree_leaves_with_path(ref_grads)
            },
        },
    }


def _check_errors() -> list[str]:
    """Heads per tensor shard not divisible by context: the message, raised while tracing."""
    import jax

    from jaxsora.models.context_parallel import context_parallel_attention
    from jaxsora.sharding import DEFAULT_RULES, activation_sharding, make_mesh

    messages = []
    for sizes, heads in ((dict(data=2, context=4), 6), (dict(context=4, tensor=2), 4)):
        q = np.zeros((B, L, heads, K), np.float32)
        seg = np.ones((B, L), np.int32)
        with activation_sharding(make_mesh(sizes), DEFAULT_RULES):
            try:
                jax.jit(context_parallel_attention)(q, q, q, seg, seg)
            except ValueError as e:
                messages.append(str(e))
            else:
                raise AssertionError(f"{heads} heads on mesh {sizes} did not raise")
    return messages


def _main() -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)

    from jaxsora.models.context_parallel import context_parallel_attention, ring_attention
    from jaxsora.sharding import make_mesh

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    impls = {"all_to_all": context_parallel_attention, "ring": ring_attention}
    result = {
        "attention": {
            name: {i: _check_attention(make_mesh(sizes), fn, H) for i, fn in impls.items()}
            for name, sizes in ATTENTION_MESHES.items()
        },
        "ring_odd_heads": _check_attention(make_mesh(dict(data=2, context=4)), ring_attention, 6),
        "errors": _check_errors(),
        "dit": _check_dit(make_mesh(DIT_MESH)),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    _main()
