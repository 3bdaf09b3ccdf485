"""NaViT-style packing ("Patch n' Pack"): examples of any size into fixed `[L]` token packs.

Pure NumPy, so it runs inside the input pipeline and is tested without JAX. An example is a dict:

  patches   [N, P] float32   spacetime patches, N <= L
  positions [N, 3] int32     (t, h, w) of each patch inside its own example
  grid      [3] int32        (T', H', W') patch grid of the example
  text_ids  [Lt] int32       caption token ids (hashed captions), or
  text_emb  [Lt, Dt] float32 a frozen text encoder's caption embeddings (jaxsora/data/captions.py)
  text_mask [Lt] bool
  cond      [N] bool         optional: patches given clean as conditioning

A pack is the contract of DESIGN.md ("The pack"): tokens, segment_ids (1..S, 0 = padding),
positions, grid, text_ids or text_emb, text_mask, cond_mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PackShape:
    """Static shapes of one pack; nothing recompiles as long as these stay the same."""

    seq_len: int  # L
    max_segments: int  # S
    patch_dim: int  # P = p_t * p_h * p_w * C
    text_len: int  # Lt
    text_dim: int = 0  # Dt of text_emb; 0: captions are hashed ids (text_ids)


def first_fit_decreasing(sizes: Sequence[int], seq_len: int, max_segments: int) -> list[list[int]]:
    """Bins of item indices, each holding at most `seq_len` tokens and `max_segments` items.

    Items are taken largest first (ties by index, so the result is deterministic) and each goes
    into the first bin with room for it, which is what keeps padding small.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if sizes[i] > seq_len:
            raise ValueError(
                f"example of {sizes[i]} tokens does not fit a pack of {seq_len}; the input "
                "pipeline must cap tokens per example (config data.max_tokens <= data.seq_len)"
            )
        for b, free in enumerate(room):
            if free >= sizes[i] and len(bins[b]) < max_segments:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(seq_len - sizes[i])
    return bins


def build_pack(examples: Sequence[Example], shape: PackShape) -> dict[str, np.ndarray]:
    """Lays examples end to end in one pack; segment k+1 is examples[k]."""
    L, S = shape.seq_len, shape.max_segments
    if len(examples) > S:
        raise ValueError(f"{len(examples)} examples exceed max_segments={S}")
    pack = {
        "tokens": np.zeros((L, shape.patch_dim), np.float32),
        "segment_ids": np.zeros((L,), np.int32),
        "positions": np.zeros((L, 3), np.int32),
        "grid": np.zeros((S, 3), np.int32),
        **(
            {"text_emb": np.zeros((S, shape.text_len, shape.text_dim), np.float32)}
            if shape.text_dim
            else {"text_ids": np.zeros((S, shape.text_len), np.int32)}
        ),
        "text_mask": np.zeros((S, shape.text_len), bool),
        "cond_mask": np.zeros((L,), bool),
    }
    start = 0
    for k, ex in enumerate(examples):
        n = ex["patches"].shape[0]
        end = start + n
        if end > L:
            raise ValueError(f"examples total {end} tokens, more than seq_len={L}")
        pack["tokens"][start:end] = ex["patches"]
        pack["segment_ids"][start:end] = k + 1
        pack["positions"][start:end] = ex["positions"]
        if "cond" in ex:
            pack["cond_mask"][start:end] = ex["cond"]
        pack["grid"][k] = ex["grid"]
        text_key = "text_emb" if shape.text_dim else "text_ids"
        pack[text_key][k] = ex[text_key]
        pack["text_mask"][k] = ex["text_mask"]
        start = end
    return pack


def pack_examples(examples: Sequence[Example], shape: PackShape) -> list[dict[str, np.ndarray]]:
    """Packs a finite list of examples (used by the sampler and by tests)."""
    sizes = [ex["patches"].shape[0] for ex in examples]
    bins = first_fit_decreasing(sizes, shape.seq_len, shape.max_segments)
    return [build_pack([examples[i] for i in b], shape) for b in bins]


def stack_packs(packs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([p[k] for p in packs]) for k in packs[0]}


def efficiency(segment_ids: np.ndarray) -> float:
    """Fraction of pack slots that hold real tokens (the rest is padding)."""
    return float(np.mean(segment_ids > 0))


