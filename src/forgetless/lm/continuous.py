"""Continuous batching: greedy or sampled decoding with no work after a row stops.

A queue of prompts feeds a fixed number of live rows. Each row owns a slot of a preallocated KV cache
(:class:`SlotCache`: per layer one ``(rows, kv_heads, capacity, head_dim)`` tensor for keys and one for values), and
its own length and position. A decode step runs every live row's last token through the model at once, each row
attending to its own slot up to its own length. When a row stops (a stop token, or its token budget) its slot takes
the next prompt at once; when the queue is empty the last live row moves into the freed slot, so the live rows are
always the first ``n`` slots and a finished row never enters a forward again. A padded ``model.generate`` batch, by
contrast, computes every row until its longest answer stops.

The prompt tokens every prompt starts with (the chat template's system prompt, a task's instruction) run through
the decoder once: their keys and values are written into every slot and each new row prefills only its own suffix.

Why it is exact: keys are cached after their rotary position is applied, each row's position ids are its own, and
the mask lets a row see its own tokens and nothing else, so a row's logits are those of the row decoded alone, up to
the order of fp32 reductions. It holds for decoder-only models whose layers all attend fully, under ``sdpa`` or
``eager`` attention (:func:`supports_slots`); other models decode with ``model.generate`` (:mod:`forgetless.lm.decode`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from forgetless.core.logits import head_logits, split_causal_lm
from forgetless.lm.batching import length_buckets
from forgetless.lm.scoring import common_prefix

MIN_PREFIX = 8  # a shorter shared prefix is not worth a pass of its own
PREFILL_TOKENS = 4096  # most prompt tokens (padding included) in one prefill forward
GROW = 256  # the cache grows by this many positions at a time
KV_CACHE_BYTES = 2 << 30  # 2 GiB: fewer live rows where prompt + budget would need more (a 135M model: 45 KiB a token)


def supports_slots(model) -> str | None:
    """None when :func:`decode_slots` can run ``model``; otherwise why not (one line)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only model"
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        return f"attention '{implementation}' takes no per-row mask here"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layers of types {sorted(layer_types)}: per-slot caching holds full attention only"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "sliding-window attention"
    return None


