"""The softmax attention core of the ADM UNet, in the forms XLA runs fastest.

``softmax_attention(q, k, v)`` is ``softmax(q k^T) v`` per (image, head) on heads-major arrays
[N, heads, T, ch]; the softmax runs in ``accumulation_dtype`` (float32, or float64). Two
formulations of the same arithmetic, chosen by whether the call is differentiated:

* **Plain call** (RED-Diff, the samplers): query-major, ``softmax(q k^T)`` [t, s] with the
  softmax over the minor axis, then the product with v.
* **Differentiated** (DPS, ΠGDM: a VJP through the network) the same in *key-major* layout: the
  logits are formed as ``k q^T`` [s, t], the softmax reduces over axis -2 and is normalised
  after the product with v. Every product of the backward pass is then a plain or ``A B^T``
  matmul; in query-major layout two of them (``W^T dO`` and ``dS^T q``) contract the [T, T]
  operand over its major axis, which XLA CPU runs at about half the speed (it transposes the
  operand first). The key-major form is no faster as a plain forward, so it is used only here.
  Two ``optimization_barrier`` s keep XLA's algebraic simplifier from folding the transposes of
  the small [T, ch] operands (q^T in, out^T out) into the products, which would bring back
  the slow form: batched [256, 256] x [256, 16] products took 2.0 ms folded and 0.50 ms with
  the barrier; the 16x16 attention layer + VJP of the fixture UNet 10.1 -> 6.8 ms at batch 8.

Both run on the (image, head) pairs flattened into one leading axis, [N * heads, T, ch]: the
products are then batched matmuls with a single batch dimension, whatever the caller's. Under
``vmap`` (``solve_many``, sweeps: each measurement a batch of one) a 4-d [N, heads, T, ch]
formulation gains a fifth, vmapped axis, and XLA CPU no longer fuses the plain call's two
products and softmax into one kernel (3 kernels instead of 1): the 16x16 attention core at 16
measurements took 5.7 ms vmapped against 3.7 ms batched, its VJP 18.7 against 9.8 ms; flat,
3.9 and 9.7 ms vmapped, the batched call unchanged (one interleaved run).

A ``custom_jvp`` joins the two: its primal is the first, its derivative rule is the JVP of the
second (reverse mode transposes that rule), so forward- and reverse-mode derivatives both work.
The two differ by float rounding only (``tests/test_attention.py``; the speed is measured in
``benchmarks/bench_unet.py --compare-old``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reddiff_jax.precision import accumulation_dtype as _acc

__all__ = ["softmax_attention"]


def _flat(a: jax.Array) -> jax.Array:
    """[..., T, ch] -> [B, T, ch]: every leading axis folded into one."""
    return a.reshape(-1, *a.shape[-2:])


def _query_major(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    lead = q.shape[:-2]
    q, k, v = _flat(q), _flat(k), _flat(v)
    logits = jnp.einsum("btc,bsc->bts", q, k)
    weights = jax.nn.softmax(logits.astype(_acc(q.dtype)), axis=-1)
    out = jnp.einsum("bts,bsc->btc", weights.astype(v.dtype), v)
    return out.reshape(*lead, *out.shape[-2:])


def _key_major(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    acc, lead = _acc(q.dtype), q.shape[:-2]
    q, k, v = _flat(q), _flat(k), _flat(v)
    # q enters as q^T [B, ch, t] behind a barrier: the backward then forms dq^T = k^T dS (dS
    # contracted over its major axis s as the right operand of a plain GEMM) and transposes the
    # small result, where XLA would otherwise contract dS over s as the left operand, 4x slower.
    q_t = jax.lax.optimization_barrier(jnp.swapaxes(q, -1, -2))
    logits = jnp.einsum("bsc,bct->bst", k, q_t).astype(acc)  # [B, s, t]
    p = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-2, keepdims=True)))
    total = jnp.sum(p, axis=-2)  # [B, t]
    out_t = jnp.einsum("bcs,bst->bct", jnp.swapaxes(v, -1, -2), p.astype(v.dtype))
    # the barrier keeps XLA from folding this transpose into the product (p^T v, the slow form)
    out = jnp.swapaxes(jax.lax.optimization_barrier(out_t).astype(acc), -1, -2)
    out = (out / total[..., None]).astype(v.dtype)
    return out.reshape(*lead, *out.shape[-2:])


@jax.custom_jvp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T) v``: q, k, v [N, heads, T, ch] (q, k already scaled) -> [N, heads, T, ch].

    The softmax over keys is taken in float32 (float64 for float64 inputs); the result has
    v's dtype. Any logit scale must be applied to q and k beforehand.
    """
    return _query_major(q, k, v)


@softmax_attention.defjvp
def _softmax_attention_jvp(primals, tangents):
    return jax.jvp(_key_major, primals, tangents)
