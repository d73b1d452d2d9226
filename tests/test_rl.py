"""PPO and GRPO: the estimators against hand computations and exact expectations, then real runs under the
deepspeed launcher (1 and 2 CPU ranks, ZeRO 0/2/3) whose token counts are checked against the prompts themselves.

The runs start from an untrained policy (it answers at full length, so every token of the accounting is exercised)
and score with an untrained reward model whose head is random, so rewards, advantages and losses are not zero.
"""
from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.mixture import load_data_config
from data.prepare import load_prepared
from data.prompts import PromptLoader
from data.tokenizer import load_tokenizer
from model import (ModelConfig, RewardModel, Transformer, generate, generation_flops, load_pretrained,
                   load_reward_model, save_pretrained, save_reward_model)
from tests.launch import CONTRACT, REPO_ROOT, read_metrics, run_launch_script, run_stage
from train.config import ConfigError, parse_config
from train.grpo import GRPOConfig, GRPOStage, group_advantages
from train.ppo import PPOConfig, PPOStage
from train.rl_losses import clipped_policy_loss, gae, k3_kl
from train.rollout import Rollout, RolloutMaker, rule_reward

DATA_CONFIG = "config/data/posttrain/rl/demo.yaml"
PROMPTS, ACCUMULATION, STEPS, SEED, NEW_TOKENS, GROUP = 4, 2, 2, 7, 12, 2
PHASE_KEYS = ["timing/generate_s", "timing/score_s", "timing/reference_s", "timing/update_s",
              "perf/generate_tokens_per_second", "perf/generate_mbu_percent", "perf/generate_mfu_percent",
              "perf/score_mfu_percent", "perf/reference_mfu_percent", "perf/update_mfu_percent"]
PPO_KEYS = ["objective/reward", "objective/kl", "objective/entropy", "policy/approxkl", "policy/clipfrac",
            "loss/policy", "loss/value", "val/mean", "rollout/response_length", "critic/grad_norm", *PHASE_KEYS]
GRPO_KEYS = ["objective/reward", "objective/reward_std", "objective/kl", "objective/entropy", "policy/approxkl",
             "policy/clip_ratio", "loss/policy", "rollout/response_length", *PHASE_KEYS]


# ----- the estimators -----
def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.2, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: δ = (−0.3, −0.1, 0.9); A2 = 0.9, A1 = −0.1 + 0.5·0.9 = 0.35, A0 = −0.3 + 0.5·0.35 = −0.125.
    # Row 1 ends after two tokens: its third column (reward 5, value 9) must not leak in.
    # δ1 = 1 − 0.2 = 0.8 = A1, A0 = −0.3 + 0.5·0.8 = 0.1.
    torch.testing.assert_close(advantages, torch.tensor([[-0.125, 0.35, 0.9], [0.1, 0.8, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.375, 0.55, 1.0], [0.6, 1.0, 0.0]]))


def test_gae_with_discount_matches_the_sum_of_discounted_deltas():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.ones(3, 6)
    gamma, lam = 0.9, 0.8
    advantages, _ = gae(rewards, values, mask, gamma, lam)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1)], dim=1)
    deltas = rewards + gamma * next_values - values
    expected = torch.stack([sum((gamma * lam) ** (k - t) * deltas[:, k] for k in range(t, 6)) for t in range(6)], 1)
    torch.testing.assert_close(advantages, expected)


def test_k3_estimator_is_exactly_the_kl_in_expectation():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(50), torch.randn(50)
    p, q = torch.distributions.Categorical(logits=p_logits), torch.distributions.Categorical(logits=q_logits)
    expectation = (p.probs * k3_kl(p.logits, q.logits)).sum()
    torch.testing.assert_close(expectation, torch.distributions.kl_divergence(p, q))
    assert (k3_kl(p.logits, q.logits) >= 0).all() and k3_kl(p.logits, p.logits).abs().max() == 0


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 0.5, 1.5, 1.1]))  # ratios
    advantages = torch.tensor([1.0, 1.0, -1.0, -2.0])
    losses, clipped = clipped_policy_loss(logps, old, advantages, clip_range=0.2)
    # A > 0 and ρ > 1 + ε: clipped at 1.2. A > 0, ρ < 1 − ε: unclipped (the pessimistic −0.5 is larger).
    # A < 0, ρ > 1 + ε: unclipped (1.5 is larger than 1.2). A < 0 inside the range: ρ itself.
    torch.testing.assert_close(losses, torch.tensor([-1.2, -0.5, 1.5, 2.2]))
    assert clipped.tolist() == [True, False, False, False]


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    advantages, std = group_advantages(scores, 2)
    torch.testing.assert_close(std, torch.tensor([math.sqrt(0.5), 0.0]))
    torch.testing.assert_close(advantages, torch.tensor([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4),
                                                         0.0, 0.0]))


