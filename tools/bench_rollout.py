"""Rollout throughput: EmbeddedEngine vs `transformers.generate` with the same settings, measured in one run.

Random models (no hub): a tiny one (tests/helpers/tiny_models.py shape) and a mid-size one (hidden 256, 4 layers,
vocab 49152: the output layer dominates, as in SmolLM2-sized vocabularies). Both engines sample at
temperature 1 with no truncation, ignore EOS (every response has max_new_tokens tokens) and use a KV cache.

    python tools/bench_rollout.py [--prompts 8 --n 4 --prompt-len 32 --max-new 64 --repeats 3 --threads 0]
        [--vllm] [--json PATH]

`--vllm` adds SmolLM2-135M-Instruct (bench_models.py; vLLM needs its tokenizer, and refuses the tiny model's
head_dim 16) with a third engine, `VLLMEngine`, on the same prompts and settings. `--json PATH` also writes
the table's rows as JSON (read by tools/bench_all.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.protocol import SamplingParams

MODELS = {
    "tiny (h64 L4 V96)": dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_attention_heads=4),
    "mid (h256 L4 V49152)": dict(vocab_size=49152, hidden_size=256, intermediate_size=704, num_attention_heads=4),
}


def make_model(out_dir: Path, **kw) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, num_key_value_heads=2, max_position_embeddings=4096, **kw)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
    return out_dir


def prompts_for(vocab: int, count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    # Lengths from length/2 to length, so left padding is exercised as in real batches.
    return [
        torch.randint(3, vocab, (length // 2 + (i * length) // (2 * count),), generator=g).tolist()
        for i in range(count)
    ]


def engine_run(
    model_dir: Path, dtype: torch.dtype, prompts: list[list[int]], args, engine_cls: type = EmbeddedEngine, opened=None
) -> Callable[[], int]:
    """A timed generate on a fresh engine; `opened` collects the engine for shutdown (vLLM's runs a process)."""
    engine = engine_cls(model_dir, dtype=dtype)
    if opened is not None:
        opened.append(engine)
    params = SamplingParams(max_new_tokens=args.max_new, n=args.n, ignore_eos=True, seed=0)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=4))  # warm-up

    def run() -> int:
        return sum(len(c.token_ids) for cs in engine.generate(prompts, params) for c in cs)

    return run


def hf_generate_run(model_dir: Path, dtype: torch.dtype, prompts: list[list[int]], args) -> Callable[[], int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p) :], mask[b, longest - len(p) :] = torch.tensor(p), 1
    # Same settings: pure sampling at T=1 (transformers' default top_k=50 switched off), no EOS stop.
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.n, pad_token_id=0)
    kwargs.update(max_new_tokens=args.max_new, min_new_tokens=args.max_new, use_cache=True)
    with torch.inference_mode():
        model.generate(ids[:1], attention_mask=mask[:1], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, **kwargs)
        return (out.shape[1] - longest) * out.shape[0]

    return run


def best_rates(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Tokens/s of each run, best of `repeats`, interleaved so that load from other processes hits both alike."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            tokens = run()
            best[name] = max(best[name], tokens / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--vllm", action="store_true", help="add SmolLM2-135M with a VLLMEngine column")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{args.prompts} prompts x n={args.n}, prompts {args.prompt_len // 2}-{args.prompt_len} tokens,"
        f" {args.max_new} new tokens, {torch.get_num_threads()} threads; best of {args.repeats}"
    )
    print("| model | dtype | embedded tok/s | HF generate tok/s | ratio |\n|---|---|---|---|---|")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [(n, make_model(Path(tmp) / n.split()[0], **kw), kw["vocab_size"]) for n, kw in MODELS.items()]
        if args.vllm:
            from bench_models import prepare_model

            models.append(("smollm2 (SmolLM2-135M-Instruct)", prepare_model("smollm2"), 49152))
        for name, model_dir, vocab in models:
            prompts = prompts_for(vocab, args.prompts, args.prompt_len)
            for dtype in (torch.float32, torch.bfloat16):
                opened: list = []
                runs = {
                    "ours": engine_run(model_dir, dtype, prompts, args),
                    "hf": hf_generate_run(model_dir, dtype, prompts, args),
                }
                if name.startswith("smollm2"):
                    from lcot_mega.rollout.vllm_engine import VLLMEngine

                    runs["vllm"] = engine_run(model_dir, dtype, prompts, args, VLLMEngine, opened)
                rate = best_rates(runs, args.repeats)
                for engine in opened:
                    engine.shutdown()
                ours, ref = rate["ours"], rate["hf"]
                line = f"| {name} | {str(dtype).removeprefix('torch.')} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f} |"
                if "vllm" in rate:
                    line += f" vLLM {rate['vllm']:,.0f} tok/s, ours / vLLM {ours / rate['vllm']:.2f} |"
                print(line)
                records.append(dict(model=name, dtype=str(dtype).removeprefix("torch."), ours_tok_s=ours, hf_tok_s=ref))
                records[-1].update(ratio=ours / ref, vllm_tok_s=rate.get("vllm"))
    if args.json:
        meta = dict(prompts=args.prompts, n=args.n, prompt_len=args.prompt_len, max_new=args.max_new)
        meta.update(repeats=args.repeats, threads=torch.get_num_threads())
        args.json.write_text(json.dumps(dict(meta=meta, rows=records), indent=1))


if __name__ == "__main__":
    main()
