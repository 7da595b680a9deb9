"""Completion log-probs under a reference model: computed per batch or once and cached.

Preference losses compare the policy with a frozen reference (DPO, IPO, KTO)
through the summed log-probability of each completion. `sequence_logps` computes
those sums for any model on the batch layout of `postax.data.preference`
(arrays [..., L]; `loss_mask` marks the completion targets), and
`ReferenceLogps` provides them to the trainer in one of two ways:

- "cache": one pass over the whole dataset before training, stored at
  `<cache_dir>/reference_logps-<key>.npz`, where the key hashes the reference
  weights (every array, path, dtype and shape), the dataset's fingerprint and
  the log-prob settings. A later run with the same model and data loads the
  file; a changed model or dataset gets a new key, so it is recomputed. Each
  batch then looks its examples up by `index`.
- "on_the_fly": the reference runs on every batch. With LoRA the reference is
  the policy itself with its adapters switched off inside the loss
  (`postax.models.lora.lora_disabled`), so no second copy of the weights
  exists; a fully fine-tuned policy needs a frozen copy of its initial
  weights, scored here before each step.

The reference log-probs reach the loss as batch entries (`ref_logp`, and
`ref_kl_logp` for KTO's mismatched pairs), so micro-batching splits them with
their examples.

Several processes (`postax.train.processes`). The caching pass is a collective: every process
scores the same global batches (placed replicated on the mesh) and ends with the whole table,
and process 0 writes it to `cache_dir` (atomic rename); then every other process that does not
see the file there (per-host disks) writes its own copy (`processes.primary_first`).
Whether the cache is loaded or computed is decided together (`processes.agree`): it is loaded
only when every process finds it, so a host that lacks the file never leaves the others waiting
in a pass it skips. The reference digest gathers sharded weights (a collective too). On the fly,
a `ReferenceIterator` whose trainer asked for process-local rows (`select_rows`) scores this
process's rows as part of the global batch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.losses.numerics import map_sequence_chunks, token_logprobs
from postax.models.lora import lora_disabled, lora_modules
from postax.train.processes import (
    agree,
    gather_to_host,
    host_batch,
    mesh_of,
    multi_process,
    primary_first,
)

CACHE_VERSION = 1


def sequence_logps(
    model, batch: dict[str, jax.Array], *, prefix: str = "", chunk_size: int = 0
) -> tuple[jax.Array, jax.Array]:
    """(summed completion log-probs, completion token counts), both float32 [...].

    `batch[prefix + name]` for name in tokens, targets, loss_mask, positions,
    segment_ids, each [..., L]; the leading axes are flattened for the
    forward pass and restored in the results. With `branch_ids` (a shared
    prompt, rows [P, W]) the results are [P, 2]: branch 1 and branch 2.
    """
    logp, counts, _ = _sequence_logps(model, batch, prefix, chunk_size, router=False)
    return logp, counts


def sequence_logps_and_router(
    model, batch: dict[str, jax.Array], *, prefix: str = "", chunk_size: int = 0
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """`sequence_logps` and, from the same forward pass of a mixture-of-experts model, (router
    logits [sparse layers, rows, L, experts], real-token mask [rows, L]) with the leading axes
    flattened into rows (`postax.recipes.router_terms`)."""
    return _sequence_logps(model, batch, prefix, chunk_size, router=True)


def _sequence_logps(model, batch, prefix: str, chunk_size: int, *, router: bool):
    tokens = batch[prefix + "tokens"]
    lead, length = tokens.shape[:-1], tokens.shape[-1]

    def rows(name: str) -> jax.Array:
        return batch[prefix + name].reshape(-1, length)

    branches = batch.get(prefix + "branch_ids")
    inputs = dict(
        positions=rows("positions"),
        segment_ids=rows("segment_ids"),
        **({} if branches is None else {"branch_ids": rows("branch_ids")}),
    )
    routing = None
    if router:
        out = model.intermediates(rows("tokens"), router_logits=True, **inputs)
        logp = map_sequence_chunks(
            lambda h, y: token_logprobs(model.logits(h), y), chunk_size, out.hidden, rows("targets")
        )
        routing = (out.router_logits, rows("segment_ids") > 0)
    else:
        logp = model.token_logprobs(
            rows("tokens"), rows("targets"), chunk_size=chunk_size, **inputs
        )
    mask = rows("loss_mask").astype(jnp.float32)
    if branches is not None:  # shared prompt: one row [P, W] -> [P, 2] by branch
        per_branch = jnp.stack([branches == 1, branches == 2], axis=1).astype(jnp.float32)
        weights = mask[:, None, :] * per_branch
        return (logp[:, None, :] * weights).sum(-1), weights.sum(-1), routing
    return (logp * mask).sum(-1).reshape(lead), mask.sum(-1).reshape(lead), routing


def has_lora(model) -> bool:
    return bool(lora_modules(model))


def reference_digest(model) -> str:
    """A hash of the reference weights: the model's parameters, LoRA adapters excluded.

    With adapters the reference is the base model (adapters off), so adapter
    values do not enter the key. Every array contributes its path, dtype,
    shape and bytes (fetched one at a time).
    """
    state = nnx.state(model, nnx.All(nnx.Variable, nnx.Not(nnx.LoRAParam), nnx.Not(nnx.RngState)))
    digest = hashlib.blake2b(digest_size=16)
    for path, value in sorted(
        nnx.to_flat_state(state), key=lambda item: tuple(str(p) for p in item[0])
    ):
        array = value.get_value()
        if not isinstance(array, jax.Array | np.ndarray):
            continue
        host = gather_to_host(array) if isinstance(array, jax.Array) else array
        digest.update("/".join(str(p) for p in path).encode())
        digest.update(f"{host.dtype}{host.shape}".encode())
        digest.update(np.ascontiguousarray(host).view(np.uint8).tobytes())
    return digest.hexdigest()


def cache_key(model, data_fingerprint: str, chunk_size: int) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in (str(CACHE_VERSION), reference_digest(model), data_fingerprint, str(chunk_size)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


Local = tuple[np.ndarray, int]  # (this process's rows, global rows) of a process-local batch


def _scorer(model, *, prefix: str, chunk_size: int) -> Callable[..., jax.Array | np.ndarray]:
    """A jitted `score(batch, local=None)` -> summed log-probs over `model`'s current weights.

    One process: a device array for the batch. Several: the host values of a global batch
    (every process passes the same), or with `local=(rows, global_rows)` of this process's
    rows of a global batch."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, batch):
        merged = nnx.merge(graphdef, state)
        with lora_disabled(merged):  # no-op without adapters
            return sequence_logps(merged, batch, prefix=prefix, chunk_size=chunk_size)[0]

    def run(batch: dict, local: Local | None = None):
        if not multi_process():
            return score(state, {k: jnp.asarray(v) for k, v in batch.items()})
        rows, global_rows = local if local is not None else (None, None)
        placed = host_batch(batch, mesh_of(state), rows=rows, global_rows=global_rows)
        values = gather_to_host(score(state, placed))
        return values if rows is None else values[rows]

    return run


