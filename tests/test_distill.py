"""Knowledge distillation: divergences by hand, model intermediates, and `postax distill` end to
end on a Markov-chain letter task (each letter is followed by one of three letters with
probabilities 0.6, 0.3, 0.1), where a trained teacher's soft distribution carries more than
the sampled hard labels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import postax
from postax.configs import ConfigFileError, load_config
from postax.data import DataConfig, SFTDataset
from postax.data.distill import OnPolicyMix, prompt_ids
from postax.losses.distill import (
    DistillLossConfig,
    attention_divergence,
    feature_distance,
    token_divergence,
    topk_token_divergence,
)
from postax.recipes import distill
from postax.recipes.common import ModelSource
from postax.recipes.sft import SFTAlgorithm
from postax.tokenizer import build_tokenizer
from postax.train import teacher as teachers
from postax.train.optim import OptimizerConfig
from postax.train.trainer import Trainer, TrainerConfig
from postax.validation import ConfigError

ROOT = Path(__file__).parents[1]
LETTERS = "abcdefghijkl"
STEPS_AHEAD, PROBABILITIES = (1, 3, 7), (0.6, 0.3, 0.1)
VOCAB = 264
TEACHER = dict(
    family="llama",
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
)
STUDENT = dict(
    family="llama",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
)
ADAM = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant")


def markov_text(rng: np.random.Generator, length: int) -> str:
    state = int(rng.integers(len(LETTERS)))
    out = [state]
    for _ in range(length - 1):
        state = (state + int(rng.choice(STEPS_AHEAD, p=PROBABILITIES))) % len(LETTERS)
        out.append(state)
    return "".join(LETTERS[i] for i in out)


def write_records(path: Path, rng: np.random.Generator, count: int) -> str:
    texts = [markov_text(rng, 15) for _ in range(count)]
    records = [{"prompt": t[:3], "completion": t[3:]} for t in texts]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def data(path: str, **kw) -> DataConfig:
    return DataConfig(path=path, seq_len=16, batch_size=8, packing=False, **kw)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Tokenizer, train and held-out data, and a teacher trained briefly on them."""
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    train = write_records(root / "train.jsonl", rng, 160)
    heldout = write_records(root / "heldout.jsonl", rng, 32)
    build_tokenizer([markov_text(rng, 40) for _ in range(50)], root / "tokenizer", vocab_size=262)
    tokenizer = postax.load_tokenizer(root / "tokenizer")
    teacher = postax.build_model(postax.ModelConfig(**TEACHER), seed=3)
    trainer = Trainer(
        teacher,
        SFTAlgorithm(),
        config=TrainerConfig(steps=150, progress=False),
        optimizer=ADAM,
    )
    batches = SFTDataset(data(train), tokenizer).iterator()
    for _ in range(150):
        trainer.train_step(next(batches).as_dict())
    postax.save_model(trainer.model, root / "teacher")
    return {
        "root": root,
        "tokenizer": str(root / "tokenizer"),
        "train": train,
        "heldout": heldout,
        "teacher": str(root / "teacher"),
    }


def config(task, name: str, *, steps: int = 40, **kw) -> distill.DistillConfig:
    defaults = dict(
        output_dir=str(task["root"] / name),
        model=ModelSource(config=postax.ModelConfig(**STUDENT), seed=1),
        teacher=ModelSource(path=task["teacher"]),
        tokenizer=task["tokenizer"],
        data=data(task["train"]),
        eval_data=data(task["heldout"], shuffle=False),
        trainer=TrainerConfig(steps=steps, log_every=10, progress=False),
        optimizer=ADAM,
        export=False,
    )
    return distill.DistillConfig(**{**defaults, **kw})


