"""Keys and values for a batched tool loop: the shared prompt prefix computed once, not once per row and round.

rollout.py samples many trajectories at once, over several rounds (a model segment, a tool response, the next
segment). Each round encodes every row's context and then decodes all rows together, one token per step. Every
prompt opens with the same system message and worked example (~350 tokens): their keys and values are computed once
per rollout (`prefix_cache`) and copied into each row, and the update reads the one copy for all its micro-batches.
Measured on the default run (benchmarks/README.md), that saves a third of it. Keeping each row's keys and values from
one round to the next, writing decode steps into preallocated room, and encoding rows of similar lengths apart each
saved under a tenth of it, and went.

`encode` lays a round's rows out as [shared prefix | padding | own tokens]; positions come from the attention mask
(`positions`), so padding in the middle changes nothing a row sees: a row sees its own tokens at positions 0, 1, 2,
..., as it would alone (tests compare a ragged batch with each row alone).
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache


# transformers renamed a forward pass's `past_key_values` argument and output field to `cache` (the old name warns,
# and goes in 5.40); requirements admit releases on both sides of the rename, so the name is read off the model.
@functools.lru_cache(maxsize=None)
def _cache_name(forward_owner: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword argument that hands `cache` to `model`'s forward pass, under the name its release uses."""
    return {_cache_name(type(model)): cache}


def returned_cache(output):
    """The keys and values a forward pass returned (`output.cache`, or `output.past_key_values` before the rename)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of all sequences, leaving every sequence at least one token of its own.

    All prompts share the system message and the worked example (~350 tokens with SmolLM2's template), so their
    keys and values are computed once per batch and not once per trajectory: on a CPU that is most of the prefill.
    """
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, prefix_length: int = 0):
    """[batch, width] ids and attention mask laid out as [shared prefix | padding | own suffix]: the first
    `prefix_length` tokens (the same in every row) stay at the left, each row's remaining tokens are right-aligned.
    With prefix_length 0 this is plain left padding. Positions are computed from the mask, so padding in the middle
    changes nothing: every row sees exactly its own tokens at positions 0, 1, 2, ...

    >>> pad_batch([[7, 8, 1], [7, 8, 2, 3]], pad_id=0, prefix_length=2)[0].tolist()
    [[7, 8, 0, 1], [7, 8, 2, 3]]
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        suffix = len(seq) - prefix_length
        ids[row, :prefix_length] = torch.tensor(seq[:prefix_length], dtype=torch.long)
        ids[row, width - suffix:] = torch.tensor(seq[prefix_length:], dtype=torch.long)
        mask[row, :prefix_length] = 1
        mask[row, width - suffix:] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from the attention mask: 0, 1, 2, ... over each row's real tokens."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def prefix_cache(model, prefix_ids: torch.Tensor, rows: int, encoded=None):
    """Keys and values of a shared prefix [1, P] for `rows` rows: computed here, or taken from `encoded` (an earlier
    call's result). The rows are views of one copy (expand), so the prefix is stored once; with gradients enabled,
    backpropagation reaches the prefix once, not once per row."""
    if encoded is None:
        encoded = returned_cache(model(input_ids=prefix_ids, use_cache=True))
    return DynamicCache(ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                                        for layer in encoded.layers])


def encode(model, contexts: Sequence[Sequence[int]], prefix, prefix_length: int, pad_id: int):
    """Each context's keys and values, all of it but its last token (the one the first decode step feeds), in one
    cache, and its attention mask [B, P + W]: the first `prefix_length` tokens (the same in every context) from
    `prefix` (a cache of one row, from prefix_cache; None when P = 0), each row's own tokens after them,
    right-aligned, W the longest. A decode step then appends its token to every row."""
    ids, own_mask = pad_batch([context[prefix_length:-1] for context in contexts], pad_id)  # [B, W]
    mask = torch.cat([torch.ones(len(contexts), prefix_length, dtype=torch.long), own_mask], dim=1).to(model.device)
    cache = prefix_cache(model, None, len(contexts), prefix) if prefix is not None else DynamicCache()
    if ids.shape[1]:
        model(input_ids=ids.to(model.device), attention_mask=mask, position_ids=positions(mask)[:, -ids.shape[1]:],
              **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    return cache, mask  # [B, P + W]