class SlotCache:
    """The KV cache the attention layers call, one slot per live row.

    Before each forward the caller sets where the new keys go (:meth:`for_decode` or :meth:`for_prefill`); each
    layer's ``update`` writes its new keys and values there and returns the keys and values the rows attend over.
    """

    is_compileable = False

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, dtype, device):
        self.shape = (rows, kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self._slots: torch.Tensor | None = None  # (m,) rows of a prefill; None: the first n slots (decode)
        self._positions: torch.Tensor | None = None  # (n,) each decode row's write position
        self._start = 0  # a prefill's first position
        self._span = 0  # keys returned per row

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` tokens per slot (contents kept)."""
        if positions <= self.capacity:
            return
        size = -(-positions // GROW) * GROW
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = torch.zeros(self.shape[:2] + (size,) + self.shape[3:], dtype=self.dtype, device=self.device)
                new[:, :, : old.shape[2]] = old
                store[i] = new

    def for_decode(self, positions: torch.Tensor) -> None:
        """The next forward feeds one token to each of the first ``len(positions)`` slots, at those positions."""
        self._slots, self._positions, self._span = None, positions, int(positions.max()) + 1
        self.reserve(self._span)

    def for_prefill(self, slots: torch.Tensor, start: int, tokens: int) -> None:
        """The next forward feeds ``tokens`` tokens to each of ``slots``, at positions ``start`` onward."""
        self._slots, self._positions, self._start, self._span = slots, None, start, start + tokens
        self.reserve(self._span)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._slots is None:  # decode: (n, h, 1, d) written at each row's own position
            n = key_states.shape[0]
            rows = torch.arange(n, device=keys.device)
            keys[rows, :, self._positions] = key_states[:, :, 0]
            values[rows, :, self._positions] = value_states[:, :, 0]
            return keys[:n, :, : self._span], values[:n, :, : self._span]
        end = self._start + key_states.shape[2]  # prefill: (m, h, T, d) at start .. start + T
        keys[self._slots, :, self._start : end] = key_states
        values[self._slots, :, self._start : end] = value_states
        return keys[self._slots, :, :end], values[self._slots, :, :end]

    def copy_prefix(self, tokens: int) -> None:
        """Slot 0's first ``tokens`` positions into every other slot (the shared prefix)."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[1:, :, :tokens] = layer[:1, :, :tokens]

    def move(self, source: int, target: int, length: int) -> None:
        """Slot ``source``'s first ``length`` positions into slot ``target``."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[target, :, :length] = layer[source, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span


@dataclass
class Row:
    """One live row: the prompt (and sample) it answers, its tokens so far and what it feeds next."""

    item: int
    length: int  # tokens in the slot
    generator: torch.Generator | None
    new: list[int] = field(default_factory=list)
    next_token: int = -1


def visible_mask(positions: torch.Tensor, span: int, dtype) -> torch.Tensor:
    """Additive mask ``(len(positions), span)``: a query at position p sees keys 0..p (0), nothing after (the
    dtype's lowest value). The one mask of prefill (a suffix's positions) and decode (each row's position)."""
    allowed = torch.arange(span, device=positions.device)[None, :] <= positions[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class SlotDecoder:
    """Decodes a queue of token-id prompts in ``rows`` live rows; see the module docstring.

    ``pick(logits, rows) -> (n,) tokens`` chooses each row's next token from its fp32 logits (greedy or sampled);
    ``on_done(item, new_ids, stop)`` receives each finished answer.
    """

    def __init__(self, model, rows: int, stops: set[int], max_new_tokens: int, pick, on_done):
        self.model, self.rows, self.stops, self.max_new_tokens = model, rows, stops, max_new_tokens
        self.pick, self.on_done = pick, on_done
        self.decoder, self.head, self.softcap = split_causal_lm(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        self.kv_shape = (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                         getattr(config, "head_dim", None) or config.hidden_size // heads)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.live: list[Row] = []  # slot i holds live[i]
        self.steps = 0  # decode forwards
        self.row_steps = 0  # rows computed over all decode forwards

    @torch.no_grad()
    def run(self, prompts: list[list[int]], items: list[int], generators: list[torch.Generator | None]) -> None:
        """Decode ``prompts[i]`` as item ``items[i]`` (sampling with ``generators[i]``), in the queue's order."""
        layers, kv_heads, head_dim = self.kv_shape
        token_bytes = 2 * layers * kv_heads * head_dim * torch.finfo(self.dtype).bits // 8
        longest = max(map(len, prompts)) + self.max_new_tokens
        self.rows = max(1, min(self.rows, len(prompts), KV_CACHE_BYTES // (token_bytes * longest)))
        self.cache = SlotCache(layers, self.rows, kv_heads, head_dim, self.dtype, self.device)
        limits = [len(p) - 1 for p in prompts]  # every row prefills at least one token of its own
        shared = common_prefix(prompts, limits)
        self.prefix = shared if shared >= MIN_PREFIX else 0
        if self.prefix:
            self._forward_prefill([prompts[0][: self.prefix]], torch.zeros(1, dtype=torch.long), 0)
            self.cache.copy_prefix(self.prefix)
        queue = deque(zip(prompts, items, generators))
        while queue or self.live:
            if queue and len(self.live) < self.rows:
                self._admit([queue.popleft() for _ in range(min(self.rows - len(self.live), len(queue)))])
                continue  # an admitted row may stop on its first token: admit again before stepping
            self._step()

    def _admit(self, entries: list[tuple[list[int], int, torch.Generator | None]]) -> None:
        """Prefill new rows into the free slots (length buckets, little padding) and take their first tokens."""
        first = len(self.live)  # entry j goes to slot first + j, free until the rows are taken below
        suffixes = [p[self.prefix:] for p, _, _ in entries]
        rows, slots, tokens = [], [], []
        for bucket in length_buckets([len(s) for s in suffixes], PREFILL_TOKENS, max_padding=0.05):
            logits = self._forward_prefill([suffixes[j] for j in bucket],
                                           torch.tensor([first + j for j in bucket], device=self.device), self.prefix)
            bucket_rows = [Row(entries[j][1], self.prefix + len(suffixes[j]), entries[j][2]) for j in bucket]
            rows += bucket_rows
            slots += [first + j for j in bucket]
            tokens.append(self.pick(logits, bucket_rows))
        self._take(rows, slots, torch.cat(tokens))

    def _forward_prefill(self, suffixes: list[list[int]], slots: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``suffixes`` (right-padded) into ``slots`` after ``start`` cached positions: (m, V) fp32 logits of
        each suffix's last token."""
        width = max(len(s) for s in suffixes)
        ids = torch.zeros(len(suffixes), width, dtype=torch.long)
        for r, s in enumerate(suffixes):
            ids[r, : len(s)] = torch.tensor(s)
        positions = torch.arange(start, start + width, device=self.device)
        self.cache.for_prefill(slots, start, width)
        mask = visible_mask(positions, start + width, self.dtype)[None, None].expand(len(suffixes), 1, -1, -1)
        hidden = self.decoder(input_ids=ids.to(self.device), position_ids=positions[None].expand(len(suffixes), -1),
                              attention_mask=mask, past_key_values=self.cache, use_cache=True).last_hidden_state
        last = torch.tensor([len(s) - 1 for s in suffixes], device=self.device)
        return head_logits(self.head, hidden[torch.arange(len(suffixes), device=self.device), last], self.softcap)

    def _step(self) -> None:
        """One token for every live row."""
        n = len(self.live)
        positions = torch.tensor([row.length for row in self.live], device=self.device)
        self.cache.for_decode(positions)
        mask = visible_mask(positions, self.cache.get_seq_length(), self.dtype)[:, None, None]  # (n, 1, 1, span)
        ids = torch.tensor([[row.next_token] for row in self.live], device=self.device)
        hidden = self.decoder(input_ids=ids, position_ids=positions[:, None], attention_mask=mask,
                              past_key_values=self.cache, use_cache=True).last_hidden_state  # (n, 1, H)
        self.steps += 1
        self.row_steps += n
        for row in self.live:
            row.length += 1
        rows, self.live = self.live, []
        self._take(rows, list(range(n)), self.pick(head_logits(self.head, hidden[:, 0], self.softcap), rows))

    def _take(self, rows: list[Row], slots: list[int], tokens: torch.Tensor) -> None:
        """Append each row's token, or finish the row (a stop token, or the budget spent); then the live rows
        refill the first slots (the last live row moves into a freed slot)."""
        keep: dict[int, Row] = {i: row for i, row in enumerate(self.live)}
        for row, slot, token in zip(rows, slots, tokens.tolist()):
            if token in self.stops:
                self.on_done(row.item, row.new, token)
                continue
            row.new.append(token)
            if len(row.new) >= self.max_new_tokens:
                self.on_done(row.item, row.new, None)
                continue
            row.next_token = token
            keep[slot] = row
        self.live = []
        occupied = sorted(keep)
        for target in range(len(occupied)):
            source = occupied[target]
            if source != target:  # a gap below: move the row down (occupied is sorted, so source > target)
                self.cache.move(source, target, keep[source].length)
            self.live.append(keep[source])