def read_metrics(output_dir: str) -> list[dict]:
    with open(f"{output_dir}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def per_token(row: dict, name: str) -> float:
    return row[f"{name}_sum"] / row["loss_tokens"]


# ------------------------------------------------------------------ divergences by hand


def np_softmax(x, temperature=1.0):
    z = np.asarray(x, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    p, q = np.broadcast_arrays(p, q)
    safe_p, safe_q = np.where(p > 0, p, 1), np.where(p > 0, q, 1)
    return np.sum(np.where(p > 0, p * np.log(safe_p / safe_q), 0.0), -1)


def np_divergence(kind, p, q, beta=0.5):
    if kind == "forward_kl":
        return np_kl(p, q)
    if kind == "reverse_kl":
        return np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


@pytest.fixture(scope="module")
def logits():
    rs = np.random.RandomState(0)
    return (rs.randn(3, 5, 11) * 2).astype(np.float32), (rs.randn(3, 5, 11) * 2).astype(np.float32)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergences_match_numpy(logits, kind, temperature):
    student, teacher = logits
    p, q = np_softmax(teacher, temperature), np_softmax(student, temperature)
    expected = temperature**2 * np_divergence(kind, p, q, beta=0.3)
    ours = token_divergence(student, teacher, divergence=kind, beta=0.3, temperature=temperature)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-6)

    # top-k: the teacher renormalised over its k largest logits
    k = 4
    ids = np.argsort(-teacher, axis=-1)[..., :k]
    values = np.take_along_axis(teacher, ids, -1)
    truncated = np.zeros_like(p)
    np.put_along_axis(truncated, ids, np_softmax(values, temperature), -1)
    if kind == "reverse_kl":  # the student renormalised over the same ids
        q_k = np.take_along_axis(q, ids, -1)
        q_k = q_k / q_k.sum(-1, keepdims=True)
        by_hand = np_kl(q_k, np.take_along_axis(truncated, ids, -1))
    else:  # the exact divergence to the full-vocabulary student
        by_hand = np_divergence(kind, truncated, q, beta=0.3)
    ours = topk_token_divergence(
        student, values, ids, divergence=kind, beta=0.3, temperature=temperature
    )
    np.testing.assert_allclose(ours, temperature**2 * by_hand, rtol=2e-5, atol=1e-6)
    # k = vocabulary: no truncation
    full_ids = np.argsort(-teacher, axis=-1)
    full = topk_token_divergence(
        student,
        np.take_along_axis(teacher, full_ids, -1),
        full_ids,
        divergence=kind,
        beta=0.3,
        temperature=temperature,
    )
    np.testing.assert_allclose(full, expected, rtol=2e-5, atol=1e-6)


def test_jsd_limits_are_the_scaled_kls(logits):
    student, teacher = logits
    forward = token_divergence(student, teacher, divergence="forward_kl")
    reverse = token_divergence(student, teacher, divergence="reverse_kl")
    small = token_divergence(student, teacher, divergence="jsd", beta=1e-5)
    large = token_divergence(student, teacher, divergence="jsd", beta=1 - 1e-5)
    np.testing.assert_allclose(small / 1e-5, forward, rtol=1e-2)
    np.testing.assert_allclose(large / 1e-5, reverse, rtol=1e-2)
    middle = token_divergence(student, teacher, divergence="jsd", beta=0.5)
    assert np.all(middle <= np.log(2) + 1e-6) and np.all(middle >= 0)


def test_temperature_squared_keeps_the_gradient_scale(logits):
    student, teacher = logits

    def grad(t):
        return jax.grad(lambda s: token_divergence(s, teacher, temperature=t).sum())(student)

    # d/dz of T^2 KL(p_T || q_T) = T (q_T - p_T) exactly ...
    t = 3.0
    expected = t * (np_softmax(student, t) - np_softmax(teacher, t))
    np.testing.assert_allclose(grad(t), expected, rtol=1e-4, atol=1e-6)
    # ... which tends to (z - v) / V, centred, as T grows: independent of T (Hinton et al.)
    diff = student - teacher
    limit = (diff - diff.mean(-1, keepdims=True)) / student.shape[-1]
    for t in (200.0, 400.0):
        np.testing.assert_allclose(grad(t), limit, atol=0.01 * np.abs(limit).max())
    # without the T^2 factor the gradient would shrink as 1/T^2
    assert np.abs(grad(400.0)).mean() == pytest.approx(np.abs(grad(10.0)).mean(), rel=0.01)


def test_attention_and_feature_terms_by_hand():
    attention = jax.jit(attention_divergence, static_argnames="heads")
    features = jax.jit(feature_distance, static_argnames="pooling")
    rs = np.random.RandomState(1)
    s = np_softmax(rs.randn(2, 2, 4, 4))  # student: 2 heads
    t = np_softmax(rs.randn(2, 3, 4, 4))  # teacher: 3 heads
    s[..., -1] = 0  # a key the student cannot see ...
    t[..., -1] = 0  # ... nor the teacher
    s, t = s / s.sum(-1, keepdims=True), t / t.sum(-1, keepdims=True)
    expected = np_kl(t.mean(1), s.mean(1))
    np.testing.assert_allclose(attention(s, t), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="equal head counts"):
        attention_divergence(s, t, heads="per_head")
    same = np_softmax(rs.randn(2, 2, 4, 4))
    same[..., -1] = 0
    same = same / same.sum(-1, keepdims=True)
    per_head = np_kl(same, s).mean(1)
    np.testing.assert_allclose(attention(s, same, heads="per_head"), per_head, rtol=1e-5)

    fs, ft = rs.randn(2, 5, 3).astype(np.float32), rs.randn(2, 5, 3).astype(np.float32)
    np.testing.assert_allclose(features(fs, ft), ((fs - ft) ** 2).mean(-1), rtol=1e-6, atol=1e-7)
    segments = np.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]], np.float32)
    pooled = np.asarray(features(fs, ft, loss_mask=mask, segment_ids=segments, pooling="mean"))
    for row, positions in ((0, [0, 1]), (0, [3]), (1, [1, 2, 3])):
        error = ((fs[row, positions].mean(0) - ft[row, positions].mean(0)) ** 2).mean()
        np.testing.assert_allclose(pooled[row, positions], error, rtol=1e-5)
    for row in (0, 1):  # a row alone (a micro-batch) gives its positions the same values
        alone = features(
            fs[row : row + 1],
            ft[row : row + 1],
            loss_mask=mask[row : row + 1],
            segment_ids=segments[row : row + 1],
            pooling="mean",
        )
        np.testing.assert_allclose(alone[0], pooled[row], rtol=1e-6)


