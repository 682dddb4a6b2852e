"""The quick start against a plain-PyTorch GRPO loop on the same box, task, prompts, grader and clock.

python tools/bench_quickstart.py [--config configs/quickstart.yaml] [--out runs/bench-quickstart] [key=value ...]

STACK-NOTES.md sets the bar: the product's quick start should learn at least as fast per minute as a minimal
GRPO loop with no framework (transformers generate with a KV cache from a bf16 copy, an fp32 master model
under bf16 autocast, AdamW, the same recipe). This runs `lcot-mega train CONFIG` first, then that loop for the
same wall-clock time as the whole command took, and evaluates both greedily on the same held-out problems.
Prints one table: held-out accuracy before and after, points gained per minute, and the ratio.
Run it on an otherwise idle machine: wall-clock time is the budget both get.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lcot_mega.config import Config, load_config
from lcot_mega.observe import read_metrics


def run_product(config: str, overrides: list[str], run_dir: Path) -> tuple[float, float, float, int]:
    """`lcot-mega train` as the README runs it: (wall seconds, accuracy first eval, last eval, steps)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "lcot_mega.cli", "train", config, *overrides, "--run-dir", str(run_dir), "--no-resume"]
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [(r["step"], v) for r in records for k, v in r.items() if k.endswith("/accuracy") and k.startswith("eval/")]
    return wall, evals[0][1], evals[-1][1], max(r["step"] for r in records)


class PlainLoop:
    """GRPO with no framework: one process, transformers only (the STACK-NOTES reference recipe)."""

    def __init__(self, cfg: Config) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lcot_mega.data import build_data
        from lcot_mega.reward.grader import Grader

        torch.manual_seed(cfg.trainer.seed)
        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(cfg.model.path, padding_side="left")
        self.policy = AutoModelForCausalLM.from_pretrained(cfg.model.path, torch_dtype=torch.float32)
        self.sampler = AutoModelForCausalLM.from_pretrained(cfg.model.path, torch_dtype=torch.bfloat16).eval()
        self.policy.get_input_embeddings().weight.requires_grad_(False)  # tied with the output layer: frozen
        a = cfg.actor
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), weight_decay=0.0)
        self.stream, evals = build_data(cfg.data, self.tok, cfg.trainer.seed)
        self.eval_set = next(iter(evals.values()))
        self.grader = Grader(cfg.reward.fn, num_workers=cfg.reward.num_workers, fallbacks=cfg.reward.fallbacks)

    def generate(self, prompts: list[list[int]], n: int, greedy: bool) -> list[list[int]]:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            out = self.sampler.generate(
                input_ids=ids.repeat_interleave(n, 0),
                attention_mask=mask.repeat_interleave(n, 0),
                do_sample=not greedy,
                temperature=None if greedy else self.cfg.rollout.temperature,
                top_p=None,
                top_k=None,
                max_new_tokens=self.cfg.rollout.max_new_tokens,
                pad_token_id=pad,
            )
        responses = []
        for row in out[:, width:].tolist():
            cut = row.index(self.tok.eos_token_id) + 1 if self.tok.eos_token_id in row else len(row)
            responses.append(row[:cut])
        return responses

    def accuracy(self) -> float:
        prompts = [list(p.token_ids) for p in self.eval_set]
        responses = []
        for i in range(0, len(prompts), 50):
            responses += self.generate(prompts[i : i + 50], 1, greedy=True)
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        graded = self.grader.grade_batch(texts, [p.answer for p in self.eval_set])
        return sum(g.correct for g in graded) / len(graded)

    def step(self) -> None:
        n = self.cfg.rollout.n_samples
        prompts = self.stream.next_prompts(self.cfg.trainer.prompts_per_step)
        responses = self.generate([list(p.token_ids) for p in prompts], n, greedy=False)
        texts = self.tok.batch_decode(responses, skip_special_tokens=True)
        answers = [p.answer for p in prompts for _ in range(n)]
        rewards = torch.tensor([float(g.correct) for g in self.grader.grade_batch(texts, answers)])
        groups = rewards.view(-1, n)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).flatten()
        keep = [i for i in range(len(responses)) if groups[i // n].std() > 0 and responses[i]]
        if keep:
            self.update([list(prompts[i // n].token_ids) for i in keep], [responses[i] for i in keep], adv[keep])
        self.sampler.load_state_dict(self.policy.state_dict())  # the bf16 rollout copy follows the policy

    def update(self, prompts: list[list[int]], responses: list[list[int]], adv: torch.Tensor) -> None:
        """One token-mean policy-gradient step (on-policy: the PPO ratio is 1, clipping inactive)."""
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        resp = torch.zeros(len(seqs), width - 1)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            resp[i, len(p) - 1 : len(p) - 1 + len(r)] = 1.0  # positions whose next token is a response token
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.policy(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
        logp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(2)  # [B, T-1]
        loss = -(logp * adv[:, None] * resp).sum() / resp.sum()
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.actor.grad_clip)
        self.opt.step()


def run_plain(cfg: Config, budget_s: float) -> tuple[float, float, float, int]:
    """The plain loop for `budget_s` seconds from its own start (set-up and both evaluations included)."""
    t0 = time.perf_counter()
    loop = PlainLoop(cfg)
    first = loop.accuracy()
    eval_s = time.perf_counter() - t0
    steps = 0
    while time.perf_counter() - t0 + eval_s < budget_s:  # leave the final evaluation inside the budget
        loop.step()
        steps += 1
    last = loop.accuracy()
    loop.grader.close()
    return time.perf_counter() - t0, first, last, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/bench-quickstart")
    parser.add_argument("overrides", nargs="*", help="config overrides for both loops, e.g. trainer.seed=2")
    args = parser.parse_args()
    product = run_product(args.config, args.overrides, Path(args.out) / "product")
    plain = run_plain(load_config(args.config, args.overrides), product[0])
    print("\n| loop | wall | steps | held-out before | after | points / min |\n| --- | --- | --- | --- | --- | --- |")
    rates = []
    for name, (wall, first, last, steps) in (("lcot-mega train", product), ("plain PyTorch loop", plain)):
        rates.append(100 * (last - first) / (wall / 60))
        print(f"| {name} | {wall:.0f} s | {steps} | {first:.1%} | {last:.1%} | {rates[-1]:+.2f} |")
    print(f"\nlcot-mega / plain, points per minute: {rates[0] / rates[1]:.2f}x" if rates[1] else "")


if __name__ == "__main__":
    main()
