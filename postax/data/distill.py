"""Batches for distillation: dataset rows by index, and on-policy rows (GKD).

`row_batches` lays every row of an `SFTDataset` out in index order (the
teacher's top-k caching pass). `OnPolicyMix` is the data side of on-policy
distillation (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", Algorithm 1): at each step,
with probability `fraction` (the paper's lambda) the batch is made of the
student's own completions of dataset prompts, else it is the dataset's next
batch. A dataset document's prompt is its tokens before the first trained
target (the user turn and the assistant header of a chat; the prompt of a
prompt/completion record; the first token of a plain text). An on-policy row
is prompt + completion with the loss on the completion tokens (a stop token
included), one document per row, padded to the smallest of the dataset's
buckets that holds it.

Every choice is a pure function of (seed, step): the coin of step s, the
documents whose prompts it uses (`shuffled_order(documents, seed, s)`), and
the seed handed to `generate`, so a resumed run makes the same choices; its
state is the dataset iterator's plus the step. With several processes (`select_rows`) every
process takes the same steps and prompts; `generate` returns every prompt's completion (the
recipe has each process sample its share and exchanges them), and each process keeps its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from postax.data.iteration import shuffled_order
from postax.data.packing import layout

# generate(prompts, step) -> one completion (token ids) per prompt
Generate = Callable[[list[np.ndarray], int], Sequence[Sequence[int]]]


def _layout_documents(
    documents: Sequence[tuple[np.ndarray, np.ndarray]],
    rows: Sequence[Sequence[int]],
    width: int,
    batch_size: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    lengths = [len(ids) for ids, _ in documents]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([ids for ids, _ in documents]) if documents else np.zeros(0, np.int32)
    labels = np.concatenate([lab for _, lab in documents]) if documents else np.zeros(0, bool)
    return layout(rows, ids, labels, starts, width, batch_size, pad_id)


def rows_batch(dataset, rows: Sequence[int], width: int, batch_size: int) -> dict[str, np.ndarray]:
    """Dataset rows `rows` as batch arrays [batch_size, width], laid out as `SFTDataset.batch`
    lays them out (rows past `len(rows)` are padding)."""
    documents, local = [], []
    for r in rows:
        row = dataset.row(int(r))
        local.append(list(range(len(documents), len(documents) + len(row))))
        documents.extend(dataset.document(d) for d in row)
    return _layout_documents(documents, local, width, batch_size, dataset.pad_token_id)


def row_batches(dataset, batch_size: int) -> Iterator[tuple[range, dict[str, np.ndarray]]]:
    """(row indices, arrays [batch_size, seq_len]) over every row of `dataset`, in index order."""
    width = dataset.config.seq_len
    for start in range(0, dataset.num_rows, batch_size):
        rows = range(start, min(start + batch_size, dataset.num_rows))
        yield rows, rows_batch(dataset, rows, width, batch_size)


def prompt_ids(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A document's tokens before its first trained target (at least its first token)."""
    trained = np.flatnonzero(np.asarray(labels[1:], bool))
    return np.asarray(ids[: trained[0] + 1 if trained.size else 1], np.int32)


def completion_rows(
    prompts: Sequence[np.ndarray],
    completions: Sequence[Sequence[int]],
    *,
    buckets: Sequence[int],
    batch_size: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Prompt + completion documents, one per row, loss on the completion tokens, padded to
    the smallest of `buckets` that holds the longest (cut to the last bucket's length)."""
    limit = buckets[-1] + 1
    documents = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = np.concatenate([prompt, np.asarray(completion, np.int32)])[:limit]
        labels = np.arange(len(ids)) >= len(prompt)
        documents.append((ids.astype(np.int32), labels))
    longest = max(len(ids) - 1 for ids, _ in documents)
    width = next(b for b in buckets if b >= longest)
    rows = [[i] for i in range(len(documents))]
    return _layout_documents(documents, rows, width, batch_size, pad_id)


class _Flagged:
    """A batch with a per-row `on_policy` entry (1.0 for student samples)."""

    def __init__(self, arrays: dict[str, np.ndarray], on_policy: bool):
        self.arrays = arrays
        rows = arrays["tokens"].shape[0]
        self.arrays["on_policy"] = np.full((rows,), float(on_policy), np.float32)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)


class OnPolicyMix:
    """Per step: on-policy rows with probability `fraction`, else the dataset's next batch.

    dataset: the `SFTDataset` whose documents give the prompts (its batch size is the
        number of prompts per on-policy step; its buckets the row widths).
    iterator: the dataset's iterator (advanced on dataset steps only).
    generate: (prompts, step) -> completions; it samples from the live student.
    max_new_tokens: prompts are cut to their last seq_len + 1 - max_new_tokens tokens.
    """

    def __init__(
        self,
        dataset,
        iterator,
        generate: Generate,
        *,
        fraction: float,
        max_new_tokens: int,
        seed: int = 0,
    ):
        seq_len = dataset.config.seq_len
        if not 0 < max_new_tokens < seq_len:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} is invalid: in [1, seq_len={seq_len})"
            )
        self.dataset, self.iterator, self.generate = dataset, iterator, generate
        self.fraction, self.max_new_tokens, self.seed = fraction, max_new_tokens, seed
        self.step = 0
        self.rows: np.ndarray | None = None  # this process's rows (`select_rows`), or all

    def select_rows(self, rows_for: Callable[[int], np.ndarray] | None) -> bool:
        """Several processes: yield only rows `rows_for(batch_size)` of each global batch (the
        dataset's through its iterator; of an on-policy batch, built whole from every process's
        samples, those rows). Returns whether the batches are now process-local."""
        local = self.iterator.select_rows(rows_for)
        size = self.dataset.config.batch_size
        self.rows = np.asarray(rows_for(size), np.int64) if local and rows_for else None
        return local

    def __iter__(self) -> Iterator[_Flagged]:
        return self

    def on_policy(self, step: int) -> bool:
        """The coin of step `step` (stable across numpy versions, like the data order)."""
        draw = np.random.PCG64(np.random.SeedSequence([self.seed, step])).random_raw()
        return int(draw) / 2.0**64 < self.fraction

    def prompts(self, step: int) -> list[np.ndarray]:
        """The prompts of on-policy step `step`: batch_size documents in a seeded order."""
        count = self.dataset.stats.examples
        size = self.dataset.config.batch_size
        order = np.resize(shuffled_order(count, self.seed, step), size)
        keep = self.dataset.config.seq_len + 1 - self.max_new_tokens
        return [prompt_ids(*self.dataset.document(int(d)))[-keep:] for d in order]

    def __next__(self) -> _Flagged:
        step = self.step
        if self.on_policy(step):
            prompts = self.prompts(step)
            completions = self.generate(prompts, step)
            arrays = completion_rows(
                prompts,
                completions,
                buckets=self.dataset.config.buckets,
                batch_size=self.dataset.config.batch_size,
                pad_id=self.dataset.pad_token_id,
            )
            if self.rows is not None:
                arrays = {k: v[self.rows] for k, v in arrays.items()}
            batch = _Flagged(arrays, True)
        else:
            batch = _Flagged(next(self.iterator).as_dict(), False)
        self.step = step + 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"data": self.iterator.state(), "step": self.step}

    def restore(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"data", "step"}:
            raise ValueError(f"on-policy iterator state must have keys data and step: {state!r}")
        self.iterator.restore(state["data"])
        self.step = int(state["step"])
