"""One process of a (possibly) multi-process tiny GRPO and PPO run; tests/test_multiprocess_rl.py
starts it.

    python tests/scripts/multiprocess_rl.py OUT DATA --process-id I --num-processes N --port P

DATA holds the arithmetic example (train.jsonl, eval.jsonl, tokenizer/). With N > 1 the
process joins a local coordinator at 127.0.0.1:P through the recipe's `distributed:` section
(gloo collectives on CPU); set XLA_FLAGS=--xla_force_host_platform_device_count=K for K
devices per process. The mesh is fsdp=4 x tensor=2 (8 devices in all).

GRPO: `postax grpo` (`grpo.run`) for 2 iterations of 4 prompts x 4 samples, with the KL in
the loss (a reference scoring pass), recomputed old log-probs (a policy scoring pass), 2
minibatches (rows shuffled across the processes' blocks) and a held-out evaluation before
and after; the export writes OUT/final. Every process writes OUT/seen-I.json: the (prompt,
completion, reward) its reward function scored, in order, and the advantages of each
iteration as the recipe computed them (a wrapper around `grpo.compute_advantages`: the test's
seam, the recipe is unchanged). Then the same run asked for 3 iterations resumes from the
checkpoint of the second (every process restores its part) and runs the third: OUT/resumed-I.json
holds what its reward function scored (the third iteration, the evaluation after) and
`summary["resumed"]`.

PPO with `env:` episodes, in the same processes (no second start-up or join): `postax ppo`
(`ppo.run`) into OUT/ppo for 2 iterations of 4 prompts x 4 episodes of `DigitsEnv` (two turns,
each rewarded with its share of digits, "Again." between them; the turn rewards on each turn's
last token); a value head with random initial weights, so the values are not 0; the KL in the
reward: a reference scoring pass; recomputed old log-probs; 1 epoch of 2 minibatches; Adam at
1e-3; no held-out evaluation or export, which are GRPO's code, tested above. OUT/ppo-I.json
holds every turn the process's environments stepped and, per iteration, the values,
advantages and returns the recipe computed (a wrapper around `ppo.gae_targets`). Then the same command runs again: it
restores the last checkpoint and has nothing left to run. Process 0 writes OUT/ppo-params.npz
and OUT/ppo-restored.npz, every trained parameter (policy and value head) at the end of the
run and as restored (the trainers caught by a wrapper around `ppo.make_rl_trainer`, their
state gathered).

On-policy distillation, in the same processes: `postax distill` (`distill.run`) into
OUT/distill, 3 steps of 8 prompts of the training file (`on_policy.fraction` 0.7, seed 0: steps
0 and 2 on-policy, step 1 the dataset's), a teacher of the same shape with other weights, on
the fly, SGD. OUT/distill-I.json holds every completion `generate` returned (all 8 prompts', on
every process), the blocks of prompts the process sampled itself and the final loss; process 0
writes OUT/distill-params.npz, the student's parameters at the end, and exports the student to
OUT/distill/final.

Episodes, in the same processes: `postax grpo` with `env:` (`DigitsEnv`: two turns, each
rewarded with its share of digits, "Again." between them) into OUT/episodes, 2 iterations of 4
prompts x 4 episodes and 8 greedy held-out episodes before and after. OUT/episodes-I.json holds
every turn the process's environments stepped (prompt, turn, text, reward), the advantages and
the held-out results.

Asynchronous rollouts, in the same processes: `postax grpo` with `rollout.max_staleness: 1`
(the importance-corrected loss) into OUT/async, 3 iterations (the third batch sampled by the
weights after the first) and a held-out evaluation every 2 (the second while the producer
thread samples the third batch). OUT/async-I.json holds what the reward function scored (in
the producer thread: marked with its name), the advantages, the run summary and the threads
that ran a cross-process collective (`process_allgather`, recorded by a wrapper).

Image prompts, in the same processes: `postax grpo` on a tiny random Gemma 3 vision-language
model (tests/image_fixtures.py) into OUT/images, 2 iterations of 4 image prompts x 2 samples
(rewards: completion lengths) and 6 held-out image prompts before and after, over an fsdp=8
mesh. OUT/images-I.json holds what the reward function scored, the advantages and the
held-out results.

Pairs, in the same processes: `postax preference` (DPO, its reference cache) into OUT/dpo and
`postax reward-model` into OUT/reward, 2 SGD steps each over the first 32 pairs of
examples/preference_tiny in batches of 8, each exported to OUT/<run>/final (process 0, gathered weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
from pathlib import Path

import jax
import numpy as np

SEEN: list[dict] = []


def digits(prompts, completions, **fields):
    """The share of digits in each completion (rewards vary), recording what it scores."""
    scores = [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
    thread = threading.current_thread().name
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        SEEN.append({"prompt": prompt, "completion": completion, "reward": score})
        if thread != "MainThread":
            SEEN[-1]["thread"] = thread
    return scores


class DigitsEnv:
    """A two-turn environment for the episodes run: each turn's reward is the share of digits
    in it (`digits`), "Again." between the turns; records what it saw in SEEN."""

    def reset(self, example):
        self.prompt, self.turn = example["prompt"], 0
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, text):
        (score,) = digits([self.prompt], [str(text)])
        SEEN[-1]["turn"] = self.turn
        self.turn += 1
        return ("Again.", score, self.turn == 2, {})


def lengths(prompts, completions, **fields):
    """The completion's length in characters / 10 (rewards vary), recording what it scores."""
    scores = [len(c) / 10 for c in completions]
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        SEEN.append({"prompt": prompt, "completion": completion, "reward": score})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("data")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    import postax
    from postax.losses.policy import PolicyLossConfig
    from postax.parallel import DistributedConfig, MeshConfig
    from postax.recipes import grpo
    from postax.recipes.common import CheckpointSettings, ModelSource
    from postax.recipes.rl_common.config import EvalConfig, RunSettings, UpdateConfig
    from postax.rl.producer import RolloutConfig
    from postax.rl.prompts import PromptDataConfig
    from postax.rl.rewards import RewardConfig
    from postax.train.optim import OptimizerConfig

    advantages: list[list] = []
    compute = grpo.compute_advantages

    def recorded(*a, **kw):
        out = compute(*a, **kw)
        advantages.append(np.asarray(out).tolist())
        return out

    grpo.compute_advantages = recorded

    data = Path(args.data)
    distributed = DistributedConfig()
    if args.num_processes > 1:
        distributed = DistributedConfig(
            coordinator=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    model = dict(
        family="llama",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    cfg = grpo.GRPOConfig(
        output_dir=args.out,
        tokenizer=str(data / "tokenizer"),
        model=ModelSource(config=postax.ModelConfig(**model), seed=0),
        data=PromptDataConfig(path=str(data / "train.jsonl"), batch_size=4),
        eval_data=PromptDataConfig(path=str(data / "eval.jsonl"), batch_size=4),
        eval=EvalConfig(every=0),
        rewards=(RewardConfig(name=f"{__name__}:digits", label="digits", timeout=None),),
        iterations=2,
        rollout=RolloutConfig(samples_per_prompt=4, max_new_tokens=8, temperature=1.0),
        policy=PolicyLossConfig(kl_coef=0.05),
        update=UpdateConfig(minibatches=2, old_logprobs="recompute"),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        checkpoint=CheckpointSettings(async_save=False),
        run=RunSettings(progress=False, mesh=MeshConfig(fsdp=4, tensor=2)),
        distributed=distributed,
        export=True,
    )
    grpo.run(cfg)
    pid = jax.process_index()
    check_local_copy(Path(args.out), pid)
    seen = {"seen": SEEN, "advantages": advantages}
    (Path(args.out) / f"seen-{pid}.json").write_text(json.dumps(seen))
    if pid == 0:  # the resumed run writes its own summary (no evaluation before)
        out = Path(args.out)
        (out / "summary-first.json").write_text((out / "summary.json").read_text())
    # the same command asked for a third iteration: resumes from the checkpoint of the second
    SEEN.clear()
    advantages.clear()
    summary = grpo.run(dataclasses.replace(cfg, iterations=3))
    resumed = {"seen": SEEN, "advantages": advantages, "resumed": summary["resumed"]}
    (Path(args.out) / f"resumed-{pid}.json").write_text(json.dumps(resumed))

    run_ppo(cfg, Path(args.out), pid)
    run_distill(cfg, data, Path(args.out), pid)
    advantages.clear()
    run_episodes(cfg, Path(args.out), pid, advantages)
    advantages.clear()
    run_async(cfg, Path(args.out), pid, advantages)
    advantages.clear()
    run_images(cfg, Path(args.out), pid, advantages)
    run_pairs(cfg, Path(args.out), pid)


def check_local_copy(out: Path, pid: int) -> None:
    """`processes.local_copy` of arrays on the run's global mesh (fsdp=4 x tensor=2): written
    to OUT/local-copy-I.json, whether it took the device path (`process_mesh`), the shapes of
    the arrays it sent through the host, each copy's devices and spec, and whether its values
    equal the global array's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from postax.parallel import MeshConfig, make_mesh
    from postax.train.processes import gather_to_host, local_copy, process_mesh

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)

    def placed(host: np.ndarray, spec: P) -> jax.Array:  # each process its own shards
        return jax.make_array_from_callback(
            host.shape, NamedSharding(mesh, spec), lambda index: host[index]
        )

    tree = {
        "sharded": placed(values, P("fsdp", "tensor")),
        "replicated": placed(values[0], P()),
        "key": jax.random.wrap_key_data(placed(np.asarray([0, 3], np.uint32), P())),
    }
    from postax.train import processes

    through_host = []  # the arrays local_copy sends through the host
    gather = processes.gather_to_host
    processes.gather_to_host = lambda x: through_host.append(x.shape) or gather(x)
    try:
        copy = local_copy(tree, mesh)
    finally:
        processes.gather_to_host = gather
    report = {"device_path": process_mesh(mesh) is not None, "through_host": through_host}
    for name, array in copy.items():
        data = jax.random.key_data(array) if name == "key" else array
        original = jax.random.key_data(tree[name]) if name == "key" else tree[name]
        report[name] = {
            "local": {d.process_index for d in array.sharding.device_set} == {pid},
            "devices": len(array.sharding.device_set),
            "spec": [str(axis) for axis in array.sharding.spec],
            "equal": bool(np.array_equal(np.asarray(data), gather_to_host(original))),
        }
    (out / f"local-copy-{pid}.json").write_text(json.dumps(report))


def run_ppo(grpo_cfg, out: Path, pid: int) -> None:
    """PPO over the same data, model, mesh and processes (see the module docstring)."""
    from flax import nnx

    from postax.recipes import ppo
    from postax.recipes.common import gathered
    from postax.recipes.rl_common.config import UpdateConfig
    from postax.rl.envs.config import EnvConfig
    from postax.train.optim import OptimizerConfig

    targets: list[dict] = []
    gae_targets = ppo.gae_targets

    def recorded(cfg, rewards, rows, kl, token_rewards=None):
        advantages, returns = gae_targets(cfg, rewards, rows, kl, token_rewards)
        targets.append(
            {
                "values": np.asarray(rows["old_values"]).tolist(),
                "advantages": np.asarray(advantages).tolist(),
                "returns": np.asarray(returns).tolist(),
            }
        )
        return advantages, returns

    trainers: list = []
    make_rl_trainer = ppo.make_rl_trainer

    def caught(*a, **kw):
        trainers.append(make_rl_trainer(*a, **kw))
        return trainers[-1]

    ppo.gae_targets, ppo.make_rl_trainer = recorded, caught
    cfg = ppo.PPOConfig(
        output_dir=str(out / "ppo"),
        tokenizer=grpo_cfg.tokenizer,
        model=grpo_cfg.model,
        data=grpo_cfg.data,
        env=EnvConfig(name=f"{__name__}:DigitsEnv", max_turns=3, max_turn_tokens=6),
        iterations=2,
        rollout=grpo_cfg.rollout,
        value=ppo.ValueConfig(head_std=0.05),
        update=UpdateConfig(epochs=1, minibatches=2, old_logprobs="recompute"),
        # Adam at 3e-3 put rare tokens' embedding rows 9.5e-7 apart (tiny gradients, scaled up)
        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
        checkpoint=grpo_cfg.checkpoint,
        run=grpo_cfg.run,
        distributed=grpo_cfg.distributed,
        export=False,
    )
    SEEN.clear()
    first = ppo.run(cfg)
    ran = {"seen": list(SEEN), "targets": list(targets), "resumed": first["resumed"]}
    again = ppo.run(cfg)  # restores the checkpoint of iteration 2: nothing left to run
    ran["resumed_again"] = again["resumed"]
    (out / f"ppo-{pid}.json").write_text(json.dumps(ran))
    for name, trainer in zip(("ppo-params", "ppo-restored"), trainers, strict=True):
        params = nnx.state(gathered(trainer.model), nnx.Param)  # a collective: every process
        if pid == 0:
            flat = {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
            np.savez(out / f"{name}.npz", **flat)


def run_distill(grpo_cfg, data: Path, out: Path, pid: int) -> None:
    """On-policy distillation over the same model shape, mesh and processes (see the module
    docstring)."""
    from flax import nnx

    from postax.data import DataConfig
    from postax.recipes import distill
    from postax.recipes.common import ModelSource, gathered
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import TrainerConfig

    sampled: list = []
    student_sampler = distill.student_sampler

    def recording(*a, **kw):
        generate = student_sampler(*a, **kw)

        def recorded(prompts, step):
            completions = generate(prompts, step)
            sampled.append([list(map(int, c)) for c in completions])
            return completions

        return recorded

    trainers: list = []
    make_trainer = distill.make_trainer

    def caught(*a, **kw):
        trainers.append(make_trainer(*a, **kw))
        return trainers[-1]

    shares: list = []
    process_share = distill.process_share

    def share(count, *a):
        block = process_share(count, *a)
        shares.append([block.start, block.stop])
        return block

    distill.student_sampler, distill.make_trainer = recording, caught
    distill.process_share = share
    student = grpo_cfg.model
    cfg = distill.DistillConfig(
        output_dir=str(out / "distill"),
        tokenizer=grpo_cfg.tokenizer,
        model=student,
        teacher=ModelSource(config=student.config, seed=1),
        data=DataConfig(path=str(data / "train.jsonl"), seq_len=24, batch_size=8),
        trainer=TrainerConfig(
            steps=3, log_every=1, progress=False, mesh=grpo_cfg.run.mesh, scan_layers=False
        ),
        on_policy=distill.OnPolicyConfig(fraction=0.7, max_new_tokens=8, seed=0),
        # SGD: Adam's step on a rare token's tiny gradient (|g| ~ eps) magnifies its float
        # rounding (one embedding entry 2e-6 apart at 1e-3, 6e-6 at 3e-3)
        optimizer=OptimizerConfig(
            name="sgd", learning_rate=1.0, beta1=0.0, schedule="constant", max_grad_norm=None
        ),
        checkpoint=grpo_cfg.checkpoint,
        distributed=grpo_cfg.distributed,
        export=True,  # OUT/distill/final, written by process 0 from the gathered weights
    )
    summary = distill.run(cfg)
    ran = {"sampled": sampled, "shares": shares, "final_loss": summary["final_loss"]}
    (out / f"distill-{pid}.json").write_text(json.dumps(ran))
    params = nnx.state(gathered(trainers[0].model.student), nnx.Param)  # a collective
    if pid == 0:
        flat = {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
        np.savez(out / "distill-params.npz", **flat)


def run_episodes(grpo_cfg, out: Path, pid: int, advantages: list) -> None:
    """GRPO with `env:` (`DigitsEnv`, two turns) over the same model, mesh and processes (see
    the module docstring)."""
    from postax.recipes import grpo
    from postax.rl.envs.config import EnvConfig

    SEEN.clear()
    cfg = dataclasses.replace(
        grpo_cfg,
        output_dir=str(out / "episodes"),
        rewards=(),
        env=EnvConfig(name=f"{__name__}:DigitsEnv", max_turns=3, max_turn_tokens=6),
        export=False,
    )
    summary = grpo.run(cfg)
    evals = {k: summary[k] for k in ("eval_before", "eval_after")}
    ran = {"seen": list(SEEN), "advantages": advantages, "evals": evals}
    (out / f"episodes-{pid}.json").write_text(json.dumps(ran))


def run_async(grpo_cfg, out: Path, pid: int, advantages: list) -> None:
    """GRPO with asynchronous rollouts (`rollout.max_staleness: 1`) over the same model, mesh
    and processes (see the module docstring)."""
    from jax.experimental import multihost_utils

    from postax.losses.policy import PolicyLossConfig
    from postax.recipes import grpo
    from postax.recipes.rl_common.config import EvalConfig

    collectives: set[str] = set()  # the threads that ran a cross-process collective
    allgather = multihost_utils.process_allgather

    def recorded(*a, **kw):
        collectives.add(threading.current_thread().name)
        return allgather(*a, **kw)

    multihost_utils.process_allgather = recorded
    SEEN.clear()
    cfg = dataclasses.replace(
        grpo_cfg,
        output_dir=str(out / "async"),
        eval=EvalConfig(every=2),  # the second evaluation while the thread samples the third batch
        iterations=3,
        rollout=dataclasses.replace(grpo_cfg.rollout, max_staleness=1),
        policy=PolicyLossConfig(kl_coef=0.05, importance_cap=2.0),
        export=False,
    )
    try:
        summary = grpo.run(cfg)
    finally:
        multihost_utils.process_allgather = allgather
    ran = {
        "seen": list(SEEN),
        "advantages": advantages,
        "summary": summary,
        "collectives": sorted(collectives),
    }
    (out / f"async-{pid}.json").write_text(json.dumps(ran, default=str))


def run_images(grpo_cfg, out: Path, pid: int, advantages: list) -> None:
    """GRPO with image prompts on a tiny Gemma 3 vision-language model (see the module
    docstring)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the image fixtures
    from image_fixtures import (
        COLOURS,
        QUESTION,
        colour_image,
        make_gemma3_tokenizer_dir,
        tiny_vlm_config,
    )

    from postax.parallel import MeshConfig
    from postax.recipes import grpo
    from postax.recipes.common import ModelSource
    from postax.recipes.rl_common.config import RunSettings
    from postax.rl.prompts import PromptDataConfig
    from postax.rl.rewards import RewardConfig
    from postax.tokenizer import load_tokenizer

    data = out / f"images-data-{pid}"  # each process its own copy: no concurrent writes
    tokenizer_dir = make_gemma3_tokenizer_dir(data / "tokenizer")
    paths = {}
    for name, per_colour in (("train", 3), ("eval", 2)):
        (data / name).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(per_colour):
            for c, (colour, rgb) in enumerate(COLOURS.items()):
                image = f"{name}/{colour}{i}.png"
                colour_image(rgb, i * 10 + c).save(data / image)
                parts = [{"type": "image", "path": image}, {"type": "text", "text": QUESTION}]
                lines.append(json.dumps({"prompt": [{"role": "user", "content": parts}]}) + "\n")
        paths[name] = data / f"{name}.jsonl"
        paths[name].write_text("".join(lines))
    SEEN.clear()
    cfg = dataclasses.replace(
        grpo_cfg,
        output_dir=str(out / "images"),
        tokenizer=str(tokenizer_dir),
        model=ModelSource(config=tiny_vlm_config(load_tokenizer(tokenizer_dir)), seed=0),
        data=PromptDataConfig(path=str(paths["train"]), batch_size=4),
        eval_data=PromptDataConfig(path=str(paths["eval"]), batch_size=6, shuffle=False),
        rewards=(RewardConfig(name=f"{__name__}:lengths", timeout=None),),
        rollout=dataclasses.replace(grpo_cfg.rollout, samples_per_prompt=2, max_new_tokens=4),
        policy=dataclasses.replace(grpo_cfg.policy, kl_coef=0.0),  # one scoring pass: recompute
        update=dataclasses.replace(grpo_cfg.update, minibatches=1),
        run=RunSettings(progress=False, mesh=MeshConfig(fsdp=8)),
        export=False,
    )
    summary = grpo.run(cfg)
    evals = {k: summary[k] for k in ("eval_before", "eval_after")}
    ran = {"seen": list(SEEN), "advantages": advantages, "evals": evals}
    (out / f"images-{pid}.json").write_text(json.dumps(ran))


def run_pairs(grpo_cfg, out: Path, pid: int) -> None:
    """The preference recipe (DPO with its reference cache) and the reward-model recipe, each
    exported, over the same model, mesh and processes (see the module docstring)."""
    from postax.data.preference import PreferenceDataConfig
    from postax.recipes import preference, reward_model
    from postax.train.optim import OptimizerConfig
    from postax.train.trainer import TrainerConfig

    source = Path(__file__).resolve().parents[2] / "examples" / "preference_tiny" / "train.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    pairs = out / f"pairs-{pid}.jsonl"  # 32 pairs, each process its own copy
    pairs.write_text("".join(source.read_text().splitlines(keepends=True)[:32]))
    common = dict(
        tokenizer=grpo_cfg.tokenizer,
        model=grpo_cfg.model,
        data=PreferenceDataConfig(path=str(pairs), seq_len=48, batch_size=8),
        trainer=TrainerConfig(
            steps=2, log_every=1, progress=False, mesh=grpo_cfg.run.mesh, scan_layers=False
        ),
        # SGD: see run_distill
        optimizer=OptimizerConfig(
            name="sgd", learning_rate=0.5, beta1=0.0, schedule="constant", max_grad_norm=None
        ),
        checkpoint=grpo_cfg.checkpoint,
        distributed=grpo_cfg.distributed,
        export=True,
    )
    preference.run(preference.PreferenceConfig(output_dir=str(out / "dpo"), **common))
    reward_model.run(reward_model.RewardModelConfig(output_dir=str(out / "reward"), **common))


if __name__ == "__main__":
    main()
