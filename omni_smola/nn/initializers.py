"""Initialisers shared by the adapters.

`B` (the output factor) starts at zero in every adapter, so an untrained adapter
leaves the frozen layer's output unchanged, exactly. `A` and router weights get
fan-in scaling over the input width: the expert axis is a batch axis, not a fan.
"""
import flax.linen as nn

# A: [experts, d_in, rank] or [d_in, rank]; the input width is axis -2.
down_projection = nn.initializers.variance_scaling(
    1.0, "fan_in", "normal", in_axis=-2, out_axis=-1)
# A pool of rank-1 down factors, [*stacked, d_in]: fan-in is d_in, the last axis.
down_vectors = nn.initializers.variance_scaling(
    1.0, "fan_in", "normal", in_axis=-1, out_axis=-2)
# Router / slot parameters: [d_in, experts, slots]; fan-in is d_in.
router_weights = nn.initializers.variance_scaling(
    1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
up_projection = nn.initializers.zeros
