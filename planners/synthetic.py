"""Synthetic transformer-like training graphs for tests and benchmarks.

Each unit is an attention block (mixes tokens, so not token-separable) or an MLP block (token-separable),
with the saved tensors such blocks really keep (normed inputs, projections, activations), sizes from a
random model shape, roofline times (backward twice forward) with some noise, a few units wider than
the rest, and model states sharded until they fit beside the activations.
"""

from __future__ import annotations

import random

from memopt.graph import TrainingGraph, Unit
from memopt.hardware import Hardware

__all__ = ["random_graph"]

_DTYPE_BYTES = 2  # bf16 activations and weights
_STATE_BYTES_PER_PARAM = 16  # bf16 weight + bf16 grad + fp32 master and two Adam moments
_VOCAB = 32000


def random_graph(n_units: int, seed: int, *, separable_fraction: float = 0.5,
                 hardware: Hardware | None = None) -> TrainingGraph:
    """A random transformer-like graph.

    Args:
        n_units (int): number of planning units (>= 1).
        seed (int): random seed; the same seed gives the same graph.
        separable_fraction (float, default 0.5): probability that a unit is a token-separable MLP block
            rather than an attention block.
        hardware (Hardware | None, default None): hardware the times are modelled for; None is the
            ``h100`` preset.

    Returns:
        TrainingGraph: units named ``"layers.<i>.attn"`` / ``"layers.<i>.mlp"`` with ``meta`` naming the shape.

    Raises:
        ValueError: ``n_units < 1`` or ``separable_fraction`` outside [0, 1].

    Example:
        >>> g = random_graph(8, seed=1)
        >>> len(g.units), g.units[0].backward_s > g.units[0].forward_s
        (8, True)
    """
    if not isinstance(n_units, int) or n_units < 1:
        raise ValueError(f"n_units must be an int >= 1, got {n_units!r}")
    if not 0.0 <= separable_fraction <= 1.0:
        raise ValueError(f"separable_fraction must be in [0, 1], got {separable_fraction!r}")
    hw = hardware or Hardware.preset("h100")
    rng = random.Random(seed)
    hidden = rng.choice([1024, 2048, 4096])
    intermediate = int(hidden * 8 / 3) // 256 * 256
    kv_hidden = hidden // rng.choice([1, 4])  # multi-head or grouped-query attention
    heads = hidden // 128
    seq = rng.choice([2048, 4096, 8192])
    batch = rng.choice([1, 1, 2])
    tokens = batch * seq
    row = tokens * _DTYPE_BYTES  # bytes of one (tokens, 1) column, to scale widths by

    def roofline_s(flops: float, moved_bytes: float) -> float:
        # Sustained rates well under peak, as real kernels see them.
        return flops / (0.55 * hw.peak_flops_per_s) + moved_bytes / (0.8 * hw.mem_bytes_per_s)

    units: list[Unit] = []
    params = 0
    for i in range(n_units):
        separable = rng.random() < separable_fraction
        width = rng.choice([1.0, 1.0, 1.0, 1.0, 0.5, 2.0])  # a few heterogeneous blocks
        noise = rng.uniform(0.85, 1.15)
        if separable:
            inter = max(256, int(intermediate * width) // 256 * 256)
            saved = [row * hidden, row * hidden, row * inter, row * inter, row * inter, row * inter]
            flops = 2.0 * tokens * hidden * inter * 3
            params += 3 * hidden * inter
            name, fwd_ws, bwd_ws = f"layers.{i}.mlp", row * inter, row * (hidden + 2 * inter)
        else:
            kv = max(128, int(kv_hidden * width) // 128 * 128)
            lse_bytes = tokens * heads * 4  # fp32 log-sum-exp, small
            saved = [row * hidden, row * hidden, row * hidden, row * kv, row * kv, row * hidden, lse_bytes]
            flops = 2.0 * tokens * hidden * (2 * hidden + 2 * kv) + 2.0 * batch * seq * seq * hidden
            params += hidden * (2 * hidden + 2 * kv)
            name, fwd_ws, bwd_ws = f"layers.{i}.attn", row * hidden, row * (3 * hidden + 2 * kv)
        forward_s = roofline_s(flops, 2 * sum(saved)) * noise
        units.append(Unit(
            name=name,
            forward_s=forward_s,
            backward_s=2.0 * forward_s * rng.uniform(0.95, 1.05),
            input_bytes=row * hidden,
            output_bytes=row * hidden,
            tensor_bytes=saved,
            token_dims=[0] * len(saved),
            tokens=tokens,
            token_separable=separable,
            forward_workspace_bytes=fwd_ws,
            backward_workspace_bytes=bwd_ws,
            # Without saving, the largest intermediate still lives until its consumer has run.
            checkpoint_workspace_bytes=fwd_ws + max(saved),
        ))
    params += 2 * _VOCAB * hidden  # embedding and LM head
    # Shard model states (ZeRO-style) until they take at most a quarter of the device.
    sharding = 1
    while params * _STATE_BYTES_PER_PARAM // sharding > hw.device_bytes // 4 and sharding < 1024:
        sharding *= 2
    shard = params // sharding
    head_flops = 2.0 * tokens * hidden * _VOCAB
    logits_bytes = tokens * _VOCAB * 4  # fp32 logits for the loss
    return TrainingGraph(
        units=units,
        hardware=hw,
        param_bytes=shard * _DTYPE_BYTES,
        grad_bytes=shard * _DTYPE_BYTES,
        optimizer_bytes=shard * 12,
        fixed_activation_bytes=2 * row * hidden,  # embedding output and final norm input
        head_workspace_bytes=logits_bytes,  # logits; a fused loss writes their gradient in place
        other_forward_s=roofline_s(head_flops, logits_bytes),
        other_backward_s=2.0 * roofline_s(head_flops, logits_bytes),
        sharding_degree=sharding,
        meta={"synthetic_seed": seed, "hidden": hidden, "intermediate": intermediate, "kv_hidden": kv_hidden,
              "batch": batch, "seq": seq, "params": params},
    )
