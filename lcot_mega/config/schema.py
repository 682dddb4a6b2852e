"""Typed configuration of every component; the one place where defaults live.

A recipe YAML states only what differs from these defaults (STYLE.md, "Config"). Each field's
docstring says what it does; `opt(...)` states what values are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lcot_mega.config.fields import opt


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model directory (or hub id in a user's config) of the initial policy."""
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16"))
    """Parameter dtype of the rollout copy; fp32 on CPU, bf16 on GPU."""
    trust_remote_code: bool = False
    """Passed to transformers when loading the tokenizer and config; off unless you trust the model repo."""


@dataclass
class DataConfig:
    train: list[str] = opt([])
    """Training prompt sources: .jsonl/.json/.parquet files with `prompt`/`answer` fields, or
    `reasoning_gym:TASK?arg=value&...` (docs/DATA.md)."""
    eval: list[str] = opt([])
    """Held-out sources evaluated during training (same formats as `train`); their questions are removed
    from the training prompts."""
    gym_train_size: int = opt(10000, gt=0)
    """Training problems generated per reasoning-gym source (one epoch)."""
    gym_eval_size: int = opt(200, gt=0)
    """Distinct problems generated per reasoning-gym eval source (eval files are used whole)."""
    prompt_template: str = "{problem}"
    """User-turn text; `{problem}` is replaced by the problem. The study: "{problem} Let's think step by step
    and output the final answer within \\boxed{}."."""
    apply_chat_template: bool = True
    """Render the user turn with the tokenizer's chat template."""
    max_prompt_len: int = opt(1024, gt=0)
    """Prompts longer than this many tokens are skipped (and counted)."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by trainer.seed)."""


