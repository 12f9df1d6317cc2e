"""One config schema for every command: typed dataclasses, YAML files, `key.sub=value` overrides.

Every field is checked at load. A bad value raises `ConfigError` whose message names the dotted
field and says how to fix it, so a run never starts with a config that fails later.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
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


@dataclass
class LoraConfig:
    # Rank of the adapters; 0 trains the full model. With r > 0 only the adapters train (peft), and the
    # versioned state kept for old logits (snapshots, the dedicated worker's versions, the EWMA) is adapters only.
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    # A local Hugging Face causal LM directory. Empty: the built-in tiny model (built locally).
    path: str = ""
    # Start from the SFT warm-start checkpoint of the configured env (built and cached on first use).
    warmstart: bool = True
    # Shape of the built-in tiny model (ignored when `path` is set).
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 512
    max_positions: int = 2048
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EngineConfig:
    backend: Literal["builtin", "vllm"] = "builtin"
    # auto: CUDA when available, else CPU; or an explicit "cpu", "cuda", "cuda:1" (built-in engine).
    device: str = "auto"
    # Engine numerics differ from the trainer's float32 on purpose, as vLLM's do from FSDP's.
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # Weight-only quantisation of the engine's copy, as rollouts are quantised in practice: int8 (per channel),
    # fp8 (e4m3 with a per-channel scale), int4 (group-wise, 32 weights per scale). The trainer stays unquantised.
    quantization: Literal["none", "int8", "fp8", "int4"] = "none"
    # Gaussian noise added to the engine's logits: an experiment knob for a stronger mismatch.
    logit_noise_std: float = 0.0
    max_batch_size: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    # vLLM only: fraction of accelerator memory for weights + KV cache (on vLLM's CPU build: of CPU memory).
    gpu_memory_utilization: float = 0.9
    # vLLM only: eager mode (no CUDA graphs). Empty: eager on CPU, graphs on a GPU.
    enforce_eager: bool | None = None


@dataclass
class EnvConfig:
    name: str = "frozenlake"
    max_turns: int = 8
    format_penalty: float = -0.1
    invalid_action: Literal["continue", "end"] = "continue"
    # Simulated tool latency per step: fixed when sigma is 0, else log-normal with this median.
    step_latency_ms: float = 0.0
    step_latency_sigma: float = 0.0
    step_timeout_s: float = 30.0
    # Environment-specific options (for example size, slippery), passed to the env's constructor.
    options: dict = field(default_factory=dict)


@dataclass
class RolloutConfig:
    group_size: int = 4
    groups_per_step: int = 8
    max_total_tokens: int = 1024
    partial_rollout: Literal["continue", "regenerate_turn"] = "continue"
    # Trajectories more than max_staleness versions old when their step comes: train or drop them.
    stale_policy: Literal["train", "drop"] = "drop"


@dataclass
class LossConfig:
    discrepancy_level: Literal["token", "sequence", "geometric"] = "token"
    discrepancy_action: Literal["truncate", "mask", "none"] = "mask"
    discrepancy_low: float = 0.5
    discrepancy_high: float = 2.0
    catastrophic: float | None = 1e-4
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = 3.0
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token-sum-norm"] = "token-mean"
    # Fixed denominator for `token-sum-norm` (tokens per batch you normalise by).
    normalizer: float = 1024.0


@dataclass
class AdvantageConfig:
    estimator: Literal["grpo", "reinforce", "discounted"] = "grpo"
    normalize_std: bool = False
    gamma: float = 1.0


@dataclass
class TrainerConfig:
    steps: int = 40
    lr: float = 2e-4
    # Optimizer steps over which the learning rate rises linearly to `lr` (lr/N, 2 lr/N, ..., lr). Adam moves
    # every weight by about lr on its first steps whatever the gradient's size, so a first batch with little
    # signal can move the policy far; a warm-up bounds that. 0: `lr` from the first step.
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    ppo_epochs: int = 1
    num_minibatches: int = 2
    max_grad_norm: float = 1.0
    max_consecutive_skips: int = 5
    # auto: CUDA when available, else CPU; or "cpu", "cuda", "cuda:1". With world_size > 1, auto and cuda
    # mean each rank's own GPU (cuda:rank).
    device: str = "auto"
    # Ranks of the sharded trainer (FSDP2 over torch.distributed: gloo on CPU, NCCL on GPUs). Rank 0 also runs
    # the rollout side. 1: one process, nothing sharded.
    world_size: int = 1
    # Compute precision: bfloat16 autocast over float32 master weights and optimizer state, or float32.
    # Old-logit scoring (exact sources, recompute, EWMA, audit) uses the same numerics.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Padded tokens per forward/backward: a minibatch is split into micro-batches under this budget (a longer
    # trajectory goes alone) with gradient accumulation; it also bounds old-logit scoring forwards. 0: no limit.
    max_tokens_per_microbatch: int = 0
    # Positions per chunk of the LM head when computing log-probs: [B, T, V] float32 logits are never held
    # whole (the chunk is recomputed in backward). 0: the whole sequence at once.
    logprob_chunk_size: int = 512
    # Hugging Face's activation checkpointing (recompute each layer in backward).
    gradient_checkpointing: bool = False


# The old-logit sources, by name: the one list that configs, `twofold compare` and the CLI read.
OldLogitSourceName = Literal[
    "snapshot", "dedicated", "interrupt", "ewma", "loglinear", "linear", "recompute", "behavior"
]
OLD_LOGIT_SOURCES: tuple[str, ...] = typing.get_args(OldLogitSourceName)
EXACT_SOURCES: tuple[str, ...] = ("snapshot", "dedicated", "interrupt")


@dataclass
class OldLogitsConfig:
    source: OldLogitSourceName = "ewma"
    # Also compute the exact old log-probs (via snapshots) and log the approximation's error.
    audit: bool = False
    # Bytes of weight snapshots held at once, e.g. "256MB". Empty: no limit.
    snapshot_budget: str = ""
    # When a snapshot would exceed the budget: capture that version's tokens now (wait) or use EWMA.
    on_budget: Literal["wait", "ewma"] = "wait"
    # EWMA decay per optimizer step; empty: the staleness-aware kW/(kW+2), k optimizer steps per version.
    ewma_beta: float | None = None
    ewma_reset_tau: float = 0.9
    ewma_auto_reset: bool = True
    # Sequences per forward when a source scores old log-probs (exact capture, recompute, EWMA, audit).
    max_sequences_per_forward: int = 16
    # Where the sources' model copies (snapshot scratch, dedicated worker, EWMA average and proxy) live.
    # auto: the trainer's device.
    device: str = "auto"
    # Where weight snapshots are kept; the snapshot budget counts bytes there. auto: CPU (pinned memory)
    # when the trainer is on a GPU, else the trainer's device.
    snapshot_device: str = "auto"


@dataclass
class WandbConfig:
    # A Weights & Biases project to log to; empty: W&B off (TensorBoard and metrics.jsonl stay on).
    project: str = ""
    entity: str = ""
    # The W&B run's name; empty: the run directory's name.
    name: str = ""
    # online, or offline (written under RUN_DIR/wandb, `wandb sync` later), or disabled
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class RunConfig:
    dir: str = ""
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class WarmstartConfig:
    episodes: int = 3000
    noise: float = 0.35
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 32
    eval_episodes: int = 200
    # Seed of the demonstrations and SFT, separate from the run's `seed`: every RL seed of a
    # comparison starts from the same warm-start checkpoint.
    seed: int = 0


@dataclass
class RayConfig:
    # An existing cluster to join ("auto" or "ray://host:10001"). Empty: start a local one for the run.
    address: str = ""
    engine_replicas: int = 2
    env_workers: int = 2
    # Resources per actor, as Ray schedules them (logical CPUs, GPUs or fractions).
    trainer_num_cpus: float = 1.0
    trainer_num_gpus: float = 0.0
    engine_num_cpus: float = 1.0
    engine_num_gpus: float = 0.0
    env_num_cpus: float = 0.0
    oldlogit_num_cpus: float = 1.0
    oldlogit_num_gpus: float = 0.0
    # A call to an engine replica or the old-logit actor that takes longer fails over (the run never hangs).
    request_timeout_s: float = 300.0


@dataclass
class RuntimeConfig:
    # embedded: every part in this process (the default). ray: engine replicas, env workers, trainer and
    # the dedicated old-logit worker as Ray actors.
    backend: Literal["embedded", "ray"] = "embedded"
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class Config:
    seed: int = 0
    mode: Literal["sync", "async"] = "async"
    max_staleness: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    oldlogits: OldLogitsConfig = field(default_factory=OldLogitsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------- conversion


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


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
        raise ConfigError(path, f"expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
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
            raise ConfigError(path, f"unknown key; valid keys here: {', '.join(names)}")
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


def parse_bytes(text: str, path: str = "oldlogits.snapshot_budget") -> int | None:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '' -> None (no limit)."""
    if text == "":
        return None
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ConfigError(path, f"cannot read {text!r} as a size; write for example '512MB' or '2GiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(name: str, path: str) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N', and CUDA only where it exists (the error names the field)."""
    if not _DEVICE.match(name):
        raise ConfigError(path, f"got {name!r}; write auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(path, f"{name!r} asked for, but this machine has no CUDA device; use auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(path, f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here")


def validate(cfg: Config) -> Config:
    """Ranges and combinations that the types alone cannot express."""

    def need(ok: bool, path: str, message: str) -> None:
        if not ok:
            raise ConfigError(path, message)

    need(cfg.max_staleness >= 0, "max_staleness", "must be >= 0 (0 means on-policy batches)")
    m = cfg.model
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        need(getattr(m, name) > 0, f"model.{name}", "must be a positive integer")
    need(m.hidden_size % m.num_heads == 0, "model.hidden_size", "must be divisible by model.num_heads")
    need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", "must divide model.num_heads")
    need(m.vocab_size >= 300, "model.vocab_size", "must be >= 300 (256 byte tokens + merges + specials)")
    if m.path:
        need(
            Path(m.path).is_dir(),
            "model.path",
            f"no directory at {m.path!r}; give a local Hugging Face "
            "model directory, or leave it empty for the built-in tiny model",
        )
        need(
            not m.warmstart,
            "model.warmstart",
            "the warm start trains the built-in tiny model; set model.warmstart=false when model.path is given",
        )
    lora = m.lora
    need(lora.r >= 0, "model.lora.r", "must be >= 0 (0: train the full model)")
    need(lora.alpha > 0, "model.lora.alpha", "must be > 0")
    need(0 <= lora.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
    need(bool(lora.target_modules), "model.lora.target_modules", "name at least one module, e.g. [q_proj, v_proj]")
    for name in ("trainer.device", "engine.device", "oldlogits.device", "oldlogits.snapshot_device"):
        section, key = name.split(".")
        check_device(getattr(getattr(cfg, section), key), name)
    e = cfg.engine
    need(e.temperature > 0, "engine.temperature", "must be > 0")
    need(0 < e.top_p <= 1, "engine.top_p", "must be in (0, 1]")
    need(e.top_k >= 0, "engine.top_k", "must be >= 0 (0 disables top-k)")
    need(e.max_new_tokens > 0, "engine.max_new_tokens", "must be > 0")
    need(e.max_batch_size > 0, "engine.max_batch_size", "must be > 0")
    need(e.logit_noise_std >= 0, "engine.logit_noise_std", "must be >= 0")
    need(0 < e.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization", "must be in (0, 1]")
    need(
        e.quantization == "none" or e.backend == "builtin",
        "engine.quantization",
        "quantisation is a built-in engine option; for vLLM use its own quantised checkpoints",
    )
    v = cfg.env
    need(v.max_turns > 0, "env.max_turns", "must be > 0")
    need(v.step_latency_ms >= 0, "env.step_latency_ms", "must be >= 0")
    need(v.step_latency_sigma >= 0, "env.step_latency_sigma", "must be >= 0")
    need(v.step_timeout_s > 0, "env.step_timeout_s", "must be > 0")
    r = cfg.rollout
    need(r.group_size >= 1, "rollout.group_size", "must be >= 1")
    need(r.groups_per_step >= 1, "rollout.groups_per_step", "must be >= 1")
    need(r.max_total_tokens >= 64, "rollout.max_total_tokens", "must be >= 64")
    need(
        r.max_total_tokens <= m.max_positions,
        "rollout.max_total_tokens",
        f"must be <= model.max_positions ({m.max_positions})",
    )
    if cfg.advantage.estimator == "grpo":
        need(
            r.group_size >= 2,
            "rollout.group_size",
            "GRPO compares trajectories of a group: use >= 2, or advantage.estimator=reinforce",
        )
    lo = cfg.loss
    need(
        0 <= lo.discrepancy_low <= 1 <= lo.discrepancy_high,
        "loss.discrepancy_low",
        "need 0 <= discrepancy_low <= 1 <= discrepancy_high (a band around ratio 1; 0: no lower bound)",
    )
    need(
        lo.catastrophic is None or 0 < lo.catastrophic < (lo.discrepancy_low or 1.0),
        "loss.catastrophic",
        "must be in (0, discrepancy_low) (in (0, 1) when discrepancy_low is 0), or null to disable the veto",
    )
    need(0 <= lo.eps_low < 1, "loss.eps_low", "must be in [0, 1)")
    need(lo.eps_high >= 0, "loss.eps_high", "must be >= 0")
    need(lo.dual_clip is None or lo.dual_clip > 1, "loss.dual_clip", "must be > 1 (Ye et al. 2020), or null")
    need(lo.normalizer > 0, "loss.normalizer", "must be > 0")
    need(0 < cfg.advantage.gamma <= 1, "advantage.gamma", "must be in (0, 1]")
    t = cfg.trainer
    need(t.steps >= 1, "trainer.steps", "must be >= 1")
    need(t.lr > 0, "trainer.lr", "must be > 0")
    need(t.lr_warmup_steps >= 0, "trainer.lr_warmup_steps", "must be >= 0 optimizer steps (0: no warm-up)")
    need(t.ppo_epochs >= 1, "trainer.ppo_epochs", "must be >= 1")
    need(t.num_minibatches >= 1, "trainer.num_minibatches", "must be >= 1")
    need(
        t.num_minibatches <= r.groups_per_step * r.group_size,
        "trainer.num_minibatches",
        "must be <= trajectories per step (rollout.groups_per_step * rollout.group_size)",
    )
    need(t.max_grad_norm > 0, "trainer.max_grad_norm", "must be > 0")
    need(t.max_consecutive_skips >= 1, "trainer.max_consecutive_skips", "must be >= 1")
    need(t.world_size >= 1, "trainer.world_size", "must be >= 1 (1: one process, nothing sharded)")
    if t.world_size > 1 and t.device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
        need(
            (t.device == "auto" and gpus == 0) or gpus >= t.world_size,
            "trainer.world_size",
            f"{t.world_size} ranks on CUDA need {t.world_size} GPUs; this machine has {gpus} "
            "(or set trainer.device=cpu)",
        )
    need(t.max_tokens_per_microbatch >= 0, "trainer.max_tokens_per_microbatch", "must be >= 0 (0: no limit)")
    need(t.logprob_chunk_size >= 0, "trainer.logprob_chunk_size", "must be >= 0 (0: no chunking)")
    o = cfg.oldlogits
    parse_bytes(o.snapshot_budget)
    need(
        o.ewma_beta is None or 0 <= o.ewma_beta < 1,
        "oldlogits.ewma_beta",
        "must be in [0, 1), or null for the staleness-aware W/(W+2)",
    )
    need(0 < o.ewma_reset_tau <= 1, "oldlogits.ewma_reset_tau", "must be in (0, 1]")
    need(o.max_sequences_per_forward >= 1, "oldlogits.max_sequences_per_forward", "must be >= 1")
    need(
        not (cfg.mode == "sync" and o.source == "interrupt"),
        "oldlogits.source",
        "'interrupt' captures tokens of in-flight rollouts, which sync mode never has; use mode=async "
        "or a source such as 'snapshot'",
    )
    need(
        not (o.audit and o.source in EXACT_SOURCES),
        "oldlogits.audit",
        f"'{o.source}' is already exact; audit compares approximate sources against snapshots",
    )
    need(
        not (cfg.mode == "sync" and r.partial_rollout != "continue"),
        "rollout.partial_rollout",
        "sync mode never interrupts a rollout; leave it at 'continue'",
    )
    need(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0 (0 disables periodic checkpoints)")
    need(cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
    ray = cfg.runtime.ray
    need(ray.engine_replicas >= 1, "runtime.ray.engine_replicas", "must be >= 1")
    need(ray.env_workers >= 1, "runtime.ray.env_workers", "must be >= 1")
    for name in (
        "trainer_num_cpus",
        "trainer_num_gpus",
        "engine_num_cpus",
        "engine_num_gpus",
        "env_num_cpus",
        "oldlogit_num_cpus",
        "oldlogit_num_gpus",
    ):
        need(getattr(ray, name) >= 0, f"runtime.ray.{name}", "must be >= 0")
    need(ray.request_timeout_s > 0, "runtime.ray.request_timeout_s", "must be > 0")
    w = cfg.warmstart
    need(w.episodes >= 1, "warmstart.episodes", "must be >= 1")
    need(0 <= w.noise <= 1, "warmstart.noise", "must be in [0, 1]")
    need(w.epochs >= 1, "warmstart.epochs", "must be >= 1")
    need(w.lr > 0, "warmstart.lr", "must be > 0")
    need(w.batch_size >= 1, "warmstart.batch_size", "must be >= 1")
    need(w.eval_episodes >= 1, "warmstart.eval_episodes", "must be >= 1")
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- overrides, then type and range checks."""
    data: dict = {}
    if path is not None:
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
        data = _merge(data, loaded)
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
