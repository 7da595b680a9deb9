"""The teacher side of distillation: the module the trainer trains, and cached top-k logits.

`Distiller` puts the student, the frozen teacher and the learned feature
projections (FitNets regressors, one per feature layer pair whose widths
differ) in one module. The trainer trains `TRAINED` (every parameter outside
`teacher`), so the projections are optimised with the student, while the
teacher's weights are frozen variables: passed beside the donated training
state, sharded like the student, never differentiated. Only the student is
exported.

Top-k cache: with `teacher_logits: cache` the teacher scores every row of the
dataset once before training and keeps, per position, its k largest logits
(float32) and their ids (int32), in `<cache_dir>/teacher_topk-<key>/`
(`values.npy`, `ids.npy`, each [rows, seq_len, k], read memory-mapped). The key
hashes the teacher's weights (every array, path, dtype, shape and bytes), its
compute dtype, the dataset's fingerprint (documents, rows and batching
settings) and k, so a later run with the same teacher and data reuses the
files and a changed teacher or dataset is scored anew. The directory is
written under a temporary name and renamed into place, so a crash never
leaves a partial cache behind. `TopKIterator` attaches each batch's rows to
the batch (`teacher_topk_values`, `teacher_topk_ids`), so micro-batching
splits them with their rows. Disk use: 8 bytes x k per position of every
row.

Several processes (`postax.train.processes`): the scoring pass is a collective over the same
global batches (placed replicated), so every process ends with the whole cache; process 0
writes it under `cache_dir`, then each other process writes its own copy only if it does not
see process 0's (per-host disks: `processes.primary_first`); it is loaded only when every
process finds it (`processes.agree`).
`TopKIterator` attaches the entries of this process's rows when its trainer asked for
process-local rows.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.losses.distill import teacher_top_k
from postax.losses.numerics import map_sequence_chunks
from postax.models.layers import make_param
from postax.models.transformer import CausalLM
from postax.train.processes import (
    agree,
    gather_to_host,
    host_batch,
    mesh_of,
    multi_process,
    primary_first,
)
from postax.train.reference import ReferenceIterator, WithEntries, reference_digest

CACHE_VERSION = 1
TOPK_ENTRIES = ("teacher_topk_values", "teacher_topk_ids")
# What the trainer trains in a Distiller: the student and the projections, not the teacher.
TRAINED = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("teacher")))


def projection_name(student_layer: int, teacher_layer: int) -> str:
    return f"student{student_layer}_teacher{teacher_layer}"


class Projection(nnx.Module):
    """y = x W^T, W [out, in] initialised N(0, 1/in): a FitNets regressor."""

    def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs):
        self.weight = make_param(
            rngs, (out_features, in_features), ("embed", None), param_dtype, std=in_features**-0.5
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(self.dtype)
        precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
        return jnp.einsum(
            "...i,oi->...o",
            x.astype(self.dtype),
            w,
            precision=precision,
            preferred_element_type=jnp.float32,
        )


class Distiller(nnx.Module):
    """Student, frozen teacher (None when its logits come from a cache) and projections.

    `config` is the student's, so run summaries count the student's FLOPs.
    """

    def __init__(
        self,
        student: CausalLM,
        teacher: CausalLM | None,
        *,
        feature_layers: Sequence[tuple[int, int]] = (),
        rngs: nnx.Rngs,
    ):
        if feature_layers and teacher is None:
            raise ValueError("feature_layers need the teacher's hidden states: pass the teacher")
        self.student = student
        self.teacher = teacher
        self.config = student.config
        projections = {}
        for s, t in feature_layers:
            width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
            if width_s != width_t:
                projections[projection_name(s, t)] = Projection(
                    width_s,
                    width_t,
                    dtype=student.dtype,
                    param_dtype=student.model.embed_tokens.weight.dtype,
                    rngs=rngs,
                )
        self.projected = frozenset(projections)
        self.projections = nnx.Dict(projections)

    def project(self, pair: tuple[int, int], features: jax.Array) -> jax.Array:
        """The student's features of layer pair `pair` in the teacher's width."""
        name = projection_name(*pair)
        return self.projections[name](features) if name in self.projected else features


# ---------------------------------------------------------------- top-k cache


def topk_cache_key(teacher: CausalLM, data_fingerprint: str, k: int) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in (
        str(CACHE_VERSION),
        reference_digest(teacher),
        str(jnp.dtype(teacher.dtype)),
        data_fingerprint,
        str(k),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "chunk_size"))
def _score_top_k(graphdef, state, tokens, positions, segment_ids, *, k: int, chunk_size: int):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(tokens, positions=positions, segment_ids=segment_ids)
    return map_sequence_chunks(lambda h: teacher_top_k(model.logits(h), k), chunk_size, hidden)


def top_k_scorer(teacher: CausalLM, k: int, *, chunk_size: int = 0):
    """batch -> (values [b, t, k], ids [b, t, k]) over the teacher's current weights (one
    compilation per model structure and shape); with chunk_size > 0 at most
    [b, chunk_size, vocab] logits exist at a time."""
    graphdef, state = nnx.split(teacher)

    def run(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        names = ("tokens", "positions", "segment_ids")
        if multi_process():  # the same global batch on every process: placed replicated
            placed = host_batch({n: batch[n] for n in names}, mesh_of(state))
            out = _score_top_k(
                graphdef, state, *(placed[n] for n in names), k=k, chunk_size=chunk_size
            )
            values, ids = (gather_to_host(x) for x in out)
        else:
            arrays = (jnp.asarray(batch[n]) for n in names)
            values, ids = jax.device_get(
                _score_top_k(graphdef, state, *arrays, k=k, chunk_size=chunk_size)
            )
        return np.asarray(values, np.float32), np.asarray(ids, np.int32)

    return run


def compute_top_k(
    teacher: CausalLM,
    batches: Iterable[tuple[Sequence[int], dict[str, np.ndarray]]],
    num_rows: int,
    *,
    k: int,
    chunk_size: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k teacher logits and ids of every row, [num_rows, width, k] each, from
    (row indices, batch arrays [B, width]) pairs that cover every row once."""
    vocab = teacher.config.vocab_size
    if not 0 < k <= vocab:
        raise ValueError(f"top_k={k} is invalid: in [1, teacher vocab_size={vocab}]")
    score = top_k_scorer(teacher, k, chunk_size=chunk_size)
    values = ids = None
    seen = np.zeros(num_rows, bool)
    for rows, batch in batches:
        index = np.asarray(rows, np.int64)
        v, i = score(batch)
        if values is None:
            values = np.zeros((num_rows, *v.shape[1:]), np.float32)
            ids = np.zeros((num_rows, *i.shape[1:]), np.int32)
        values[index], ids[index] = v[: len(index)], i[: len(index)]
        seen[index] = True
    if values is None or not seen.all():
        raise ValueError(f"the teacher pass covered {int(seen.sum())}/{num_rows} rows")
    return values, ids