def frozen_copy(model):
    """A copy of `model` with its own arrays.

    `nnx.clone` shares the arrays, and the trainer donates the policy's
    buffers at every step, so a reference must own a real copy.
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def compute_dataset_logps(
    model, batches: Iterable[dict[str, np.ndarray]], num_examples: int, *, chunk_size: int = 0
) -> np.ndarray:
    """Reference log-probs of every example, in index order: [n, 2] (pairs) or [n]."""
    score = _scorer(model, prefix="", chunk_size=chunk_size)
    out: np.ndarray | None = None
    seen = np.zeros(num_examples, bool)
    for batch in batches:
        values = np.asarray(score(batch), np.float32)
        index = np.asarray(batch["index"])
        real = index >= 0
        if out is None:
            out = np.zeros((num_examples, *values.shape[1:]), np.float32)
        out[index[real]] = values[real]
        seen[index[real]] = True
    if out is None or not seen.all():
        missing = int((~seen).sum())
        raise ValueError(f"reference pass covered {num_examples - missing}/{num_examples} examples")
    return out


def _write_atomic(path: Path, key: str, logps: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.asarray(key), logps=logps)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_compute(
    model,
    dataset,
    cache_dir: str | Path,
    *,
    batch_size: int,
    chunk_size: int = 0,
) -> tuple[np.ndarray, Path, bool]:
    """(per-example reference log-probs, cache file, whether it was computed now)."""
    key = cache_key(model, dataset.fingerprint(), chunk_size)
    path = Path(cache_dir) / f"reference_logps-{key}.npz"
    found = None
    if path.exists():
        with np.load(path) as f:
            if str(f["key"]) == key and f["logps"].shape[0] == dataset.num_examples:
                found = f["logps"]
    if agree(found is not None):  # every process loads, or every process joins the pass
        return found, path, False
    batches = (b.as_dict() for b in dataset.examples(batch_size))
    logps = compute_dataset_logps(model, batches, dataset.num_examples, chunk_size=chunk_size)
    primary_first(lambda: _write_atomic(path, key, logps), path.exists)
    return logps, path, True


class WithEntries:
    """A batch whose `as_dict()` carries extra entries."""

    def __init__(self, batch, extra: dict[str, np.ndarray]):
        self._batch, self._extra = batch, extra

    def as_dict(self) -> dict[str, np.ndarray]:
        return {**self._batch.as_dict(), **self._extra}


class ReferenceIterator:
    """Wraps a data iterator; each batch gains reference log-probs (state/restore pass through)."""

    def __init__(self, iterator, attach: Callable[..., dict[str, np.ndarray]]):
        self.iterator = iterator
        self.attach = attach

    def __iter__(self) -> Iterator[WithEntries]:
        return self

    def __next__(self) -> WithEntries:
        batch = next(self.iterator)
        return WithEntries(batch, self.attach(batch.as_dict(), local=self.local()))

    def select_rows(self, rows_for: Callable[[int], np.ndarray] | None) -> bool:
        """Process-local rows (`DataIterator.select_rows`), when the wrapped iterator can
        select them; returns whether the batches are now process-local."""
        select = getattr(self.iterator, "select_rows", None)
        return bool(select is not None and select(rows_for))

    def local(self) -> Local | None:
        """(this process's rows, global rows) when the wrapped iterator yields process-local
        rows, else None."""
        rows = getattr(self.iterator, "rows", None)
        if rows is None:
            return None
        return rows, self.iterator.dataset.config.batch_size

    def state(self) -> dict[str, Any]:
        return self.iterator.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.iterator.restore(state)


def lookup(cached: np.ndarray) -> Callable[..., dict[str, np.ndarray]]:
    """Batch -> {"ref_logp": cached[index]} (zeros for filler rows, index -1); a process-local
    batch carries its own `index` rows."""

    def attach(batch: dict[str, np.ndarray], local: Local | None = None) -> dict[str, np.ndarray]:
        del local
        index = np.asarray(batch["index"])
        values = cached[np.maximum(index, 0)]
        values = np.where((index >= 0).reshape(index.shape + (1,) * (values.ndim - 1)), values, 0)
        return {"ref_logp": values.astype(np.float32)}

    return attach


def score_each_batch(
    reference_model, *, chunk_size: int = 0, kl_rows: bool = False
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Batch -> {"ref_logp"[, "ref_kl_logp"]} from a frozen reference model, per batch
    (`local`: the batch holds this process's rows of a global batch, `ReferenceIterator`)."""
    score = _scorer(reference_model, prefix="", chunk_size=chunk_size)
    score_kl = _scorer(reference_model, prefix="kl_", chunk_size=chunk_size) if kl_rows else None

    def attach(batch: dict[str, np.ndarray], local: Local | None = None) -> dict[str, np.ndarray]:
        out = {"ref_logp": np.asarray(score(batch, local), np.float32)}
        if score_kl is not None:
            out["ref_kl_logp"] = np.asarray(score_kl(batch, local), np.float32)
        return out

    return attach