def test_one_epoch_grpo_reads_the_old_log_probs_from_its_update_with_the_same_loss_gradient_and_metrics():
    """--ppo_epochs 1: the update's forward supplies the old log-probs (no separate no-grad forward of the policy).
    Against the path with that forward: the same loss and gradient, KL and entropy; the ratio is exactly 1."""
    torch.manual_seed(SEED)
    config = ModelConfig.from_preset("tiny")
    policy, reference = Transformer(config), Transformer(config)
    prompts, answers = [[5, 6, 7]] * 2 + [[8, 9, 10, 11]] * 2, torch.randint(12, 500, (4, 6))
    lengths = [6, 4, 5, 6]
    stage = GRPOStage()
    stage.ctx, stage.group_size = SimpleNamespace(cfg=GRPOConfig(data_config="unused", ppo_epochs=1)), 2
    maker = RolloutMaker.__new__(RolloutMaker)  # only what read_logprobs uses
    maker.cfg, maker.reference = stage.ctx.cfg, reference

    def rollout() -> Rollout:
        mask = (torch.arange(6) < torch.tensor(lengths)[:, None])
        layout = RolloutMaker.layout(SimpleNamespace(pad_id=0, device=torch.device("cpu")), prompts,
                                     SimpleNamespace(tokens=torch.where(mask, answers, 0), mask=mask,
                                                     lengths=torch.tensor(lengths)))
        layout.scores = torch.tensor([1.0, 0.0, 0.5, 0.0])
        stage.advantages([layout])
        return layout

    results = {}
    for reads_old in (True, False):
        policy.zero_grad()
        read = rollout()
        maker.read_logprobs(policy if reads_old else None, read)
        assert (read.old_logps is None) == (not reads_old)
        output = stage._policy_objective(policy, read)
        output.loss_sum.backward()
        results[reads_old] = (output, read, [p.grad.clone() for p in policy.parameters()])
    (separate, read_a, grads_a), (from_update, read_b, grads_b) = results[True], results[False]
    assert from_update.loss_sum.item() == pytest.approx(separate.loss_sum.item(), rel=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for name in ("old_logps", "entropy", "kl"):
        torch.testing.assert_close(getattr(read_b, name), getattr(read_a, name), rtol=1e-5, atol=1e-7)
    assert float(from_update.extras["approxkl"]) == 0.0 and float(from_update.extras["clipped"]) == 0.0
    assert stage.update_reads_old_logps() and PPOStage.old_logps_before_update  # PPO's KL reward needs them first


def test_a_group_generates_its_prompt_once_and_the_stage_counts_what_ran():
    """A GRPO group's answers share their prompt's prefill (model/generate.py's samples_per_prompt): the stage's
    generation FLOPs (MFU's numerator) count one prefill per prompt, as the flop counter sees the sampling run."""
    torch.manual_seed(SEED)
    config = ModelConfig.from_preset("tiny", attn_impl="math")  # the counter sees the attention matmuls
    maker = RolloutMaker.__new__(RolloutMaker)  # only what sample uses
    maker.generator_model, maker.eos_id, maker.pad_id, maker.device = Transformer(config), None, 0, torch.device("cpu")
    maker.cfg = SimpleNamespace(max_new_tokens=5, temperature=1.0, top_k=0)
    batch = {"prompt_ids": [[5, 6, 7, 8], [9, 10, 11, 12]], "answers": ["a", "b"]}  # one width: no padding
    with FlopCounterMode(display=False) as counter:
        rollout = maker.sample(batch, GROUP + 1)
    assert rollout.response_lengths == [5] * 6 and rollout.samples_per_prompt == GROUP + 1
    assert rollout.prompt_lengths == [4] * 6 and rollout.answers == ["a"] * 3 + ["b"] * 3
    stage = GRPOStage()
    stage.ctx = SimpleNamespace(model_config=config)
    shared = generation_flops(config, [4] * 6, [5] * 6, samples_per_prompt=3)
    assert stage.generate_flops(rollout) == shared < generation_flops(config, [4] * 6, [5] * 6)
    assert counter.get_total_flops() == generation_flops(config, [4] * 6, [5] * 6, causal=False, samples_per_prompt=3)


def test_rule_reward():
    assert rule_reward(" 106 ", "106") == 1.0
    assert rule_reward("the answer is 106", "106") == 0.5
    assert rule_reward("107", "106") == 0.0
    assert rule_reward("it is r.", "r") == 0.5 and rule_reward("a parser", "r") == 0.0  # a whole word only
    assert rule_reward("1067", "106") == 0.0
    with pytest.raises(ValueError, match="no.*reference answer|without a reference answer"):
        rule_reward("x", None)


@pytest.mark.parametrize("cls,argv,message", [
    (PPOConfig, ["--reward", "judge"], "--reward: 'judge' is not one of rule, model"),
    (PPOConfig, ["--clip_range", "1.5"], "--clip_range: must be in"),
    (PPOConfig, ["--temperature", "0"], "--temperature: rollouts sample"),
    (GRPOConfig, ["--group_size", "1"], "--group_size: a group needs at least 2"),
])
def test_rl_flags_are_validated(cls, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"stage": "ppo", "data_config": DATA_CONFIG}, argv, cls=cls)


