"""An independent FLOP count for tests: walk a jaxpr and add up every dot_general in it.

2 FLOPs per multiply-add of each matmul or einsum, scan bodies times their length, nested jaxprs
(jit, checkpoint, custom derivatives) included, and of a `cond` the branch the caller says runs
(the `windowed` attention's dense fallback is data-dependent). It knows nothing about the model,
so it checks jaxsora/flops.py's formulas instead of restating them.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def jaxpr_matmul_flops(jaxpr, cond_branch: int | None = None) -> int:
    """`cond_branch`: the index of the branch every `cond` takes (lax.cond's true branch is 1);
    None: a cond is an error, since the count would depend on the data."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            if cond_branch is None:
                raise ValueError("the jaxpr has a cond: say which branch runs (cond_branch)")
            total += jaxpr_matmul_flops(eqn.params["branches"][cond_branch].jaxpr, cond_branch)
            continue
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(lhs[d] for d in contracting) * eqn.outvars[0].aval.size
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn):
            total += repeat * jaxpr_matmul_flops(sub, cond_branch)
    return total


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, core.Jaxpr):
                yield v


def matmul_flops(fn, *args, cond_branch: int | None = None) -> int:
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr, cond_branch)
