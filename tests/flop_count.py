"""An independent FLOP count for tests: walk a jaxpr and add up every dot_general in it.

2 FLOPs per multiply-add of each matmul or einsum, scan bodies times their length, nested jaxprs
(jit, checkpoint, custom derivatives) included. It knows nothing about the model, so it checks
jaxsora/flops.py's formulas instead of restating them.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def jaxpr_matmul_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(lhs[d] for d in contracting) * eqn.outvars[0].aval.size
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn):
            total += repeat * jaxpr_matmul_flops(sub)
    return total


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, core.Jaxpr):
                yield v


def matmul_flops(fn, *args) -> int:
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