class OnlinePacker:
    """Packs an endless stream of indexed examples, first-fit decreasing over a buffer.

    Examples are fetched by index (`example_at(i)`, which returns None for media that had to be
    skipped), so the iterator's whole state is a handful of integers: the next index, the indices
    carried over from the last round, how many packs of the current round were handed out, and
    `skipped`. Restoring replays the current round from its indices, which gives exactly the
    same packs.

    Each index rejected while filling the buffer goes to `on_reject(i)` at once, inside the fill
    loop: it decides what counts towards `skipped` and may raise to stop the stream (the
    pipeline's error budget), so a source whose media are all bad fails instead of spinning
    forever. The default counts every rejection. A round replayed after a restore does not
    report its rejections again: they were reported before the save.

    Each round fills the buffer to `buffer_size` examples and packs them first-fit decreasing;
    the pack with the fewest tokens (ties: the later one) goes back to the buffer for the next
    round, where its items fill the gaps left by bigger ones, unless it is full or its items have
    already been carried `max_carries` times, which bounds their delay. The other packs are handed
    out in first-fit order.
    """

    def __init__(
        self,
        example_at: Callable[[int], Example | None],
        shape: PackShape,
        buffer_size: int,
        max_carries: int = 2,
        on_reject: Callable[[int], None] | None = None,
    ):
        self._example_at = example_at
        self._on_reject = on_reject or self.count_rejection
        self._shape = shape
        self._buffer_size = buffer_size
        self._max_carries = max_carries
        self._state = {"next_index": 0, "carried": [], "emitted": 0}
        self._round: list[dict[str, np.ndarray]] = []
        self._round_state: dict | None = None  # state at the start of the cached round
        self._round_end: tuple[int, list[tuple[int, int]]] = (0, [])
        self._kept: dict[int, Example] = {}
        self.skipped = 0  # rejections counted by on_reject, over the packer's lifetime

    @property
    def examples_read(self) -> int:
        """Stream indices read so far (good or skipped), for error-budget fractions."""
        return max(self._state["next_index"], self._round_end[0])

    def get_state(self) -> dict:
        return {
            "next_index": self._state["next_index"],
            "carried": [list(c) for c in self._state["carried"]],
            "emitted": self._state["emitted"],
            "skipped": self.skipped,
        }

    def set_state(self, state: dict) -> None:
        self._state = {
            "next_index": int(state["next_index"]),
            "carried": [tuple(c) for c in state["carried"]],
            "emitted": int(state["emitted"]),
        }
        self.skipped = int(state.get("skipped", 0))
        self._round, self._round_state, self._kept = [], None, {}

    def count_rejection(self, index: int) -> None:
        """The default `on_reject`: every rejected index counts."""
        del index
        self.skipped += 1

    def _plan_round(
        self, replay: bool
    ) -> tuple[list[dict[str, np.ndarray]], int, list[tuple[int, int]]]:
        """Packs of the round starting at the current state, its end index and its carry-over.
        Rejections go to `on_reject` unless `replay` (the round was planned before a save)."""
        items: list[tuple[int, int]] = list(self._state["carried"])  # (index, times carried)
        # Carried examples are kept from the last round; after a restore they are fetched again.
        examples = [self._kept[i] if i in self._kept else self._example_at(i) for i, _ in items]
        index = self._state["next_index"]
        while len(items) < self._buffer_size:
            ex = self._example_at(index)
            if ex is None:
                if not replay:
                    self._on_reject(index)
            else:
                items.append((index, 0))
                examples.append(ex)
            index += 1
        sizes = [ex["patches"].shape[0] for ex in examples]
        bins = first_fit_decreasing(sizes, self._shape.seq_len, self._shape.max_segments)
        carried: list[tuple[int, int]] = []
        self._kept = {}
        if len(bins) > 1:
            # The least-filled bin (ties: the later one) is the one worth refilling next round.
            fills = [sum(sizes[i] for i in b) for b in bins]
            held = min(range(len(bins)), key=lambda b: (fills[b], -b))
            kept = bins[held]
            if fills[held] < self._shape.seq_len and all(
                items[i][1] < self._max_carries for i in kept
            ):
                bins = bins[:held] + bins[held + 1 :]
                carried = [(items[i][0], items[i][1] + 1) for i in kept]
                self._kept = {items[i][0]: examples[i] for i in kept}
        packs = [build_pack([examples[i] for i in b], self._shape) for b in bins]
        return packs, index, carried

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = {"next_index": self._state["next_index"], "carried": self._state["carried"]}
        if self._round_state != start:
            # A round restored mid-way (emitted > 0) reported its rejections before the save.
            self._round, end_index, carried = self._plan_round(replay=self._state["emitted"] > 0)
            self._round_state = start
            self._round_end = (end_index, carried)
        pack = self._round[self._state["emitted"]]
        self._state["emitted"] += 1
        if self._state["emitted"] == len(self._round):
            end_index, carried = self._round_end
            self._state = {"next_index": end_index, "carried": carried, "emitted": 0}
        return pack