def test_intermediates_expose_layers_without_changing_the_forward_pass():
    model = postax.build_model(postax.ModelConfig(**TEACHER), seed=0)
    rs = np.random.RandomState(0)
    tokens = jnp.asarray(rs.randint(0, VOCAB, (2, 12)), jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], jnp.int32)

    @nnx.jit
    def both(model, tokens, segments):
        out = model.intermediates(
            tokens, hidden_layers=(0, 1), attention_layers=(0,), segment_ids=segments
        )
        final = model.model.norm(out.layer_hidden[1])
        return out, final, model.hidden_states(tokens, segment_ids=segments)

    out, final, hidden = both(model, tokens, segments)
    np.testing.assert_allclose(out.hidden, hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.hidden, final, atol=1e-6)
    assert sorted(out.layer_hidden) == [0, 1] and sorted(out.attention) == [0]
    probs = np.asarray(out.attention[0])
    assert probs.shape == (2, TEACHER["num_heads"], 12, 12)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(probs, 1) == 0)  # causal
    assert np.all(probs[0, :, 7:, :7] == 0)  # segments never see each other
    with pytest.raises(ValueError, match="attention_layers"):
        model.intermediates(tokens, attention_layers=(1,))


# ------------------------------------------------------------------ training


def distiller_trainer(
    task,
    loss: DistillLossConfig,
    *,
    micro_batches: int = 1,
    chunk_size: int = 0,
    learning_rate: float = 1e-2,
    with_teacher: bool = True,
):
    """A Trainer on the recipe's Distiller (student seed 1, the task's teacher) and the
    training data's iterator."""
    cfg = config(task, "pieces", loss=loss)
    student = distill.build_causal_lm(cfg.model)
    teacher = distill.build_causal_lm(cfg.teacher) if with_teacher else None
    trainer = Trainer(
        distill.build_distiller(cfg, student, teacher),
        distill.DistillAlgorithm(loss, chunk_size=chunk_size),
        config=TrainerConfig(steps=100, micro_batches=micro_batches, progress=False),
        optimizer=dataclasses.replace(ADAM, learning_rate=learning_rate),
        wrt=teachers.TRAINED,
    )
    dataset = SFTDataset(cfg.data, postax.load_tokenizer(task["tokenizer"]))
    return trainer, dataset.iterator()


def trained_arrays(trainer, *path) -> dict[str, np.ndarray]:
    """Parameters of the trainer's module by path (under `path`), copied to the host."""
    state = nnx.state(trainer.model, nnx.Param)
    return {
        "/".join(map(str, p)): np.array(v.get_value())
        for p, v in nnx.to_flat_state(state)
        if tuple(map(str, p[: len(path)])) == path
    }