# ----- real runs -----
@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_out")
    torch.manual_seed(SEED)
    config = ModelConfig.from_preset("tiny")
    save_pretrained(Transformer(config), root / "sft" / "export")
    reward_model = RewardModel(config)
    torch.nn.init.normal_(reward_model.value_head.weight, std=0.5)  # a zero head would score every answer 0
    save_reward_model(reward_model.state_dict(), config, root / "reward" / "export")
    return root


def prompt_tokens_per_step(world_size: int) -> list[int]:
    """Prompt tokens of each global step, from the prompt store itself (all ranks' batches)."""
    config = load_data_config(REPO_ROOT / DATA_CONFIG)
    prepared = load_prepared(config, load_tokenizer())
    per_rank = PROMPTS // world_size
    loaders = [PromptLoader(prepared.split("train"), per_rank, rank, world_size, SEED, weights=prepared.weights)
               for rank in range(world_size)]
    batches = [list(loader.iterate(0)) for loader in loaders]
    return [sum(len(prompt) for rank in range(world_size)
                for batch in batches[rank][step * ACCUMULATION:(step + 1) * ACCUMULATION]
                for prompt in batch["prompt_ids"])
            for step in range(STEPS)]


def rl_args(out_root, world_size: int) -> list[str]:
    return ["--out_root", str(out_root), "--from_weight", "sft", "--reward", "model", "--reward_model", "reward",
            "--batch_size", str(PROMPTS // world_size), "--accumulation_steps", str(ACCUMULATION),
            "--max_new_tokens", str(NEW_TOKENS), "--max_steps", str(STEPS), "--log_interval", "1",
            "--eval_interval", str(STEPS), "--eval_batches", "1", "--save_interval", "0",
            "--throughput_warmup_steps", "0", "--seed", str(SEED), "--learning_rate", "1e-4"]


@pytest.mark.parametrize("stage,world_size,zero", [("ppo", 1, "2"), ("ppo", 2, "3"), ("grpo", 1, "0"),
                                                   ("grpo", 2, "2")],
                         ids=["ppo-ws1-zero2", "ppo-ws2-zero3", "grpo-ws1-zero0", "grpo-ws2-zero2"])
def test_rl_run_logs_the_contract_and_counts_tokens_from_the_prompts(tmp_path, out_root, stage, world_size, zero):
    args = rl_args(out_root, world_size) + (["--group_size", str(GROUP)] if stage == "grpo" else [])
    # One epoch: the update's forward reads the old log-probs (the ratio is exactly 1), the other runs read them apart.
    one_epoch = stage == "grpo" and world_size == 2
    args += ["--ppo_epochs", "1"] if one_epoch else []
    if world_size == 2 and zero == "3":
        run_launch_script(stage, "--out_dir", str(tmp_path), *args, zero=zero)  # as users start it
    else:
        run_stage(stage, tmp_path, *args, world_size=world_size, zero=zero)
    records = read_metrics(tmp_path)
    assert [r["train/global_step"] for r in records] == list(range(1, STEPS + 1))
    keys = PPO_KEYS if stage == "ppo" else GRPO_KEYS
    for record in records:
        for key in CONTRACT + keys:
            assert record.get(key) is not None and math.isfinite(record[key]), (record["train/global_step"], key)
        assert record["train/grad_norm"] > 0 and record["train/loss"] == pytest.approx(record["loss/policy"])
        assert 1 <= record["rollout/response_length"] <= NEW_TOKENS
        phase_seconds = sum(value for key, value in record.items() if key.startswith("timing/"))
        assert phase_seconds <= record["system/step_time_s"] * 1.05
        assert ("timing/sync_weights_s" in record) == (zero == "3")  # only where the policy is sharded
        assert (record["policy/approxkl"] == 0.0) == one_epoch and record["policy/ppo_epochs"] == 2 - one_epoch
    assert records[-1]["eval/reward"] is not None and records[-1]["eval/response_length"] >= 1
    if world_size == 1:
        greedy, sampled = held_out_rewards(tmp_path / "export", out_root)
        assert records[-1]["eval/reward"] == pytest.approx(greedy, rel=1e-4, abs=1e-5)
        assert records[-1]["eval/reward_sampled"] == pytest.approx(sampled, rel=1e-4, abs=1e-5)
    else:
        assert math.isfinite(records[-1]["eval/reward_sampled"])

    rows = PROMPTS * ACCUMULATION * (GROUP if stage == "grpo" else 1)
    group = GROUP if stage == "grpo" else 1
    tokens_seen = supervised_seen = 0
    for record, prompt_tokens in zip(records, prompt_tokens_per_step(world_size)):
        response_tokens = round(record["rollout/response_length"] * rows)
        assert response_tokens == pytest.approx(record["rollout/response_length"] * rows, abs=1e-6)
        tokens_seen += prompt_tokens * group + response_tokens
        supervised_seen += response_tokens
        assert record["train/num_input_tokens_seen"] == tokens_seen
        assert record["train/num_supervised_tokens_seen"] == supervised_seen
        # A one-step window: the generation rate × its time per round gives back the answer tokens counted above.
        generated = record["perf/generate_tokens_per_second"] * record["timing/generate_s"]
        assert generated == pytest.approx(response_tokens, rel=1e-9)
    assert (tmp_path / "export" / "model.safetensors").is_file()


def held_out_rewards(export, out_root) -> tuple[float, float]:
    """eval/reward and eval/reward_sampled at the last step of a one-rank run, recomputed from its export: greedy and
    sampled answers (the generator seeded as docs/metrics.md says) to the one validation batch evaluated, each
    answer scored alone, without padding, by the reward model at its last token."""
    tokenizer = load_tokenizer()
    prepared = load_prepared(load_data_config(REPO_ROOT / DATA_CONFIG), tokenizer)
    prompts = next(PromptLoader(prepared.split("val"), PROMPTS, 0, 1, SEED, drop_last=False).iterate(0))["prompt_ids"]
    policy, scorer = load_pretrained(export), load_reward_model(out_root / "reward" / "export")
    generator = torch.Generator().manual_seed((SEED * 1_000_003 + STEPS) * 1024)
    means = []
    with torch.no_grad():
        for options in ({"greedy": True}, {"generator": generator}):
            answers = generate(policy, prompts, NEW_TOKENS, eos_token_id=tokenizer.eos_id,
                               pad_token_id=tokenizer.pad_id, **options)
            scores = [float(scorer(torch.tensor([prompt + row[:length].tolist()])).values[0, -1])
                      for prompt, row, length in zip(prompts, answers.tokens, answers.lengths.tolist())]
            means.append(sum(scores) / len(scores))
    return means[0], means[1]


def test_ppo_resume_restores_the_critic_and_continues_the_curve(tmp_path, out_root):
    """The critic is checkpointed beside the actor (and the sampling RNG with them): a run resumed from step 2
    repeats the uninterrupted run's steps 3 and 4, value loss and critic norm included."""
    args = rl_args(out_root, 1) + ["--max_steps", "4", "--save_interval", "2", "--keep_checkpoints", "2",  # last wins
                                   "--eval_interval", "0"]
    straight = tmp_path / "straight"
    run_stage("ppo", straight, *args, world_size=1, zero="2")
    reference = read_metrics(straight)

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    assert (resumed / "checkpoints" / "step_00000002" / "critic").is_dir()
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    run_stage("ppo", resumed, *args, "--from_resume", world_size=1, zero="2")
    records = read_metrics(resumed)
    assert [r["train/global_step"] for r in records] == [1, 2, 3, 4]
    for ours, theirs in zip(records[2:], reference[2:]):
        for key in ("train/loss", "loss/value", "critic/grad_norm", "train/grad_norm", "objective/reward"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
        assert ours["train/num_input_tokens_seen"] == theirs["train/num_input_tokens_seen"]


# ----- learning -----
LEARN_WORDS = ["apple", "river", "stone", "cloud", "table", "green", "house", "light", "music", "paper", "chair",
               "water", "bread", "plant", "night", "dream"]


def reply_ok_policy(root, target: float = 0.25):
    """A rule-rewarded task and a policy that solves it now and then: prompts "Reply ok to '<word>'." with the
    reference answer "ok", and a tiny model trained (supervised) only until its answer is exactly "ok" with mean
    probability `target`. Returns the data config."""
    tokenizer = load_tokenizer()
    messages = [[{"role": "user", "content": f"Reply ok to '{word}'."}] for word in LEARN_WORDS]
    for name, chats in (("train", messages[:12] * 4), ("val", messages[12:])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"conversations": chat, "answer": "ok"}) + "\n" for chat in chats)
    (root / "rl.yaml").write_text(f"kind: rl\nmax_seq_len: 64\nsources:\n  - {{path: {root}/train.jsonl, weight: 1.0}}\n"
                                  f"validation: {{path: {root}/val.jsonl}}\nseed: 0\n")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    rows = [tokenizer.render_chat(chat + [{"role": "assistant", "content": "ok"}]) for chat in messages[:12]]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        answer_logps = []
        for ids, mask in rows:
            ids, mask = torch.tensor([ids]), torch.tensor(mask[1:], dtype=torch.bool)
            logps = model(ids[:, :-1]).logits.log_softmax(-1)[0].gather(-1, ids[0, 1:, None]).squeeze(-1)
            answer_logps.append(logps[mask].sum())
        answer_logps = torch.stack(answer_logps)
        if answer_logps.exp().mean() >= target:
            break
        optimizer.zero_grad()
        (-answer_logps.mean()).backward()
        optimizer.step()
    save_pretrained(model, root / "sft" / "export")
    return root / "rl.yaml"


