"""Hypothesis strategies for the equivalence suite: valid SHViT configurations, input batches
and seeds. Big weight arrays are made from a drawn seed (``tests.helpers.random_state``), so
hypothesis draws and shrinks small things: sizes, types, a seed.
"""
from __future__ import annotations

from hypothesis import strategies as st

from shvit_numpy.config import SHViTConfig


@st.composite
def configs(draw, max_width: int = 48, max_depth: int = 2) -> SHViTConfig:
    """Small but complete SHViT configurations: every block type, depths including 0, partial
    dims from 1 to the full stage width, any qk dim, distillation on or off."""
    c0 = 8 * draw(st.integers(1, max_width // 8))  # the stem needs embed_dim[0] // 8 >= 1
    embed = (c0, draw(st.integers(4, max_width)), draw(st.integers(4, max_width)))
    types = tuple(draw(st.sampled_from("is")) for _ in range(3))
    return SHViTConfig(
        embed_dim=embed,
        partial_dim=tuple(draw(st.integers(1, c)) for c in embed),
        qk_dim=tuple(draw(st.integers(1, 16)) for _ in range(3)),
        depth=tuple(draw(st.integers(0, max_depth)) for _ in range(3)),
        types=types,
        num_classes=draw(st.integers(1, 12)),
        distillation=draw(st.booleans()),
    )


@st.composite
def input_shapes(draw, max_batch: int = 4, max_size: int = 96) -> tuple[int, int, int, int]:
    """(B, 3, H, W): batch 1-4, odd, even and non-square sizes from 1 pixel up."""
    return (draw(st.integers(1, max_batch)), 3, draw(st.integers(1, max_size)), draw(st.integers(1, max_size)))


seeds = st.integers(0, 2**31 - 1)