@dataclass
class RolloutConfig:
    engine: str = opt("embedded", choices=("embedded", "sglang", "vllm"))
    """Rollout backend: in-process/served transformers engine on CPU, SGLang or vLLM servers on GPU."""
    n_samples: int = opt(8, ge=1)
    """G: responses sampled per prompt (the group of group-relative advantages)."""
    temperature: float = opt(1.0, ge=0.0)
    """Sampling temperature; the actor's log-probs are scaled by the same value."""
    top_p: float = opt(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass; 1.0 keeps the full distribution (needed for exact importance ratios)."""
    top_k: int = opt(-1, ge=-1)
    """Top-k sampling; -1 disables it (SGLang's convention)."""
    max_new_tokens: int = opt(1024, gt=0)
    """Response length limit; longer responses are truncated (status TRUNCATED)."""
    stop: list[str] = opt([])
    """Extra stop strings besides the tokenizer's EOS."""
    ignore_eos: bool = False
    """Keep sampling past EOS until max_new_tokens or a `stop` string (SGLang's and vLLM's ignore_eos): every
    response is full length. For exercising long sequences with a model that answers briefly (long_cot_cpu.yaml),
    not for learning: text after the answer is graded too."""
    seed: int | None = None
    """Sampling seed; None derives it from trainer.seed and the step."""
    served: bool = False
    """Run the embedded engine as `cluster.num_engines` `lcot-mega serve` server processes (SGLang's HTTP
    protocol) instead of inside the driver; `engine: sglang` is always served. Local mode only."""
    request_timeout_s: float = opt(600.0, gt=0.0)
    """How long a served engine may stay silent. A weight or memory call unanswered in this time, or a generate
    unanswered this long whose server then fails a /health probe too, means the server is hung: its requests go
    to another engine and it is restarted and re-synced. A generate on a server that answers /health is waited
    for however long it takes (a queue, a long response)."""
    weight_dtype: str = opt("auto", choices=("auto", "fp8"))
    """Weights the engines receive on every sync: auto = the engine's dtype (model.dtype); fp8 = linear weights
    block-quantized to float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block (DeepSeek-V3 convention,
    docs/FP8.md), for sglang/vllm engines serving a block-FP8 checkpoint."""
    sync: str = opt("full", choices=("full", "delta"))
    """How each weight sync reaches served engines: full = every tensor; delta = only the elements whose bits
    changed since the engines' version (indices + values, or the whole tensor where that is smaller), each bucket
    checked on the engine by checksum and sequence number, a failed delta followed at once by a full sync
    (docs/WEIGHT_SYNC.md). Pays with bf16/fp16 engines, where an RL step leaves most elements unchanged; costs
    one copy of the model in the engine's dtype on the actor's rank 0. Needs served embedded engines
    (`rollout.served`, or cluster.mode disaggregated): an in-process engine is written in place already."""
    verify_sync: bool = True
    """After every weight sync, every engine's teacher-forced log-probs of a fixed 16-token probe are compared with
    the actor's; a difference above `verify_tolerance` fails the sync (WeightSyncError: the run stops and says so),
    so a corrupted or misrouted sync is caught before it samples a step. Costs one 16-token forward on the actor
    and one score per engine (docs/WEIGHT_SYNC.md)."""
    verify_tolerance: float | None = opt(None, gt=0.0)
    """Max |engine - actor| probe log-prob, nats. None: 1e-3 where actor and engines compute in float32 and the
    weights travel as they are; else 1.0 (bf16/fp8 rounding moves a short probe's log-probs by a few 1e-2, weights
    in the wrong place or from another model by several nats)."""
    partial: bool = False
    """Partial rollout (needs trainer.max_staleness >= 1): responses are sampled in windows of `partial_window`
    tokens; a step trains the first groups to finish, and a response still unfinished when its step's batch is full
    keeps its tokens and continues in the next step's sampling under the newer weights (Kimi k1.5's partial
    rollouts), so the longest response no longer sets the step time. Every token records the weights version that
    sampled it (`Sample.token_versions`); a group is carried at most once, so its oldest token is at most
    max_staleness versions old when trained, and the engine samples max_staleness - 1 steps ahead. docs/ASYNC.md."""
    partial_window: int = opt(0, ge=0)
    """Tokens a response may add per window (partial rollout); 0 means max_new_tokens // 4. Counted in tokens,
    not seconds, so where a response is cut does not depend on timing and a resumed run samples the same."""
    partial_oversubscribe: float = opt(1.5, ge=1.0)
    """Partial rollout: groups held in flight (or finished and not yet trained) per group of the batch, so that the
    batch fills from the first to finish while the long ones go on beside new ones (times
    algo.dynamic_sampling.oversample when that is on)."""


@dataclass
class RelativeLengthConfig:
    """Relative length reward (Mu et al. 2025, from DeepScaleR): a signal for all-correct groups."""

    enabled: bool = False
    corr_ratio: float = opt(0.75, ge=0.0, le=1.0)
    """Only groups with at least this accuracy get the length term."""
    length_base: float = opt(500.0, gt=0.0)
    """Tokens per unit of reward: bonus = (mean correct length - length) / length_base."""
    lower: float = -0.5
    """Lower clip of the bonus."""
    upper: float = 1.0
    """Upper clip of the bonus."""


@dataclass
class OverlongConfig:
    """Soft overlong punishment (DAPO, Yu et al. 2025, eq. 13)."""

    enabled: bool = False
    buffer_len: int = opt(256, gt=0)
    """The penalty ramps linearly over the last buffer_len tokens before rollout.max_new_tokens."""
    penalty_factor: float = opt(1.0, ge=0.0)
    """Penalty at (and beyond) the maximum length."""


@dataclass
class RepetitionConfig:
    """Repetition penalty on incorrect responses (Mu et al. 2025 reference code)."""

    enabled: bool = False
    ngram: int = opt(40, ge=1)
    """Word n-gram size."""
    max_penalty: float = opt(-2.0, le=0.0)
    """Penalty of a fully repetitive response: (1 - unique/total n-grams) * max_penalty."""


@dataclass
class RewardConfig:
    fn: str = "math"
    """Reward function: a registered name (`math`, `exact`) or a dotted path `package.module:function`."""
    require_think_close: bool = False
    """The answer must follow a closing `</think>` (the study's verifier); otherwise it scores 0."""
    fallbacks: list[str] = opt([], choices=("answer_is", "last_number"))
    """Where to look when the response has no `\\boxed{}`, tried in order."""
    timeout_s: float = opt(5.0, gt=0.0)
    """Wall-clock budget per grade; an overrunning grade scores 0 and its worker process is replaced."""
    num_workers: int = opt(2, ge=1)
    """Grader processes (math-verify runs isolated; see DESIGN.md)."""
    relative_length: RelativeLengthConfig = opt(RelativeLengthConfig)
    overlong: OverlongConfig = opt(OverlongConfig)
    repetition: RepetitionConfig = opt(RepetitionConfig)


@dataclass
class DynamicSamplingConfig:
    """Dynamic sampling (DAPO): drop groups whose advantages are all zero and refill the batch."""

    mode: str = opt("off", choices=("off", "drop", "drop_with_fallback"))
    """off: train on every group; drop: keep only informative groups; drop_with_fallback: as drop, but
    when refilling runs out of rounds, top up with zero-advantage groups."""
    max_rounds: int = opt(4, ge=1)
    """Generation rounds per step before giving up on filling the batch."""
    oversample: float = opt(1.0, ge=1.0)
    """Prompt groups generated per needed group in each round."""
    on_shortfall: str = opt("train", choices=("train", "stop"))
    """What to do when max_rounds did not fill the batch: train on what there is (and log it) or stop."""


@dataclass
class InjectionConfig:
    """Offline correct solutions injected into hard groups (Mu et al. 2025, data efficiency)."""

    enabled: bool = False
    """Replace incorrect responses of hard groups by the problem's offline solution (the `solution` field of a
    data.train prompt file), grade the group again and train those tokens with the policy-shaping loss
    (docs/ALGORITHMS.md, "Offline injection")."""
    alpha: float = opt(0.125, ge=0.0, le=1.0)
    """Groups with accuracy <= alpha get incorrect samples replaced by offline solutions (one per solution)."""
    gamma: float = opt(0.1, gt=0.0)
    """Policy-shaping constant of the injected samples' loss: -A * p / (p + gamma)."""


@dataclass
class OffPolicyConfig:
    """How the policy loss weights tokens that a policy other than the clipped-against one sampled: the rollout
    engine's weights lag the trainer's under asynchronous training and differ in precision always
    (docs/ALGORITHMS.md, "Off-policy corrections")."""

    correction: str = opt(
        "none", choices=("none", "tis", "seq_tis", "mis", "seq_mis", "icepop", "geo_mask", "decoupled")
    )
    """none: no weights (the train-vs-rollout gap is still measured); tis / seq_tis: importance ratio truncated at
    `high`, per token / per sequence; mis / seq_mis: the ratio, masked to 0 above `high`; icepop: masked outside
    [low, high] per token; geo_mask: sequences whose geometric-mean ratio leaves [low, high] masked, the rest
    weight 1; decoupled: decoupled PPO, the full ratio (tokens above `high` masked when it is set)."""
    low: float | None = opt(None, gt=0.0)
    """Lower bound of icepop and geo_mask (defaults 0.5); refused by corrections that have none."""
    high: float | None = opt(None, gt=0.0)
    """Cap or upper mask bound (defaults: tis, seq_tis, mis, seq_mis 2.0; icepop 5.0; geo_mask 2.0; decoupled
    none); refused by `none`."""


@dataclass
class AlgoConfig:
    advantage: str = "grpo"
    """Advantage estimator by registered name: grpo, drgrpo, rloo, reinforce_pp (or one you register)."""
    adv_eps: float = opt(1e-6, gt=0.0)
    """Added to the group std in the GRPO denominator."""
    polarity: str = opt("both", choices=("both", "positive", "negative", "weighted"))
    """Which samples train (Mu et al. 2025): all, correct only, incorrect only, or positives down-weighted."""
    reserve_ratio: float = opt(0.0, ge=0.0, le=1.0)
    """positive/negative modes: share of the dropped polarity kept at random."""
    reserve_min: int = opt(0, ge=0)
    """positive/negative modes: at least this many of the dropped polarity are kept."""
    positive_weight: float = opt(1.0, ge=0.0)
    """weighted mode: advantages of correct samples are scaled by this (W-REINFORCE's lambda)."""
    mask_truncated: bool = False
    """Overlong filtering (DAPO, Yu et al. 2025, sec. 3.4): responses cut at rollout.max_new_tokens (status
    TRUNCATED) are left out of the policy loss: their tokens weigh nothing and count in no loss denominator. Their
    group's rewards and advantages are computed before, with them, so the other samples' advantages do not change;
    they still count in reward/accuracy and rollout/truncated_frac. The study's code (Mu et al. 2025,
    `mask_truncated_samples`) zeroes their advantage instead, which leaves their tokens in token-mean denominators."""
    loss_agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    loss_max_len: int | None = opt(None, gt=0)
    """Constant normaliser of seq-mean-token-sum-norm (Dr.GRPO): required by that mode and at least
    rollout.max_new_tokens (it must bound every response); refused with an aggregation that does not read it."""
    clip_low: float = opt(0.2, ge=0.0, lt=1.0)
    """PPO clip below: ratio >= 1 - clip_low."""
    clip_high: float = opt(0.2, ge=0.0)
    """PPO clip above: ratio <= 1 + clip_high (clip-higher, DAPO: 0.28)."""
    dual_clip: float | None = opt(None, gt=1.0)
    """Dual-clip constant c > 1 for negative advantages; None disables it."""
    kl_coef: float = opt(0.0, ge=0.0)
    """Weight of the KL-to-reference loss; 0 skips the reference model entirely."""
    kl_kind: str = opt("low_var_kl", choices=("k1", "k2", "k3", "low_var_kl", "abs"))
    """KL estimator (Schulman 2020); the study used low_var_kl, clamped to [-10, 10]."""
    entropy_coef: float = opt(0.0, ge=0.0)
    """Weight of the entropy bonus."""
    is_cap: float | None = opt(None, ge=1.0)
    """Shorthand for off_policy.correction = tis with off_policy.high = is_cap (truncated importance sampling of the
    train/rollout mismatch); refused together with another off_policy.correction. None: off_policy decides."""
    off_policy: OffPolicyConfig = opt(OffPolicyConfig)
    dynamic_sampling: DynamicSamplingConfig = opt(DynamicSamplingConfig)
    injection: InjectionConfig = opt(InjectionConfig)


@dataclass
class ActorConfig:
    tensor_parallel: int = opt(1, ge=1)
    """Megatron tensor-parallel size."""
    pipeline_parallel: int = opt(1, ge=1)
    """Megatron pipeline-parallel size."""
    virtual_pipeline: int | None = opt(None, ge=2)
    """Virtual pipeline stages per rank (interleaved schedule); None disables it."""
    expert_parallel: int = opt(1, ge=1)
    """Megatron expert-parallel size for mixture-of-experts models (Qwen3-MoE): each rank of an expert-parallel
    group holds num_experts / this many experts of every layer, and tokens travel to them by all-to-all. Must
    divide the data-parallel ranks (world / (tensor_parallel * pipeline_parallel)); refused for dense models."""
    expert_tensor_parallel: int | None = opt(None, ge=1)
    """Mixture of experts: ranks that split each expert (megatron-core's expert_tensor_parallel_size); None = the
    tensor-parallel size. 1 with TP > 1 keeps experts whole and lets the TP ranks hold different experts instead
    (expert_parallel x expert_tensor_parallel x pipeline_parallel must divide the ranks). Refused for dense models."""
    moe_aux_loss_coeff: float = opt(0.0, ge=0.0)
    """Mixture of experts: weight of megatron-core's load-balancing loss (Switch-style, per layer) in the
    actor's loss; 0 trains the router by the policy loss alone."""
    moe_z_loss_coeff: float = opt(0.0, ge=0.0)
    """Mixture of experts: weight of the router z-loss (ST-MoE, Zoph et al. 2022: the mean over tokens of
    logsumexp(router logits)^2), which keeps the router's logits small; 0 = off."""
    routing_replay: str = opt("off", choices=("off", "rollout"))
    """Mixture of experts: rollout replays the experts the rollout engine routed each token to (R3: the engine
    returns them, SGLang's `return_routed_experts`) in the actor's forward for old log-probs and training, so that
    train and rollout run the same experts; off lets the actor route. Metrics under moe/ (replay mismatch, expert
    load, router entropy). Refused for dense models, vLLM engines, and (not built yet) with tensor parallelism."""
    context_parallel: int = opt(1, ge=1)
    """Megatron context-parallel size: each sequence is cut into 2 x this many chunks and every rank of a CP group
    holds two of them (load-balanced for causal attention), so activation memory per rank falls with it.
    Transformer Engine's attention on GPU (actor.attention auto), else the sdpa attention with all-gathered keys and
    values (CPU/gloo too). Rows are padded to a multiple of 2 x context_parallel; not with pack_sequences or
    attention local. Ranks = tensor x pipeline x context x data parallel."""
    precision: str = opt("auto", choices=("auto", "fp32", "bf16", "bf16_autocast"))
    """Parameter/compute dtype: auto = bf16 on GPU, fp32 on CPU. bf16_autocast keeps parameters, gradients and
    Adam in fp32 and runs the matrix products in bf16 (torch.autocast): every update reaches the weights, at
    about the speed of bf16 compute on CPUs with bf16 dot products (the CPU quick start)."""
    fp8: str | None = opt(None, choices=("e4m3", "hybrid"))
    """FP8 training through Transformer Engine (GPU only); None disables it."""
    fp8_recipe: str = opt("delayed", choices=("delayed", "tensorwise", "blockwise", "mxfp8"))
    """FP8 scaling recipe (what the installed Transformer Engine supports)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs actor.tensor_parallel > 1): outside attention and the MLPs each
    tensor-parallel rank holds 1 / TP of the sequence's activations (norms, dropout, residuals). Needed for a
    mixture of experts at TP > 1. Transformer Engine's layers on GPU, the local spec's elsewhere (CPU/gloo too)."""
    attention: str = opt("auto", choices=("auto", "sdpa", "local"))
    """Core attention. auto: Transformer Engine's layer spec when TE imports on a GPU, else sdpa. sdpa: megatron's
    local layer spec with attention through torch's scaled_dot_product_attention (flash kernels, memory linear in
    the sequence length; no packed sequences yet). local: the local spec's own DotProductAttention, which stores
    [b, heads, s, s] probabilities (a reference for comparisons). sdpa and local use the local spec even on GPU,
    so they refuse fp8 (a TE setting)."""
    lr: float = opt(1e-6, gt=0.0)
    """Peak learning rate (the study: 1e-6, constant)."""
    lr_schedule: str = opt("constant", choices=("constant", "linear", "cosine"))
    """Decay after warmup."""
    warmup_steps: int = opt(0, ge=0)
    """Linear warmup from 0 over this many optimizer steps."""
    lr_decay_steps: int | None = opt(None, gt=0)
    """Optimizer step at which linear/cosine decay reaches min_lr (counted from the start, warmup included);
    required by those schedules, unused by constant."""
    min_lr: float = opt(0.0, ge=0.0)
    """Learning rate at the end of linear/cosine decay."""
    weight_decay: float = opt(0.0, ge=0.0)
    """Decoupled (AdamW) weight decay; never applied to biases and norms."""
    adam_beta1: float = opt(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = opt(0.999, ge=0.0, lt=1.0)
    adam_eps: float = opt(1e-8, gt=0.0)
    """Added to the square root of Adam's second moment."""
    grad_clip: float = opt(1.0, ge=0.0)
    """Global gradient-norm clip; 0 disables it."""
    freeze_embeddings: bool = False
    """Keep the input embedding and output layer fixed (tied or not). On a small model with tied embeddings, Adam
    moves every vocabulary row by about lr each step on the softmax's tiny, noisy gradients; freezing them
    keeps rare-token logits where pretraining left them (the CPU quick start does)."""
    micro_batch_tokens: int = opt(8192, gt=0)
    """Token budget of one micro-batch (dynamic batch size): padded rows x length, or with pack_sequences the real
    tokens."""
    pack_sequences: bool = False
    """Lay each micro-batch's sequences end to end in one row, attended per sequence (THD: megatron's
    PackedSeqParams; Transformer Engine's kernels on GPU, the sdpa attention per sequence elsewhere): no padding
    is computed. Needs logits_chunk_tokens > 0, attention auto or sdpa, and no virtual_pipeline."""
    recompute: str = opt("none", choices=("none", "selective", "full"))
    """Activation recompute (megatron-core's): full keeps only each transformer layer's input and recomputes the
    layer in the backward (activations ~ layers x s x h: what lets 8k+ token sequences train in a few GiB, for
    about one more forward); selective recomputes the core attention only (megatron's `core_attn`: pays off with
    attention that stores [heads, s, s] scores, i.e. actor.attention=local; sdpa and TE keep O(s) already)."""
    recompute_layers: int = opt(1, ge=1)
    """Under recompute=full: layers per recomputed block (megatron's uniform method; 1 stores every layer's input,
    larger stores fewer and recomputes more at once)."""
    offload_activations: bool = False
    """Offload saved activations to host memory during the forward (megatron-core's CPU offloading, which needs
    Transformer Engine on a GPU; refused elsewhere: on a CPU they already live in host memory)."""
    logits_chunk_tokens: int = opt(1024, ge=0)
    """Response tokens whose logits are formed at once for log-probs, entropy and the loss: the model hands back
    its final hidden states and the [tokens, vocab] logits exist one chunk at a time, recomputed in the backward
    (memory flat in the response length). 0: the model's full logits, ~5 MB per token on a 49k vocabulary (the
    reference path)."""
    updates_per_batch: int = opt(1, ge=1)
    """Optimizer steps per rollout batch (the study: 1, fully on-policy): the batch is cut into this many
    consecutive mini-batches, each one gated update with its own loss denominator, all clipped against the policy
    at the start of the step (its log-probs computed once first). RL only; `lcot-mega sft` refuses it."""


@dataclass
class TrainerConfig:
    steps: int = opt(100, ge=1)
    """RL steps (rollout + update) to run."""
    prompts_per_step: int = opt(64, ge=1)
    """Prompt groups per step (the study: 64)."""
    seed: int = 1
    run_dir: str = "runs/default"
    """Where the resolved config, metrics, checkpoints and eval results go."""
    save_every: int = opt(10, ge=0)
    """Checkpoint every N steps; 0 saves only at the end."""
    keep_last: int = opt(3, ge=1)
    """Checkpoints kept on disk (older ones are deleted after a newer one is written)."""
    keep_good: int = opt(1, ge=1)
    """Checkpoints marked good by the guards (rollback targets, docs/STABILITY.md) kept beside the `keep_last`
    newest: the newest `keep_good` of them. A rollback restores the newest; older ones are its fallback should it be
    corrupt. Older good checkpoints are deleted like any other."""
    eval_every: int = opt(10, ge=0)
    """Evaluate on data.eval every N steps; 0 disables it."""
    max_staleness: int = opt(0, ge=0)
    """Asynchronous RL: how many weight versions older than the weights it trains a sample may be. 0 is the
    synchronous loop. k > 0: while the actor trains step t, the engine samples step t+k's batch with the weights
    of step t-1, so steps train on samples k versions old; groups over the bound are dropped and counted. Needs an
    engine that does not share the actor's devices (cluster.mode local or disaggregated, not SGLang on the
    actor's GPU), except with rollout.partial at k = 1, which samples no step ahead; docs/ASYNC.md."""


@dataclass
class SftConfig:
    """`lcot-mega sft`: supervised fine-tuning (the study's cold start) on the same Megatron actor. It reads
    `model`, `actor` (parallelism, precision, memory, lr and its schedule), `trainer.run_dir / seed / save_every /
    keep_last / eval_every` and `logging`; `trainer.steps` is replaced by `epochs` over the data, and the RL-only
    sections (data, rollout, reward, algo, guards) must keep their defaults."""

    train: list[str] = opt([])
    """Training examples: .jsonl/.json/.parquet files of rows `{"prompt": str, "response": str}` or
    `{"messages": [{"role": ..., "content": ...}, ...]}` ending with an assistant message (docs/SFT.md)."""
    eval: list[str] = opt([])
    """Held-out example files (same formats) whose mean response-token loss is logged as `sft/eval_loss`
    (every `trainer.eval_every` steps and at the end)."""
    eval_fraction: float = opt(0.0, ge=0.0, lt=1.0)
    """With no `eval` files: this share of the training examples (a fixed random choice) is held out instead."""
    epochs: float = opt(1.0, gt=0.0)
    """Passes over the training examples; the run has ceil(epochs x examples / batch_size) optimizer steps."""
    batch_size: int = opt(32, ge=1)
    """Examples per optimizer step (the global batch; micro-batches follow actor.micro_batch_tokens)."""
    max_tokens: int = opt(4096, ge=2)
    """Prompt plus response tokens an example may have; longer ones are left out and counted (never cut: a
    truncated chain of thought would teach the model to stop mid-thought)."""
    chat_template: bool = True
    """Render rows with the tokenizer's chat template (the prompt as a user turn, the response as the assistant
    turn, its end-of-turn tokens trained too); false: prompt and response tokens as they are, plus EOS."""


@dataclass
class EvalConfig:
    """Held-out evaluation during training (data.eval); the full evaluation suite is `lcot-mega eval`."""

    n_samples: int = opt(1, ge=1)
    """Responses per problem; accuracy is their mean (avg@k). Small benchmarks need many (Mu et al. 2025)."""
    temperature: float = opt(0.0, ge=0.0)
    """0 is greedy decoding (then n_samples = 1 is enough)."""
    top_p: float = opt(1.0, gt=0.0, le=1.0)
    """Nucleus mass; the study evaluates at temperature 0.6, top_p 0.95."""
    max_new_tokens: int | None = opt(None, gt=0)
    """Response length limit; None uses rollout.max_new_tokens."""
    at_start: bool = True
    """Evaluate before the first step, so every run reports its starting accuracy."""


@dataclass
class ClusterConfig:
    """Where the actor ranks and rollout engines run (see DESIGN.md, Ray)."""

    mode: str = opt("local", choices=("local", "colocated", "disaggregated"))
    """local: one process, actor and embedded engine in it (no Ray). colocated: Ray actors; the engines share
    devices with the actor ranks and release memory while it trains. disaggregated: Ray actors; engines are
    separate servers that receive weights by distributed broadcast."""
    ray_address: str | None = None
    """None starts a local Ray instance; an address (`ray://host:10001`, `auto`) joins a running cluster."""
    actor_ranks: int = opt(1, ge=1)
    """Actor processes (tensor x pipeline x context x data parallel sizes); data parallel = ranks / (TP x PP x CP)."""
    num_engines: int = opt(1, ge=1)
    """Rollout engines (servers); requests are spread over them, least loaded first."""
    gpus_per_rank: float = opt(0.0, ge=0.0)
    """GPUs per actor rank (0 on CPU)."""
    gpus_per_engine: float = opt(0.0, ge=0.0)
    """GPUs per rollout engine (0 on CPU; an SGLang server with TP=k needs k)."""
    cpus_per_rank: float = opt(1.0, gt=0.0)
    """CPUs reserved per actor rank in the placement group."""
    cpus_per_engine: float = opt(1.0, gt=0.0)
    """CPUs reserved per rollout engine in the placement group."""


@dataclass
class MonitorConfig:
    """One stability monitor (docs/STABILITY.md): bounds on one metric and the action when it leaves them.

    `min`/`max` are absolute bounds; `min_ratio`/`max_ratio` compare the value with the median of its last
    `window` accepted values (a relative drop, or a spike), checked once `window` values are known."""

    action: str = opt("warn", choices=("off", "log", "warn", "skip_step", "rollback", "halt"))
    min: float | None = None
    max: float | None = None
    min_ratio: float | None = opt(None, gt=0.0)
    max_ratio: float | None = opt(None, gt=0.0)
    window: int = opt(10, ge=1)
    patience: int = opt(1, ge=1)
    """Consecutive breaching steps before a skip / rollback / halt is taken; the earlier ones are warnings that keep
    the update but neither enter the windows nor confirm a checkpoint good (a trend, not one noisy batch)."""


def _monitor(action: str, **bounds: float | int | None) -> MonitorConfig:
    """A monitor field's default (a fresh MonitorConfig per Config)."""
    return field(default_factory=lambda: MonitorConfig(action=action, **bounds))


@dataclass
class GuardsConfig:
    """Stability guards: watch every step, then go on, skip the update, roll back or halt (docs/STABILITY.md)."""

    enabled: bool = True
    nonfinite: MonitorConfig = _monitor("skip_step")
    """NaN/Inf in the loss, gradient norm, log-probs or any other metric of the step (bounds unused)."""
    entropy: MonitorConfig = _monitor("rollback", min_ratio=0.25, max_ratio=4.0, window=10, patience=3)
    """actor/entropy: collapse (below a quarter of its recent median) or blow-up (four times it), three steps in a
    row: the token entropy of a dozen kept samples dips that far for one step now and then in a healthy run."""
    kl_ref: MonitorConfig = _monitor("warn")
    """actor/kl_loss: KL to the reference policy (only with algo.kl_coef > 0)."""
    kl_old: MonitorConfig = _monitor("warn", max=0.1)
    """actor/ppo_kl: KL to the policy that sampled the batch (grows with actor.updates_per_batch)."""
    clipfrac: MonitorConfig = _monitor("warn", max=0.5)
    """actor/clipfrac: share of tokens whose ratio was clipped."""
    grad_norm: MonitorConfig = _monitor("skip_step", max_ratio=10.0, window=20)
    """actor/grad_norm (before clipping): a spike against the running median skips the update."""
    response_len: MonitorConfig = _monitor("warn", max_ratio=3.0, window=10)
    """rollout/response_len_mean: runaway growth."""
    truncation: MonitorConfig = _monitor("warn", max=0.5)
    """rollout/truncated_frac: share of responses cut at rollout.max_new_tokens."""
    repetition: MonitorConfig = _monitor("warn", max=0.3)
    """rollout/repetition_frac: share of responses that end in a repeated loop (degenerate output)."""
    logp_gap: MonitorConfig = _monitor("warn", max=1.0)
    """rollout/logp_gap_mean: train-vs-rollout log-prob mismatch (a broken weight sync or kernel drift)."""
    reward: MonitorConfig = _monitor("warn", min_ratio=0.3, window=10)
    """reward/mean: collapse against its recent median."""
    staleness: MonitorConfig = _monitor("warn")
    """rollout/staleness_mean: how many updates old the trained samples are on average (trainer.max_staleness > 0;
    the hard bound is the drop at max_staleness); none by default, set `max` to act below it."""
    off_policy_masked: MonitorConfig = _monitor("warn", max=0.2)
    """rollout/is_masked_frac: share of tokens an off-policy correction masked out (algo.off_policy): the behaviour
    policy has drifted too far from the trained one."""
    expert_load: MonitorConfig = _monitor("warn", max_ratio=1.5, window=10)
    """moe/expert_load_max (mixture of experts): the busiest expert's share of tokens over the mean, worst layer.
    Expert collapse (the router sending ever more tokens to a few experts) shows as a jump against its recent
    median; a set `max` bounds it absolutely (E / k is every token on the same k experts)."""
    router_entropy: MonitorConfig = _monitor("warn", min_ratio=0.5, window=10)
    """moe/router_entropy (mixture of experts): the router's mean entropy falling to half its recent median, the
    other face of collapse (the routing turns one-hot)."""
    replay_mismatch: MonitorConfig = _monitor("warn", max=0.2)
    """moe/replay_mismatch (actor.routing_replay: rollout): share of replayed tokens whose own top-k differs from the
    engine's. A few percent is precision (a bf16 engine); a fifth means engine and actor run different weights."""
    max_rollbacks: int = opt(3, ge=0)
    """Rollbacks allowed in one run; the next one halts instead."""
    rollback_lr_factor: float = opt(0.5, gt=0.0, le=1.0)
    """The learning rate is multiplied by this at each rollback (1.0 keeps it)."""
    rollback_reseed: bool = True
    """After a rollback, sample with new seeds (else the same rollouts may lead to the same failure)."""
    good_after: int = opt(1, ge=0)
    """A checkpoint is marked good once this many following steps pass every guard (0: when saved)."""


@dataclass
class InjectConfig:
    """Faults injected on purpose (tests, drills); every list names trainer steps (docs/STABILITY.md)."""

    nan_grad_at_step: list[int] = opt([])
    """Make every gradient NaN in the update of these steps."""
    entropy_collapse_at_step: list[int] = opt([])
    """After these steps' updates, multiply the final norm's weight by `collapse_scale` (a real, sharp policy)."""
    collapse_scale: float = opt(30.0, gt=1.0)
    kill_engine_at_step: list[int] = opt([])
    """SIGKILL served engine 0 while these steps' rollouts run (served engines: rollout.served or sglang in local
    mode, or disaggregated mode)."""
    hang_engine_at_step: list[int] = opt([])
    """SIGSTOP served engine 0 while these steps' rollouts run (a hung server)."""
    sigterm_at_step: list[int] = opt([])
    """Send SIGTERM to the driver during these steps."""
    crash_in_save_at_step: list[int] = opt([])
    """Kill the driver (os._exit) in the middle of writing these steps' checkpoints."""
    disk_full_at_step: list[int] = opt([])
    """Fail these steps' checkpoint writes with ENOSPC."""


@dataclass
class DebugConfig:
    inject: InjectConfig = opt(InjectConfig)


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Write TensorBoard events into the run directory (metrics.jsonl is always written)."""
    wandb: str = opt("disabled", choices=("disabled", "offline", "online"))
    """Weights & Biases mode; never required."""
    wandb_project: str = "lcot-mega"


@dataclass
class Config:
    model: ModelConfig = opt(ModelConfig)
    data: DataConfig = opt(DataConfig)
    rollout: RolloutConfig = opt(RolloutConfig)
    reward: RewardConfig = opt(RewardConfig)
    algo: AlgoConfig = opt(AlgoConfig)
    actor: ActorConfig = opt(ActorConfig)
    trainer: TrainerConfig = opt(TrainerConfig)
    logging: LoggingConfig = opt(LoggingConfig)
    eval: EvalConfig = opt(EvalConfig)
    cluster: ClusterConfig = opt(ClusterConfig)
    guards: GuardsConfig = opt(GuardsConfig)
    debug: DebugConfig = opt(DebugConfig)
    sft: SftConfig = opt(SftConfig)


def cross_field_errors(cfg: Config) -> list[str]:
    """Constraints that involve more than one key."""
    errors = []
    rl = cfg.reward.relative_length
    if rl.lower > rl.upper:
        errors.append(f"reward.relative_length.lower = {rl.lower} must be <= reward.relative_length.upper = {rl.upper}")
    if cfg.reward.overlong.enabled and cfg.reward.overlong.buffer_len >= cfg.rollout.max_new_tokens:
        errors.append(
            f"reward.overlong.buffer_len = {cfg.reward.overlong.buffer_len} must be < rollout.max_new_tokens"
            f" = {cfg.rollout.max_new_tokens}"
        )
    errors += _loss_max_len_errors(cfg)
    actor = cfg.actor
    if actor.lr_schedule != "constant" and (actor.lr_decay_steps is None or actor.lr_decay_steps <= actor.warmup_steps):
        errors.append(
            f"actor.lr_schedule = {actor.lr_schedule!r} needs actor.lr_decay_steps > actor.warmup_steps"
            f" = {actor.warmup_steps} (got {actor.lr_decay_steps})"
        )
    if actor.min_lr > actor.lr:
        errors.append(f"actor.min_lr = {actor.min_lr} must be <= actor.lr = {actor.lr}")
    if cfg.algo.polarity != "weighted" and cfg.algo.positive_weight != 1.0:
        errors.append(
            f"algo.positive_weight = {cfg.algo.positive_weight} only applies with algo.polarity = 'weighted'"
            f" (got {cfg.algo.polarity!r})"
        )
    if cfg.algo.is_cap is not None and cfg.algo.off_policy.correction != "none":
        errors.append(
            f"algo.is_cap = {cfg.algo.is_cap} is shorthand for algo.off_policy.correction = 'tis'; it cannot be"
            f" combined with algo.off_policy.correction = {cfg.algo.off_policy.correction!r}: set one of them"
        )
    if cfg.algo.polarity in ("both", "weighted") and (cfg.algo.reserve_ratio or cfg.algo.reserve_min):
        errors.append("algo.reserve_ratio / algo.reserve_min only apply with algo.polarity = 'positive' or 'negative'")
    if actor.routing_replay != "off" and cfg.rollout.engine == "vllm":
        errors.append("actor.routing_replay needs an engine that reports routed experts (embedded, sglang), not vllm")
    return errors


def _loss_max_len_errors(cfg: Config) -> list[str]:
    """Dr.GRPO (Liu et al. 2025) divides each response's token sum by the constant `algo.loss_max_len`, which
    must bound every response: `aggregate` raises on a longer one, so a smaller value would fail the first step
    that samples a response longer than it, after the rollout. Whether a loss_agg that ignores the key is given
    one needs the aggregation registry: `trainer.preflight` checks that."""
    algo, limit = cfg.algo, cfg.rollout.max_new_tokens
    if algo.loss_agg != "seq-mean-token-sum-norm":
        return []
    if algo.loss_max_len is None:
        return ["algo.loss_agg = 'seq-mean-token-sum-norm' needs algo.loss_max_len (a constant token count)"]
    if algo.loss_max_len < limit:
        return [
            f"algo.loss_max_len = {algo.loss_max_len} must be >= rollout.max_new_tokens = {limit} with algo.loss_agg"
            " = 'seq-mean-token-sum-norm': it is the constant every response's token sum is divided by, and a"
            f" response may be {limit} tokens long; set algo.loss_max_len={limit} (or ${{rollout.max_new_tokens}})"
        ]
    return []