def held_out_kl(task):
    """student -> (forward KL(teacher || student), NLL) per trained held-out token, at T = 1."""
    tokenizer = postax.load_tokenizer(task["tokenizer"])
    dataset = SFTDataset(data(task["heldout"], shuffle=False), tokenizer)
    batches = [b.as_dict() for b in dataset.iterator(num_epochs=1)]
    teacher_graph, teacher_state = nnx.split(postax.load_model(task["teacher"]))
    student_graph = nnx.graphdef(postax.build_model(postax.ModelConfig(**STUDENT), seed=1))
    algorithm = distill.DistillAlgorithm(DistillLossConfig())

    @jax.jit
    def sums(student_state, batch):
        model = teachers.Distiller(
            nnx.merge(student_graph, student_state),
            nnx.merge(teacher_graph, teacher_state),
            rngs=nnx.Rngs(0),
        )
        _, metrics = algorithm.loss(model, batch, algorithm.normalizer(batch), None)
        return metrics

    def measure(student) -> tuple[float, float]:
        state = jax.tree.map(np.asarray, nnx.state(student))  # host arrays: one compilation
        totals = [jax.device_get(sums(state, b)) for b in batches]
        tokens = sum(float(t["loss_tokens"]) for t in totals)
        return tuple(
            sum(float(t[k]) for t in totals) / tokens for k in ("divergence_sum", "nll_sum")
        )

    return measure


STEPS = 60


@pytest.fixture(scope="module")
def distilled(task):
    """A student distilled with forward KL for STEPS steps; its first batch, the metrics of
    its first step and its parameters before and after that step."""
    trainer, batches = distiller_trainer(task, DistillLossConfig())
    batch = next(batches).as_dict()
    before = trained_arrays(trainer)
    metrics = jax.device_get(trainer.train_step(batch))
    after = trained_arrays(trainer)
    for _ in range(STEPS - 1):
        trainer.train_step(next(batches).as_dict())
    return trainer, batch, metrics, before, after


def test_distilled_student_beats_hard_labels(task, distilled):
    measure = held_out_kl(task)
    before, _ = measure(postax.build_model(postax.ModelConfig(**STUDENT), seed=1))
    # the same student trained on hard labels alone (no teacher in its training step)
    trainer, batches = distiller_trainer(
        task, DistillLossConfig(hard_label_weight=1.0), with_teacher=False
    )
    for _ in range(STEPS):
        trainer.train_step(next(batches).as_dict())
    after = {
        "distilled": measure(distilled[0].model.student),
        "hard": measure(trainer.model.student),
    }
    print(
        f"held-out (KL(teacher || student), NLL): before {before:.4f}, after {STEPS} steps {after}"
    )
    assert after["distilled"][0] < 0.2 * before
    assert after["distilled"][0] < 0.75 * after["hard"][0]


def test_micro_batching_and_chunked_logits_change_neither_loss_nor_update(task, distilled):
    """Two micro-batches and logits in chunks of 4 positions: the same step as one of each."""
    _, batch, m1, before, p1 = distilled
    trainer, _ = distiller_trainer(task, DistillLossConfig(), micro_batches=2, chunk_size=4)
    assert all(np.array_equal(v, before[k]) for k, v in trained_arrays(trainer).items())
    m2 = jax.device_get(trainer.train_step(batch))
    p2 = trained_arrays(trainer)
    for key in ("loss", "grad_norm", "divergence_sum", "nll_sum"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5), key
    assert m1["loss_tokens"] == m2["loss_tokens"]
    # Adam divides by sqrt(v): a near-zero gradient's rounding differences (summation
    # order) become update differences up to ~1e-2 of the learning rate (1e-2).
    for name in p1:
        np.testing.assert_allclose(p1[name], p2[name], rtol=1e-5, atol=1e-4, err_msg=name)


