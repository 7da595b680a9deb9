"""Epochs of batches, resumable, and tokenising split over processes: what every dataset shares.

- `shuffled_order(count, seed, epoch)`: the permutation an epoch visits its examples in.
- `DataIterator(dataset)`: batches over epochs from any `EpochDataset` (`SFTDataset`,
  `PreferenceDataset`, `PromptDataset`); `state()` / `restore()` resume it exactly, and
  `select_rows` has it yield only a process's rows of each global batch.
- `EncodingShare`: a multi-process run's split of the tokenising (each process encodes every
  count-th record of a chunk; one exchange gives every process all of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from postax.data.sources import DataError

RESUME_HINT = (
    " (resuming a run from the checkpoints in its output_dir: restore the old settings, "
    "or start afresh in a new output_dir)"
)
BatchT = TypeVar("BatchT", covariant=True)


def shuffled_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of `range(count)` that depends only on (`seed`, `epoch`): the argsort of raw
    PCG64 outputs seeded with `SeedSequence([seed, epoch])`, stable across numpy versions."""
    keys = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(count)
    return np.argsort(keys, kind="stable")


@dataclasses.dataclass(frozen=True)
class EncodingShare:
    """Tokenisation split over the `count` processes of a run: this process (`index`) encodes
    every count-th record of each chunk, starting at its index, and `exchange` (a collective:
    every process's value, in process order; `postax.train.processes.allgather_objects`) gives
    every process all the documents, in record order. The dataset is then the one a single
    process builds; each process did 1/count of the tokenising."""

    index: int
    count: int
    exchange: Callable[[Any], list[Any]]

    def encode(self, encode: Callable[[list], list], records: list) -> tuple[list, int]:
        """(`encode(records)`'s results in record order, how many records this process encoded):
        this process encodes its every count-th record from its index, and one exchange gives
        it the others'. A collective: every process calls it with the same records, as often as
        the others. `encode` maps a list of records to one result (a document or a record's
        error, both picklable) each."""
        mine = records[self.index :: self.count]
        parts = self.exchange(encode(mine) if mine else [])
        return [parts[i % self.count][i // self.count] for i in range(len(records))], len(mine)


def rows_of(batch: Any, rows: np.ndarray) -> Any:
    """`rows` of a batch dataclass whose arrays all lead with the batch axis (absent optional
    arrays, None, stay None)."""
    return dataclasses.replace(
        batch,
        **{
            field.name: value[rows]
            for field in dataclasses.fields(batch)
            if (value := getattr(batch, field.name)) is not None
        },
    )


class EpochDataset(Protocol[BatchT]):
    """What `DataIterator` needs: `steps_per_epoch` batches per epoch, each a pure function
    `batch(epoch, step)`, a `config` with a `seed`, and a `fingerprint()` of the data and of the
    `batching_settings` that shape the batches."""

    config: Any
    steps_per_epoch: int
    batching_settings: tuple[str, ...]

    def batch(self, epoch: int, step: int) -> BatchT: ...

    def fingerprint(self) -> str: ...


class DataIterator(Generic[BatchT]):
    """Batches over epochs, resumable (over an `SFTDataset` or a `PreferenceDataset`).

    `state()` is a JSON-serialisable dict naming the next batch (`epoch`, `step`) with the
    dataset's `seed` and `fingerprint`; `restore(state)` (or the `state` argument) continues
    from there, so a resumed run gets exactly the batches the interrupted one would have.
    Iteration stops after `num_epochs` epochs (never, when None).
    """

    def __init__(
        self,
        dataset: EpochDataset[BatchT],
        state: dict[str, Any] | None = None,
        *,
        num_epochs: int | None = None,
    ) -> None:
        if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise ValueError(f"num_epochs={num_epochs!r} is invalid: None or an int >= 1")
        self.dataset = dataset
        self.num_epochs = num_epochs
        self.epoch = 0
        self.step = 0
        self.rows: np.ndarray | None = None  # this process's rows of each batch; None: all
        if state is not None:
            self.restore(state)

    def select_rows(self, rows_for: Callable[[int], np.ndarray] | None) -> bool:
        """From now on yield only rows `rows_for(batch_size)` of each global batch (global row
        indices, ascending: a process's rows, `postax.train.processes.process_rows`); None
        yields whole batches again. A dataset that can lay out a selection (`reads_rows`)
        reads only those rows; from any other the global batch is built and cut. The
        position (`state()`) is the global one either way, so a run resumes on any number of
        processes. Returns whether the batches are now process-local."""
        if rows_for is None:
            self.rows = None
            return False
        self.rows = np.asarray(rows_for(self.dataset.config.batch_size), dtype=np.int64)
        return True

    def _batch(self, epoch: int, step: int) -> BatchT:
        if self.rows is None:
            return self.dataset.batch(epoch, step)
        if getattr(self.dataset, "reads_rows", False):
            return self.dataset.batch(epoch, step, rows=self.rows)
        return rows_of(self.dataset.batch(epoch, step), self.rows)

    def __iter__(self) -> Iterator[BatchT]:
        return self

    def __next__(self) -> BatchT:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self._batch(self.epoch, self.step)
        self.step += 1
        if self.step == self.dataset.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state(self) -> dict[str, Any]:
        """Where the iterator stands: the next batch is (`epoch`, `step`)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.dataset.config.seed,
            "fingerprint": self.dataset.fingerprint(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state`; raises DataError if it belongs to other data or settings (a
        run resumed with changed data settings), ValueError if it is malformed."""
        if not isinstance(state, dict) or set(state) != {"epoch", "step", "seed", "fingerprint"}:
            raise ValueError(
                "data iterator state must be a dict with keys epoch, step, seed and "
                f"fingerprint, got {state!r:.200}"
            )
        epoch, step = state["epoch"], state["step"]
        if not (isinstance(epoch, int) and isinstance(step, int) and epoch >= 0):
            raise ValueError(f"data iterator state has invalid epoch/step: {state!r:.200}")
        if not 0 <= step < self.dataset.steps_per_epoch:
            raise DataError(
                f"data iterator state step={step} is out of range: an epoch has "
                f"{self.dataset.steps_per_epoch} steps{RESUME_HINT}"
            )
        if state["seed"] != self.dataset.config.seed:
            raise DataError(
                f"data iterator state was saved with seed={state['seed']!r}, but data.seed="
                f"{self.dataset.config.seed}{RESUME_HINT}"
            )
        if state["fingerprint"] != self.dataset.fingerprint():
            settings = ", ".join(self.dataset.batching_settings)
            raise DataError(
                "data iterator state does not match this dataset: the data, the tokenizer or "
                f"the batching settings ({settings}) changed since it was saved{RESUME_HINT}"
            )
        self.epoch, self.step = epoch, step