class TopKCache:
    """Cached top-k teacher logits of a dataset's rows (memory-mapped arrays)."""

    def __init__(self, path: Path):
        self.path = path
        self.values = np.load(path / "values.npy", mmap_mode="r")
        self.ids = np.load(path / "ids.npy", mmap_mode="r")

    def for_rows(self, rows: Sequence[int], width: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch entries for dataset rows `rows` in a batch [batch_size, width] (filler rows
        are zeros; the loss mask leaves them out)."""
        k = self.values.shape[-1]
        values = np.zeros((batch_size, width, k), np.float32)
        ids = np.zeros((batch_size, width, k), np.int32)
        index = np.asarray(rows, np.int64)
        values[: len(index)] = self.values[index, :width]
        ids[: len(index)] = self.ids[index, :width]
        return dict(zip(TOPK_ENTRIES, (values, ids), strict=True))


def load_or_compute_top_k(
    teacher: CausalLM,
    *,
    fingerprint: str,
    num_rows: int,
    batches: Callable[[], Iterable[tuple[Sequence[int], dict[str, np.ndarray]]]],
    cache_dir: str | Path,
    k: int,
    chunk_size: int = 0,
) -> tuple[TopKCache, bool]:
    """(the cache of a dataset under `teacher`, whether it was computed now).

    fingerprint: the dataset's (`SFTDataset.fingerprint()`); num_rows: its row count;
    batches: called only when the cache is missing, yields (row indices, arrays) pairs
    (`postax.data.distill.row_batches`).
    """
    key = topk_cache_key(teacher, fingerprint, k)
    path = Path(cache_dir) / f"teacher_topk-{key}"

    def found() -> bool:
        return (path / "key.txt").exists() and (path / "key.txt").read_text() == key

    if agree(found()):  # every process loads, or every process joins the scoring pass
        return TopKCache(path), False
    values, ids = compute_top_k(teacher, batches(), num_rows, k=k, chunk_size=chunk_size)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp"))
        try:
            np.save(tmp / "values.npy", values)
            np.save(tmp / "ids.npy", ids)
            (tmp / "key.txt").write_text(key)
            if path.exists() and not found():  # an incomplete or foreign directory of the name
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    primary_first(write, found)  # process 0 writes; others only where they do not see it
    return TopKCache(path), True


class TopKIterator(ReferenceIterator):
    """Wraps an `SFTDataset` iterator; each batch gains its rows' cached top-k teacher logits.

    The rows of batch (epoch, step) are `dataset.epoch_order(epoch)[step * B : (step + 1) * B]`
    (how `SFTDataset.batch` chooses them; of those, this process's, after `select_rows`);
    `state` and `restore` pass through.
    """

    def __init__(self, iterator, dataset, cache: TopKCache):
        if cache.values.shape[0] != dataset.num_rows:
            raise ValueError(
                f"top-k cache {cache.path} holds {cache.values.shape[0]} rows, the dataset "
                f"{dataset.num_rows}"
            )
        super().__init__(iterator, attach=None)
        self.dataset, self.cache = dataset, cache

    def __next__(self) -> WithEntries:
        epoch, step = self.iterator.epoch, self.iterator.step
        batch = next(self.iterator)
        size = self.dataset.config.batch_size
        rows = self.dataset.epoch_order(epoch)[step * size : (step + 1) * size]
        if (local := self.local()) is not None:  # this process's rows of the batch
            mine = local[0]
            rows, size = rows[mine[mine < len(rows)]], len(mine)
        width = batch.tokens.shape[1]
        return WithEntries(batch, self.cache.for_rows(rows, width, size))