def test_feature_and_attention_transfer_train_the_projection_and_match_maps(task):
    loss = DistillLossConfig(
        divergence="jsd",
        temperature=2.0,
        hard_label_weight=0.5,
        attention_weight=1.0,
        attention_layers=((0, 0),),  # 2 student heads, 4 teacher heads: head-averaged maps
        feature_weight=1.0,
        feature_layers=((1, 1),),  # widths 32 -> 48: a learned projection
        feature_pooling="mean",
    )
    trainer, batches = distiller_trainer(task, loss)
    before = trained_arrays(trainer)
    names = [k for k in before if k.startswith("projections/")]
    assert names == ["projections/student1_teacher1/weight"]
    rows = [jax.device_get(trainer.train_step(next(batches).as_dict())) for _ in range(40)]
    attention = [per_token(r, "attention") for r in rows]  # before each step's update
    feature = [per_token(r, "feature") for r in rows]
    print(f"attention KL {attention[0]:.4f} -> {np.mean(attention[-5:]):.4f}")
    print(f"feature MSE {feature[0]:.4f} -> {np.mean(feature[-5:]):.4f}")
    assert np.mean(attention[-5:]) < 0.6 * attention[0]
    assert np.mean(feature[-5:]) < 0.6 * feature[0]
    after = trained_arrays(trainer)
    assert np.abs(after[names[0]] - before[names[0]]).max() > 1e-2
    teacher = trained_arrays(trainer, "teacher")
    assert teacher and all(np.array_equal(v, before[k]) for k, v in teacher.items())  # frozen


def test_on_policy_distillation_lowers_the_reverse_kl(task):
    cfg = config(
        task,
        "gkd",
        steps=20,
        loss=DistillLossConfig(divergence="reverse_kl"),
        on_policy=distill.OnPolicyConfig(fraction=1.0, max_new_tokens=12),
        eval_data=None,
        optimizer=dataclasses.replace(ADAM, learning_rate=1e-2),
    )
    summary = distill.run(cfg)
    assert summary["on_policy_fraction"] == 1.0
    rows = read_metrics(cfg.output_dir)
    assert len(rows) == 20 and all(r["on_policy_count"] == 8 for r in rows)
    kl = [per_token(r, "divergence") for r in rows]
    print(f"on-policy reverse KL {np.mean(kl[:3]):.4f} -> {np.mean(kl[-5:]):.4f}")
    assert np.mean(kl[-5:]) < 0.7 * np.mean(kl[:3])


def test_on_policy_mix_follows_its_seeded_coin(task):
    tokenizer = postax.load_tokenizer(task["tokenizer"])
    dataset = SFTDataset(data(task["train"]), tokenizer)
    calls = []

    def generate(prompts, step):
        calls.append(step)
        return [[5, 6, 7]] * len(prompts)

    mix = OnPolicyMix(dataset, dataset.iterator(), generate, fraction=0.5, max_new_tokens=4, seed=3)
    batches = [next(mix).as_dict() for _ in range(20)]
    flags = [b["on_policy"][0] for b in batches]
    assert calls == [s for s, f in enumerate(flags) if f] and 0 < len(calls) < 20
    sampled = batches[calls[0]]
    ids, labels = dataset.document(0)
    prompt = prompt_ids(ids, labels)
    assert len(prompt) == int(np.flatnonzero(labels)[0])  # the 3 letters (tokenised)
    assert sampled["loss_mask"].sum(1).tolist() == [3] * 8  # the completion only
    state = mix.state()
    again = OnPolicyMix(
        dataset, dataset.iterator(), generate, fraction=0.5, max_new_tokens=4, seed=3
    )
    again.restore(state)
    np.testing.assert_array_equal(next(again).as_dict()["tokens"], next(mix).as_dict()["tokens"])


