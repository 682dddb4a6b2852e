"""Prompts and scored groups as JSON, for the rollout state a checkpoint holds (batches sampled ahead, responses
carried by a partial rollout): every field a later step reads, floats exact (Python's float repr round-trips)."""

from __future__ import annotations

from lcot_mega.types import Group, Prompt, Sample, SampleStatus


def prompt_to_json(p: Prompt) -> dict:
    return {"uid": p.uid, "text": p.text, "answer": p.answer, "token_ids": list(p.token_ids), "source": p.source}


def prompt_from_json(d: dict) -> Prompt:
    return Prompt(d["uid"], d["text"], d["answer"], tuple(d["token_ids"]), d["source"])


def group_to_json(g: Group) -> dict:
    samples = [
        {
            "response_ids": s.response_ids,
            "response_text": s.response_text,
            "rollout_logprobs": s.rollout_logprobs,
            "status": s.status.value,
            "weight_version": s.weight_version,
            "reward": s.reward,
            "correct": s.correct,
            "advantage": s.advantage,
            "offline": s.offline,
            "token_versions": s.token_versions,
        }
        for s in g.samples
    ]
    return {"prompt": prompt_to_json(g.prompt), "samples": samples}


def group_from_json(d: dict) -> Group:
    prompt = prompt_from_json(d["prompt"])
    samples = [
        Sample(
            prompt,
            list(s["response_ids"]),
            s["response_text"],
            s["rollout_logprobs"],
            SampleStatus(s["status"]),
            s["weight_version"],
            s["reward"],
            s["correct"],
            s["advantage"],
            s["offline"],
            s.get("token_versions"),
        )
        for s in d["samples"]
    ]
    return Group(prompt, samples)
