"""Swap preemption's device side: a sequence's KV pages (and their slots' token ids) gathered
off the donated cache, and scattered back into fresh pages; page lists padded to powers of two
so that a few programs serve every count."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pjllm.kernels import ops


@dataclasses.dataclass
class SwappedPages:
    """A sequence's KV pages copied off the device (swap preemption): per layer
    [2, num_kv_heads, B, page_size, head_dim] and their slots' token ids i32[B * page_size], B
    the page count padded to a power of two. Device arrays until the next `fetch` moves them to
    host memory."""

    kv: list[Any]
    page_tokens: Any
    num_pages: int


def pad_pages(pages: list[int], fill: int) -> np.ndarray:
    """Page ids padded with `fill` to a power-of-two length (a few compiled shapes)."""
    size = 1 << max(len(pages) - 1, 0).bit_length()
    return np.asarray(pages + [fill] * (size - len(pages)), np.int32)


def _page_slots(pages: jax.Array, page_size: int) -> jax.Array:
    """The KV slots of pages i32[B], page by page: i32[B * page_size]."""
    return (pages[:, None] * page_size + jnp.arange(page_size)).reshape(-1)


def read_swapped(kv_caches: list[jax.Array], page_tokens: jax.Array, pages: jax.Array,
                 page_size: int) -> tuple[list[jax.Array], jax.Array]:
    return ([ops.read_pages(cache, pages) for cache in kv_caches],
            page_tokens[_page_slots(pages, page_size)])


def write_swapped(kv_caches: list[jax.Array], page_tokens: jax.Array, pages: jax.Array,
                  kv: list[jax.Array], tokens: jax.Array,
                  page_size: int) -> tuple[list[jax.Array], jax.Array]:
    caches = [ops.write_pages(cache, pages, data) for cache, data in zip(kv_caches, kv)]
    return caches, page_tokens.at[_page_slots(pages, page_size)].set(tokens, mode="drop")