def test_top_k_cache_is_written_once_reused_and_recomputed_for_a_new_teacher(task):
    loss = DistillLossConfig(divergence="jsd", top_k=8)
    cfg = config(task, "cache", loss=loss, teacher_logits="cache")
    tokenizer = postax.load_tokenizer(task["tokenizer"])
    dataset = SFTDataset(cfg.data, tokenizer)
    teacher = postax.load_model(task["teacher"])
    cache, computed = distill.cached_teacher(cfg, teacher, dataset)
    assert computed is True and cache.values.shape == (dataset.num_rows, 16, 8)
    again, computed = distill.cached_teacher(cfg, postax.load_model(task["teacher"]), dataset)
    assert computed is False and again.path == cache.path
    other = postax.build_model(postax.ModelConfig(**TEACHER), seed=7)
    changed, computed = distill.cached_teacher(cfg, other, dataset)
    assert computed is True and changed.path != cache.path
    other_data = SFTDataset(dataclasses.replace(cfg.data, path=task["heldout"]), tokenizer)
    moved, computed = distill.cached_teacher(cfg, teacher, other_data)
    assert computed is True and moved.path not in (cache.path, changed.path)
    names = [p.name for p in cache.path.parent.iterdir()]
    assert len(names) == 3 and not any(n.endswith(".tmp") for n in names)

    # The cached top-k gives the loss of the teacher run on the fly with the same k.
    batch = next(teachers.TopKIterator(dataset.iterator(), dataset, cache)).as_dict()
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    plain = {k: v for k, v in batch.items() if k not in teachers.TOPK_ENTRIES}
    student = postax.build_model(postax.ModelConfig(**STUDENT), seed=1)
    algorithm = distill.DistillAlgorithm(loss)

    @nnx.jit
    def losses(student, teacher):
        cached = teachers.Distiller(student, None, rngs=nnx.Rngs(0))
        live = teachers.Distiller(student, teacher, rngs=nnx.Rngs(0))
        return (
            algorithm.loss(cached, batch, algorithm.normalizer(batch), None)[0],
            algorithm.loss(live, plain, algorithm.normalizer(plain), None)[0],
        )

    cached_loss, live_loss = map(float, losses(student, teacher))
    assert cached_loss == pytest.approx(live_loss, rel=1e-5)


def test_command_line_runs_the_tiny_config_with_overrides(tmp_path, monkeypatch):
    from postax.cli import main as postax_main

    monkeypatch.chdir(ROOT)
    # the YAML's student made as small as the other students here (and the teacher alike)
    small = dict(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    student = load_config(distill.DistillConfig, "configs/distill/tiny.yaml").model.config
    teacher = postax.build_model(
        dataclasses.replace(student, **small, layer_types=("full_attention",)), seed=0
    )
    postax.save_model(teacher, tmp_path / "teacher")
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"teacher.path={tmp_path / 'teacher'}",
        f"data.path={tmp_path / 'head.jsonl'}",
        "data.seq_len=32",
        "data.batch_size=4",
        "eval_data=null",
        "teacher_logits=cache",
        "loss.top_k=8",
        *(f"model.config.{k}={v}" for k, v in small.items()),
        "trainer.steps=2",
        "trainer.progress=false",
    ]
    lines = (ROOT / "examples/sft_tiny/train.jsonl").read_text().splitlines()[:16]
    (tmp_path / "head.jsonl").write_text("\n".join(lines) + "\n")
    assert postax_main(["distill", "--config", "configs/distill/tiny.yaml", *overrides]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert summary["teacher_cache_computed"] is True
    assert Path(summary["teacher_cache"]).parent == tmp_path / "run" / "teacher"
    assert (tmp_path / "run" / "final" / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ("loss.divergence=kl", "loss.divergence"),
        ("loss.beta=1.5", "loss.beta"),
        ("loss.temperature=0", "loss.temperature"),
        ("loss.hard_label_weight=2", "loss.hard_label_weight"),
        ("loss.attention_weight=1.0", "loss.attention_layers"),
        ("loss.feature_layers=[[1]]", "loss.feature_layers"),
        ("teacher_logits=disk", "teacher_logits"),
        ("teacher_logits=cache", "loss.top_k"),
        ("on_policy.fraction=1.5", "on_policy.fraction"),
        ("on_policy.max_new_tokens=0", "on_policy.max_new_tokens"),
    ],
)
def test_bad_config_values_name_the_field(override, field):
    with pytest.raises(ConfigFileError, match=rf"{field}=.* is invalid"):
        load_config(distill.DistillConfig, ROOT / "configs/distill/tiny.yaml", [override])


def test_teacher_with_another_vocabulary_is_refused(task):
    other = postax.ModelConfig(**{**TEACHER, "vocab_size": VOCAB + 8})
    cfg = config(task, "vocab", teacher=ModelSource(config=other))
    with pytest.raises(ConfigError, match=rf"teacher vocab_size={VOCAB + 8} .*vocab_size={VOCAB}"):
        distill.run(cfg)
    bad_layers = dataclasses.replace(
        cfg,
        teacher=ModelSource(path=task["teacher"]),
        loss=DistillLossConfig(attention_weight=1.0, attention_layers=((0, 1),)),
    )
    with pytest.raises(ConfigError, match="teacher layer 1 does not exist"):
        distill.run(bad_layers)
