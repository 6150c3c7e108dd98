"""Keys and values for a batched tool loop: computed once where rows share them, kept where a row goes on later.

rollout.py samples many trajectories at once, over several rounds (a model segment, a tool response, the next
segment). Three things keep that from recomputing what it already has:

    the shared prefix   every prompt opens with the same system message and worked example (~350 tokens); their keys
                        and values are computed once (`prefix_cache`) and every row reads the one copy
    kept rows           each trajectory keeps the keys and values of what it has encoded (`RowCache`) from one round
                        to the next, so a round encodes only what is new: the tool response, the last sampled token
    the batch layout    a round lays the kept rows side by side again (`batch_cache`), each row as
                        [shared prefix | padding | its own tokens], in preallocated room that a decode step writes
                        into in place (`GrowingLayer`); positions come from the attention mask (`positions`), so
                        padding in the middle changes nothing a row sees

`encode` computes what each row has not yet encoded, rows of similar lengths together (`length_groups`) so that
little of a batch is padding. All of it is exact: a row sees its own tokens at positions 0, 1, 2, ..., as it would
alone (tests compare it with encoding every context whole, rollout.RolloutConfig(keep_cache=False)).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


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


class RowCache(NamedTuple):
    """The keys and values one row has encoded after the shared prompt prefix, kept from one round to the next so
    that a round encodes only what is new (a tool response, the last sampled token). Per layer, [heads, n, dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


class GrowingLayer(DynamicLayer):
    """One layer's keys and values [B, H, T, D], written into preallocated room: a decode step copies its one new
    token in place, where transformers' DynamicLayer concatenates, copying the whole cache every step (a fifth of a
    step's time at 16 rows of 700 tokens on a CPU). `keys` and `values` are views of the filled part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.room_keys, self.room_values = keys, values  # [B, H, capacity, D]
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._fill(length)

    def _fill(self, length: int) -> None:
        self.keys, self.values = self.room_keys[:, :, :length], self.room_values[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        if end > self.room_keys.shape[2]:  # out of room: twice as much
            self.room_keys = torch.cat([self.room_keys, torch.empty_like(self.room_keys)], dim=2)
            self.room_values = torch.cat([self.room_values, torch.empty_like(self.room_values)], dim=2)
        self.room_keys[:, :, start:end] = key_states
        self.room_values[:, :, start:end] = value_states
        self._fill(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        length = self.keys.shape[2]
        self.room_keys, self.room_values = self.room_keys[indices], self.room_values[indices]
        self._fill(length)


def batch_cache(prefix, rows: Sequence[RowCache | None], prefix_length: int, room: int):
    """A batch's cache and its attention mask [batch, P + W]: the shared prefix's keys and values (a cache of one row,
    or None when P = 0) in every row, then each row's kept keys and values right-aligned, W the longest of them, and
    room for `room` more tokens per row.

    Row layout: [shared prefix | padding | kept tokens], the layout of pad_batch, so positions come from the mask."""
    lengths = [row.length if row else 0 for row in rows]
    width = max(lengths)
    mask = torch.zeros((len(rows), prefix_length + width), dtype=torch.long)  # [B, P + W]
    mask[:, :prefix_length] = 1
    for i, length in enumerate(lengths):
        mask[i, prefix_length + width - length:] = 1
    if prefix is None and width == 0:
        return DynamicCache(), mask
    kept = next(row for row in rows if row and row.length) if width else None
    layers = []
    for layer in range(len(prefix.layers) if prefix is not None else len(kept.keys)):
        pair = []
        for name in ("keys", "values"):
            template = getattr(prefix.layers[layer], name)[0] if prefix is not None else getattr(kept, name)[layer]
            heads, _, dim = template.shape
            tensor = template.new_zeros((len(rows), heads, prefix_length + width + room, dim))  # [B, H, capacity, D]
            if prefix is not None:
                tensor[:, :, :prefix_length] = getattr(prefix.layers[layer], name)  # [1, H, P, D] to every row
            for i, row in enumerate(rows):
                if lengths[i]:
                    tensor[i, :, prefix_length + width - lengths[i]:prefix_length + width] = getattr(row, name)[layer]
            pair.append(tensor)
        layers.append(GrowingLayer(*pair, length=prefix_length + width))
    return Cache(layers=layers), mask


def row_cache(cache, mask: torch.Tensor, row: int, prefix_length: int) -> RowCache:
    """Row `row`'s keys and values after the shared prefix, without its padding (`mask` [B, T] matches the cache)."""
    own = mask[row, prefix_length:].bool()  # [T - P]
    return RowCache([layer.keys[row, :, prefix_length:][:, own] for layer in cache.layers],
                    [layer.values[row, :, prefix_length:][:, own] for layer in cache.layers])


def length_groups(lengths: Sequence[int], waste: float = 0.25, slack: int = 64) -> list[list[int]]:
    """Indices grouped for padded batches: longest first, a group taking the next index while its padding stays
    within `waste` of its real tokens, or within `slack` tokens (a forward pass of its own costs more than that).

    >>> length_groups([150, 1, 160, 140, 2, 3])
    [[2, 0, 3], [5, 4, 1]]
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else []
        padded, real = lengths[group[0]] * (len(group) + 1) if group else 0, sum(lengths[j] for j in group + [i])
        if group and padded - real <= max(waste * real, slack):
            group.append(i)
        else:
            groups.append([i])
    return groups


def encode(model, contexts: Sequence[Sequence[int]], kept: list[RowCache | None], prefix, prefix_length: int,
           pad_id: int) -> list[RowCache | None]:
    """Each context's keys and values after the prefix, for all of it but its last token (the one the first decode
    step feeds): `kept` reused, the rest computed, rows of similar lengths together so that little is padding."""
    done = [row.length if row else 0 for row in kept]
    todo = [len(context) - 1 - prefix_length - d for context, d in zip(contexts, done)]  # tokens each row must encode
    for group in length_groups([max(n, 0) for n in todo]):
        group = [i for i in group if todo[i] > 0]
        if not group:
            continue
        new_ids, new_mask = pad_batch([contexts[i][prefix_length + done[i]:-1] for i in group], pad_id)  # [g, n]
        cache, mask = batch_cache(prefix, [kept[i] for i in group], prefix_length, room=new_ids.shape[1])
        mask = torch.cat([mask, new_mask], dim=1).to(model.device)  # [g, P + W + n]
        model(input_ids=new_ids.to(model.device), attention_mask=mask, **with_cache(model, cache), use_cache=True,
              position_ids=positions(mask)[:, -new_ids.shape[1]:], logits_to_keep=1)
        for j, i in enumerate(group):
            kept[i] = row_cache(cache, mask, j, prefix_length)
    return kept