@pytest.mark.parametrize("stage,margin", [("grpo", 0.15), ("ppo", 0.2)])
def test_rl_raises_a_learnable_rule_reward(tmp_path, stage, margin):
    """From a policy that answers exactly "ok" about one time in four, the mean rule reward (1 for "ok", 0.5 for an
    answer containing it) of the sampled answers in the last 4 of 16 steps exceeds the first 4 steps' by `margin`.
    Without learning the difference of two window means has a standard error of about 0.35·√(2/n): 0.044 for
    GRPO's n = 128 answers per window, 0.088 for PPO's 32, so the margins are 3.4 and 2.3 of them."""
    data_config = reply_ok_policy(tmp_path)
    run_stage(stage, tmp_path / stage, "--data_config", str(data_config), "--out_root", str(tmp_path),
              "--from_weight", "sft", "--reward", "rule", "--batch_size", "8", "--max_new_tokens", "8",
              "--learning_rate", "2e-3", "--max_steps", "16", "--epochs", "3", "--log_interval", "1",
              "--eval_interval", "0", "--eval_batches", "0", "--save_interval", "0", "--seed", str(SEED),
              *(["--group_size", "4"] if stage == "grpo" else []), world_size=1, zero="2")
    rewards = [record["objective/reward"] for record in read_metrics(tmp_path / stage)]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + margin, rewards


def test_a_skipped_critic_update_logs_a_null_critic_grad_norm_not_a_stale_one(tmp_path, out_root):
    """A critic blown up on purpose (learning rate 1e30): its first PPO epoch's update applies, the second sees
    infinite values and DeepSpeed (ZeRO-2) skips it, keeping the first one's norm as its own. critic/grad_norm is the
    last update's, so it is null, said once; the window's mean of DeepSpeed's norms would have been a number."""
    result = run_stage("ppo", tmp_path, *rl_args(out_root, 1), "--critic_learning_rate", "1e30",
                       "--warmup_ratio", "0", world_size=1, zero="2")
    assert "OVERFLOW! Skipping step" in result.stdout + result.stderr  # DeepSpeed's own word that it skipped
    records = read_metrics(tmp_path)
    assert [r["critic/grad_norm"] for r in records] == [None] * STEPS
    assert records[-1]["train/skipped_steps"] == STEPS
    assert (result.stdout + result.stderr).count("critic/grad_norm unknown") == 1
