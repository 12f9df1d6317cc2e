"""The memory plan: what each part of a run keeps on which device, how many bytes, and whether it fits.

Computed from the config and the model's shapes alone (its `config.json`: nothing is loaded or built), so it
answers for a machine you are not on (`twofold plan`) as well as for this one (`train()` logs it and refuses a
run that cannot fit, before anything is placed on a device). With P the model's parameters, A the LoRA
adapters' (0 for a full fine-tune), T = P or A the parameters that train, N = trainer.world_size and
W = max_staleness, per trainer rank:

    trainer weights    4 (P + A) / N        float32 master weights, FSDP-sharded over the N ranks
    AdamW moments      8 T / N + 4 t        two float32 moments per trained parameter, a step count per tensor
    gradients          4 T / N              during a train step (set to None after each optimizer step)
    AdamW temporaries  4 T / N              during the step on CUDA (the foreach kernels' sqrt(v) buffer)
    logits             3 x 4 C V            float32 logits of one LM-head chunk of C positions: the logits,
                                            the log-softmax's temporaries and, in backward, their gradient
    old-logit state    per source           see `oldlogit_parts`
and on rank 0's process the engine: built-in, P x (2 or 4 bytes) of weights plus its KV cache
(2 L kv d bytes per token, for max_batch_size x max_total_tokens tokens); vLLM on GPUs, its
`gpu_memory_utilization` share of each of its GPUs (weights / tensor_parallel_size and KV cache inside it),
which it needs free when it starts.

A device's peak is what it always holds plus the largest of its phases' transients (a train step, scoring old
log-probs, publishing weights, and, when the engine sleeps between steps (`engine.sleep`, sync mode),
generation, which then alone holds the engine's weights and KV cache), which never coexist. Activations, the
CUDA context and allocator slack are not counted, so the plan is a lower bound on the peak, except for the
built-in engine's KV cache, which is counted at its most (a full batch of the longest trajectories):
`engine.max_batch_size` bounds it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from twofold.config import Config, ConfigError, LoraConfig, load_config, parse_bytes
from twofold.engine.placement import publish_bytes, sleep_frees_trainer_gpu, weight_transfer_path
from twofold.pipeline.rundir import leftover_snapshot_bytes

log = logging.getLogger(__name__)

GIB = 2**30
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Float32 [C, V] buffers alive at once in a chunk's forward and backward: logits, exp(logits - max), the
# gradient of the logits.
LOGIT_BUFFERS = 3
# Model types whose parameters the formula of `parameter_count` is checked against (tests/test_plan.py).
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEVICE_KEYS = ("trainer.device", "engine.device", "oldlogits.device", "oldlogits.snapshot_device")
HOST = "cpu"
# `oldlogits.snapshot_device=disk`: files, checked against the free space where the run writes (its checkpoints
# are not counted: a plan that fits says the snapshots fit, not that the whole run does)
DISK = "disk"

# What a part is (one name each: tests and the refusal message look parts up by it).
TRAINER_WEIGHTS = "trainer weights"
OPTIMIZER_STATE = "AdamW moments"
GRADIENTS = "gradients"
OPTIMIZER_TEMPORARIES = "AdamW temporaries"
LOGITS = "logits"
ENGINE_WEIGHTS = "engine weights"
ENGINE_KV_CACHE = "engine KV cache"
ENGINE_PREFIX_CACHE = "engine prefix cache"
VLLM_SHARE = "vLLM share"
ENGINE_WEIGHTS_WOKEN = "engine weights, back for the update"
SNAPSHOTS = "snapshots"
SNAPSHOT_IN_USE = "snapshot in use"
EWMA_AVERAGE = "EWMA average"
EWMA_IN_USE = "EWMA average in use"
OWN_SHARDS_KEPT = "trained shards set aside"
DEDICATED_COPY = "dedicated worker copy"
TO_WORKER = "weights to the worker"
TO_ENGINE = "weights to the engine"
GATHERED_WEIGHT = "weight being published"
# The parts `memory/oldlogit_extra_bytes` counts (`OldLogitSource.extra_bytes`).
OLDLOGIT_STATE = (SNAPSHOTS, EWMA_AVERAGE, DEDICATED_COPY)

# When a part is held: always, or only during one phase of a step (phases never overlap).
ALWAYS, TRAIN_STEP, SCORING, PUBLISH, GENERATION = "always", "train step", "scoring", "publish", "generation"


# --------------------------------------------------------------------------- model shapes and parameter counts


@dataclass(frozen=True)
class ModelShapes:
    """A decoder-only causal LM's shapes, as its Hugging Face `config.json` gives them."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q, k, v projections have biases (Qwen2; Llama-style configs with attention_bias)
    o_bias: bool  # the output projection has one (attention_bias)
    mlp_bias: bool
    qk_norm: bool  # an RMSNorm of head_dim on q and on k in every layer (Qwen3)
    name: str = ""

    @property
    def known(self) -> bool:
        return self.model_type in KNOWN_MODEL_TYPES


def model_shapes(config: dict, name: str = "") -> ModelShapes:
    """The shapes of a `config.json` mapping (a multimodal one's `text_config`). Keys a config may omit take
    the defaults of transformers' Llama/Qwen2 classes: kv heads = heads, head_dim = hidden / heads, an untied
    head (which counts the most parameters, so an omitted key never under-counts)."""
    config = config.get("text_config") or config
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in need if not isinstance(config.get(k), int)]
    if missing:
        raise ConfigError("model.path", f"config.json of {name or 'the model'} has no {', '.join(missing)}")
    model_type = str(config.get("model_type", ""))
    heads = config["num_attention_heads"]
    attention_bias = bool(config.get("attention_bias", False))
    return ModelShapes(
        model_type=model_type,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        name=name,
    )


def read_model_shapes(folder: str | Path) -> ModelShapes:
    """The shapes in `folder/config.json`: the one file read (no weights, no tokenizer)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("model.path", f"cannot read {str(path)!r} ({e})") from None
    return model_shapes(config, Path(folder).name)


def projection_shapes(s: ModelShapes) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a decoder layer, by its Hugging Face name."""
    q, kv, h, i = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.hidden_size, s.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _layer_biases(s: ModelShapes) -> dict[str, bool]:
    attention = {"q_proj": s.qkv_bias, "k_proj": s.qkv_bias, "v_proj": s.qkv_bias, "o_proj": s.o_bias}
    return attention | {"gate_proj": s.mlp_bias, "up_proj": s.mlp_bias, "down_proj": s.mlp_bias}


def parameter_count(s: ModelShapes) -> int:
    """Parameters of the model (tied embeddings once), with H hidden, L layers, V vocabulary, I intermediate,
    q = heads x head_dim, kv = kv_heads x head_dim:

        V H (embeddings) + V H (the LM head, untied only) + H (final norm)
        + L [H q + 2 H kv + q H (attention) + 3 H I (MLP) + 2 H (norms)
             + q + 2 kv (q/k/v biases) + H (o bias) + 2 I + H (MLP biases) + 2 head_dim (q/k norms), where present]
    """
    per_layer = 2 * s.hidden_size + (2 * s.head_dim if s.qk_norm else 0)
    biases = _layer_biases(s)
    for name, (fan_in, fan_out) in projection_shapes(s).items():
        per_layer += fan_in * fan_out + (fan_out if biases[name] else 0)
    embeddings = s.vocab_size * s.hidden_size
    head = 0 if s.tie_word_embeddings else embeddings
    return embeddings + head + s.hidden_size + s.num_layers * per_layer


def parameter_tensors(s: ModelShapes) -> int:
    """Parameter tensors of the model (AdamW keeps a step count for each): embeddings, head (untied), final
    norm, and per layer 7 weights, their biases, 2 norms (+ 2 q/k norms)."""
    per_layer = 7 + sum(_layer_biases(s).values()) + 2 + (2 if s.qk_norm else 0)
    return 2 + (0 if s.tie_word_embeddings else 1) + s.num_layers * per_layer


def lora_targets(s: ModelShapes, lora: LoraConfig) -> tuple[list[str], list[str]]:
    """(the target modules the plan counts, those it does not know) of `model.lora.target_modules`."""
    known = projection_shapes(s)
    return [m for m in lora.target_modules if m in known], [m for m in lora.target_modules if m not in known]


def lora_parameter_count(s: ModelShapes, lora: LoraConfig) -> int:
    """Adapter parameters: r (in + out) for each targeted linear layer (A is [r, in], B is [out, r]), in each
    of the L layers; 0 for a full fine-tune (r = 0)."""
    if lora.r == 0:
        return 0
    shapes = projection_shapes(s)
    return s.num_layers * sum(lora.r * sum(shapes[m]) for m in lora_targets(s, lora)[0])


@dataclass(frozen=True)
class ParameterCounts:
    base: int  # the model's own parameters
    adapters: int  # LoRA adapters' (0: full fine-tune)
    trained: int  # those that train: base (full) or adapters (LoRA)
    trained_tensors: int

    @property
    def model(self) -> int:
        """Parameters of the policy as the trainer holds it: the base and its adapters."""
        return self.base + self.adapters


def parameter_counts(s: ModelShapes, lora: LoraConfig) -> ParameterCounts:
    base, adapters = parameter_count(s), lora_parameter_count(s, lora)
    if lora.r == 0:
        return ParameterCounts(base, 0, base, parameter_tensors(s))
    return ParameterCounts(base, adapters, adapters, 2 * s.num_layers * len(lora_targets(s, lora)[0]))


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Machine:
    """The machine a plan is for: GPUs of `gpu_memory` bytes each, and host memory (None: not checked)."""

    gpus: int
    gpu_memory: int
    host_memory: int | None
    # vLLM's CPU build reserves VLLM_CPU_KVCACHE_SPACE GiB for its KV cache (twofold sets 1 unless you do).
    vllm_cpu_kv_cache: int = GIB
    # The host CPU multiplies bf16 natively (AVX512-BF16, AMX); without it the built-in engine holds its bf16
    # weights as float32 (`engine.builtin.hold_weights_in_float32_`), twice the bytes.
    host_bf16_matmul: bool = True
    # Free bytes on the file system of the run directory, which holds disk snapshots; None: not checked.
    disk_free: int | None = None


@dataclass(frozen=True)
class Part:
    kind: str  # one of the names above
    detail: str  # how its bytes come about, for the table
    nbytes: int
    key: str  # the config key that shrinks it
    phase: str = ALWAYS


@dataclass(frozen=True)
class DevicePlan:
    device: str  # cuda:N, or cpu (the host)
    capacity: int | None  # None: unknown, not checked
    parts: tuple[Part, ...]

    def held(self, phase: str) -> int:
        return sum(p.nbytes for p in self.parts if p.phase == phase)

    @property
    def peak(self) -> int:
        """What the device always holds plus its largest phase (phases never overlap)."""
        phases = {p.phase for p in self.parts} - {ALWAYS}
        return self.held(ALWAYS) + max((self.held(phase) for phase in phases), default=0)

    @property
    def overflow(self) -> int:
        return 0 if self.capacity is None else max(self.peak - self.capacity, 0)

    @property
    def fits(self) -> bool:
        return self.overflow == 0


@dataclass(frozen=True)
class Problem:
    key: str
    message: str


@dataclass(frozen=True)
class MemoryPlan:
    shapes: ModelShapes
    counts: ParameterCounts
    machine: Machine
    devices: tuple[DevicePlan, ...]
    problems: tuple[Problem, ...]  # placements that cannot work whatever the bytes
    warnings: tuple[str, ...]
    engine_sleeps: bool = False  # the engine releases its memory between steps (`engine_sleeps`)

    @property
    def fits(self) -> bool:
        return not self.problems and all(d.fits for d in self.devices)

    def bytes_of(self, *kinds: str, device: str | None = None) -> int:
        """Bytes of the parts of these kinds, on `device` or on every device."""
        return sum(p.nbytes for d in self.devices if device in (None, d.device) for p in d.parts if p.kind in kinds)

    def device(self, name: str) -> DevicePlan:
        return next(d for d in self.devices if d.device == name)


def _per_rank(nbytes: int, world_size: int) -> int:
    return math.ceil(nbytes / world_size)


def _placed(name: str, rank: int, gpus: int) -> str:
    """The device a rank's process means by a device name: auto and cuda are its own GPU (cuda:rank, as
    `rank_device` gives it; rank 0's is cuda:0) when the machine has GPUs, auto is the CPU otherwise."""
    if name == "cpu" or (name == "auto" and gpus == 0):
        return HOST
    if name in ("auto", "cuda"):
        return f"cuda:{rank % max(gpus, 1)}"
    return name


def logit_positions(cfg: Config) -> int:
    """Positions whose [V] float32 logits exist at once: one LM-head chunk (`trainer.logprob_chunk_size`) of a
    forward's real positions. A forward holds a train micro-batch (a minibatch's rows on this rank, or
    `max_tokens_per_microbatch` tokens; a longer trajectory alone) or a scoring batch of
    `max_sequences_per_forward` trajectories, each at most `rollout.max_total_tokens` long."""
    t, r = cfg.trainer, cfg.rollout
    rows = math.ceil(math.ceil(r.groups_per_step * r.group_size / t.num_minibatches) / t.world_size)
    tokens = max(rows, cfg.oldlogits.max_sequences_per_forward) * r.max_total_tokens
    if t.max_tokens_per_microbatch:
        tokens = min(tokens, max(t.max_tokens_per_microbatch, r.max_total_tokens))
    return min(tokens, t.logprob_chunk_size) if t.logprob_chunk_size else tokens


def trainer_parts(cfg: Config, s: ModelShapes, n: ParameterCounts, on_cuda: bool) -> list[Part]:
    """One rank's trainer: float32 weights, AdamW, and a train step's gradients, optimizer buffer and logits."""
    ws = cfg.trainer.world_size
    shard = f", 1/{ws} shard" if ws > 1 else ""
    trained = _per_rank(FLOAT32 * n.trained, ws)
    positions = logit_positions(cfg)
    parts = [
        Part(TRAINER_WEIGHTS, f"float32{shard}", _per_rank(FLOAT32 * n.model, ws), "trainer.world_size"),
        Part(OPTIMIZER_STATE, f"2 x float32{shard}", 2 * trained + FLOAT32 * n.trained_tensors, "model.lora.r"),
        Part(GRADIENTS, f"float32{shard}", trained, "model.lora.r", TRAIN_STEP),
        Part(
            LOGITS,
            f"{LOGIT_BUFFERS} x {positions} positions x {s.vocab_size:,} x float32",
            LOGIT_BUFFERS * positions * s.vocab_size * FLOAT32,
            "trainer.logprob_chunk_size",
            TRAIN_STEP,
        ),
    ]
    if on_cuda:  # the CPU's single-tensor AdamW needs one tensor's buffer at a time
        parts.append(Part(OPTIMIZER_TEMPORARIES, f"float32{shard}", trained, "model.lora.r", TRAIN_STEP))
    gathered = weight_gathered(cfg, s)
    if gathered:
        parts.append(Part(GATHERED_WEIGHT, "float32, one at a time", gathered, "trainer.world_size", PUBLISH))
    return parts


def engine_parts(
    cfg: Config, s: ModelShapes, n: ParameterCounts, machine: Machine, sleeps: bool = False
) -> list[tuple[str, Part]]:
    """The engine, in rank 0's process: (device, part) pairs. The built-in engine holds its weights in
    `engine.dtype` (quantisation is simulated in it) and a KV cache of 2 L kv_heads head_dim values per token
    for `max_batch_size` sequences of `rollout.max_total_tokens`; vLLM on GPUs takes its share of each of its
    GPUs (`engine.device` on, `engine.tensor_parallel_size` of them: `EngineConfig.gpu_indices`), on its CPU build
    its weights and a fixed KV cache in host memory. `sleeps`: all of it is held while generating only, and
    the weights again (without the KV cache) while new ones are published into them."""
    held = GENERATION if sleeps else ALWAYS
    e = cfg.engine
    width = DTYPE_BYTES[e.dtype]
    weights = n.base * width  # LoRA policies reach the engine merged: the base's shapes
    # vLLM's updates, and Ray's, travel whole through host memory: the tensors, and their packed bytes (vLLM) or
    # their copy in the object store (Ray)
    payload = (HOST, Part(TO_ENGINE, f"{e.dtype} x 2, rank 0", weights * 2, "engine.dtype", PUBLISH))
    if e.backend == "vllm" and machine.gpus > 0:
        trainer = _placed(cfg.trainer.device, 0, machine.gpus)
        try:
            path = weight_transfer_path(e, trainer, engine_on_gpu=True)
        except ConfigError:  # refused when the engine starts, with the devices named
            path = "host"
        if path != "host":  # packed in reused buffers on the trainer's GPU (`placement.publish_bytes`)
            nbytes = publish_bytes(path, largest_weight(s) * width)
            what = f"{path}, packed buffers and weights, {e.dtype}"
            payload = (trainer, Part(TO_ENGINE, what, nbytes, "engine.weight_transfer", PUBLISH))
        share = int(e.gpu_memory_utilization * machine.gpu_memory)
        gpus = e.gpu_indices()
        per_gpu = f"1/{len(gpus)} of the " if len(gpus) > 1 else ""
        detail = (
            f"{e.gpu_memory_utilization:g} x {format_bytes(machine.gpu_memory)}, "
            f"{per_gpu}weights {format_bytes(weights)} in it"
        )
        shares = [(f"cuda:{g}", Part(VLLM_SHARE, detail, share, "engine.gpu_memory_utilization", held)) for g in gpus]
        if sleeps:
            woken = Part(ENGINE_WEIGHTS_WOKEN, e.dtype, weights // len(gpus), "engine.sleep", PUBLISH)
            shares += [(f"cuda:{g}", woken) for g in gpus]
        return [payload, *shares]
    if e.backend == "vllm":
        kv = Part(ENGINE_KV_CACHE, "VLLM_CPU_KVCACHE_SPACE", machine.vllm_cpu_kv_cache, "engine.max_batch_size")
        return [payload, (HOST, Part(ENGINE_WEIGHTS, e.dtype, weights, "engine.dtype")), (HOST, kv)]
    device = _placed(e.device, 0, machine.gpus)
    tokens = e.max_batch_size * cfg.rollout.max_total_tokens
    kv_bytes = 2 * s.num_layers * s.num_kv_heads * s.head_dim * width * tokens
    held_as = e.dtype
    if device == HOST and width < 4 and not machine.host_bf16_matmul:
        weights, held_as = n.base * 4, f"{e.dtype} values held as float32 (no native bf16 matmul)"
    prefix = parse_bytes(e.prefix_cache, "engine.prefix_cache") or 0
    if cfg.runtime.backend == "ray":
        to_engine = payload
    else:  # streamed onto the engine's device (`iter_full_weights`)
        in_flight = 2 * largest_weight(s) * width
        to_engine = (device, Part(TO_ENGINE, f"2 tensors at a time, {e.dtype}", in_flight, "engine.device", PUBLISH))
    parts = [
        to_engine,
        (device, Part(ENGINE_WEIGHTS, held_as, weights, "engine.device", held)),
        (device, Part(ENGINE_KV_CACHE, f"{tokens:,} tokens x {e.dtype}", kv_bytes, "engine.max_batch_size", held)),
        (device, Part(ENGINE_PREFIX_CACHE, "at most", prefix, "engine.prefix_cache", held)),
    ]
    if sleeps:
        parts.append((device, Part(ENGINE_WEIGHTS_WOKEN, held_as, weights, "engine.sleep", PUBLISH)))
    return parts


def largest_weight(s: ModelShapes) -> int:
    """Elements of the largest weight tensor: the embedding (or LM head) or an MLP matrix."""
    return max(s.vocab_size, s.intermediate_size) * s.hidden_size


def weight_gathered(cfg: Config, s: ModelShapes) -> int:
    """Bytes a trainer rank holds beyond its weights while it publishes them (`iter_full_weights`, one parameter
    at a time): a sharded parameter's float32 gather; under LoRA the float32 copy of an adapted weight and the
    delta B @ A it adds (two float32 temporaries while it is formed)."""
    gather = FLOAT32 * largest_weight(s) if cfg.trainer.world_size > 1 else 0
    if cfg.model.lora.r == 0:
        return gather
    shapes = projection_shapes(s)
    adapted = max((shapes[m][0] * shapes[m][1] for m in lora_targets(s, cfg.model.lora)[0]), default=0)
    return max(gather, 3 * FLOAT32 * adapted)


def snapshot_versions(cfg: Config, version_bytes: int) -> int:
    """Versions held at once: one in async mode whatever W (the version being trained, taken before the update
    and freed at the next step's start, once the tokens it sampled in trajectories still in flight are scored:
    `SnapshotSource.prepare`), none in sync mode (every token is the trainer's version, scored before the
    update); at most what `oldlogits.snapshot_budget` (per rank) holds."""
    versions = 1 if cfg.mode == "async" else 0
    budget = parse_bytes(cfg.oldlogits.snapshot_budget)
    return versions if budget is None else min(versions, budget // max(version_bytes, 1))


def oldlogit_parts(
    cfg: Config, kind: str, n: ParameterCounts, rank: int, trainer: str, gpus: int, label: str = ""
) -> list[tuple[str, Part]]:
    """One rank's old-logit state for source `kind`, as (device, part) pairs (`twofold/oldlogits/`):

        snapshot    held versions of the trained parameters, 4 T / N each, on `snapshot_device`; while one
                    scores, it is moved to the trainer's device (one process) or a sharded rank keeps its own
                    trained shards aside, 4 T / N, while the version's stand in for them (`with_parameters`)
        ewma        the float32 average, 4 T / N, on `oldlogits.device`; while it scores (in the train step),
                    moved to the trainer's device when it lives elsewhere (one process), or a sharded rank's
                    own trained shards kept aside, 4 T / N, as for a snapshot
        dedicated   rank 0: a whole float32 policy, 4 (P + A), on `oldlogits.device` (under LoRA, unsharded
                    and on the trainer's device: its adapters, 4 T, beside the trainer's frozen base), and
                    each version's gathered trained parameters, 4 T, on their way to it through host memory
        interrupt, recompute, behavior, linear, loglinear: nothing (they score with the trainer's own model)
    An approximate source with `oldlogits.audit` also keeps the auditing snapshot source's state.
    """
    o, ws = cfg.oldlogits, cfg.trainer.world_size
    sharded = ws > 1
    copies = trainer if o.device == "auto" else _placed(o.device, rank, gpus)
    if o.snapshot_device != "auto":
        snapshots = _placed(o.snapshot_device, rank, gpus)
    else:
        snapshots = HOST if trainer.startswith("cuda") else trainer
    version = _per_rank(FLOAT32 * n.trained, ws)
    out: list[tuple[str, Part]] = []

    def add(device: str, what: str, detail: str, nbytes: int, key: str, phase: str = ALWAYS) -> None:
        out.append((device, Part(what, f"{label}{detail}", nbytes, key, phase)))

    if kind == "snapshot":
        held = snapshot_versions(cfg, version)
        add(snapshots, SNAPSHOTS, f"{held} x {format_bytes(version)}", held * version, "oldlogits.snapshot_budget")
        if sharded and held:
            add(trainer, OWN_SHARDS_KEPT, f"float32, 1/{ws} shard", version, "oldlogits.snapshot_device", SCORING)
        elif snapshots != trainer and held:
            add(trainer, SNAPSHOT_IN_USE, "one version", version, "oldlogits.snapshot_device", SCORING)
        if o.on_budget == "ewma":
            out += oldlogit_parts(cfg, "ewma", n, rank, trainer, gpus, f"{label}fallback: ")
    elif kind == "ewma":
        add(copies, EWMA_AVERAGE, "float32", version, "oldlogits.device")
        if sharded:
            add(trainer, OWN_SHARDS_KEPT, f"float32, 1/{ws} shard", version, "oldlogits.device", TRAIN_STEP)
        elif copies != trainer:
            add(trainer, EWMA_IN_USE, "float32", version, "oldlogits.device", TRAIN_STEP)
    elif kind == "dedicated" and rank == 0:
        if n.adapters and not sharded and copies == trainer:  # the copy shares the trainer's frozen base
            add(copies, DEDICATED_COPY, "float32, adapters (base shared)", FLOAT32 * n.trained, "oldlogits.device")
        else:
            add(copies, DEDICATED_COPY, "float32, whole", FLOAT32 * n.model, "oldlogits.device")
        add(HOST, TO_WORKER, "float32, one version", FLOAT32 * n.trained, "oldlogits.source", PUBLISH)
    if o.audit and not label:
        out += oldlogit_parts(cfg, "snapshot", n, rank, trainer, gpus, "audit: ")
    return out


def placement_problems(cfg: Config, s: ModelShapes, n: ParameterCounts, machine: Machine) -> list[Problem]:
    """What cannot work on `machine` whatever the bytes: a GPU it lacks, more CUDA ranks than GPUs, a
    snapshot budget below one version, a vLLM share smaller than vLLM's weights."""
    out = []
    for key in DEVICE_KEYS:
        section, field = key.split(".")
        name = getattr(getattr(cfg, section), field)
        index = int(name.split(":")[1]) if re.fullmatch(r"cuda:\d+", name) else 0
        if name.startswith("cuda") and index >= machine.gpus:
            out.append(Problem(key, f"{name!r} asked for, but the machine has {machine.gpus} GPU(s)"))
    t = cfg.trainer
    if t.world_size > 1 and t.device in ("auto", "cuda") and 0 < machine.gpus < t.world_size:
        out.append(
            Problem(
                "trainer.world_size",
                f"{t.world_size} ranks on CUDA need {t.world_size} GPUs; the machine has {machine.gpus}",
            )
        )
    o = cfg.oldlogits
    budget = parse_bytes(o.snapshot_budget)
    version = _per_rank(FLOAT32 * n.trained, t.world_size)
    if budget is not None and budget < version and (o.source == "snapshot" or o.audit):
        out.append(
            Problem(
                "oldlogits.snapshot_budget", f"{budget:,} bytes cannot hold one snapshot ({version:,} bytes per rank)"
            )
        )
    e = cfg.engine
    if e.sleep and not can_sleep(cfg, machine):
        out.append(
            Problem(
                "engine.sleep",
                "vLLM sleeps only on a GPU (its sleep mode is CUDA/ROCm only), and it frees the trainer memory only "
                "on the trainer's GPU; set engine.sleep=false, or engine.device to the trainer's GPU",
            )
        )
    if e.backend == "vllm" and machine.gpus > 0:
        gpus = e.gpu_indices()
        if max(gpus) >= machine.gpus:
            out.append(
                Problem(
                    "engine.device",
                    f"vLLM on {e.device} with tensor_parallel_size {e.tensor_parallel_size} needs GPUs "
                    f"{gpus[0]}-{gpus[-1]}; the machine has {machine.gpus}",
                )
            )
        weights = n.base * DTYPE_BYTES[e.dtype] // len(gpus)
        share = int(e.gpu_memory_utilization * machine.gpu_memory)
        if share <= weights:
            out.append(
                Problem(
                    "engine.gpu_memory_utilization",
                    f"vLLM's share {format_bytes(share)} cannot hold its {e.dtype} weights ({format_bytes(weights)}) "
                    "and a KV cache",
                )
            )
    return out


def _merge(placed: Sequence[tuple[str, Part]], machine: Machine) -> tuple[DevicePlan, ...]:
    """Parts grouped by device; the same part of several ranks on one device (host snapshots) summed."""
    by_device: dict[str, dict[tuple, list[Part]]] = {}
    for device, part in placed:
        by_device.setdefault(device, {}).setdefault((part.kind, part.detail, part.key, part.phase), []).append(part)

    def order(device: str) -> tuple[int, int]:
        if device in (HOST, DISK):
            return (1 if device == HOST else 2, 0)
        return (0, int(device.split(":")[1]) if ":" in device else 0)

    out = []
    for device in sorted(by_device, key=order):
        parts = []
        for (kind, detail, key, phase), same in by_device[device].items():
            count = f"{len(same)} ranks x " if len(same) > 1 else ""
            parts.append(Part(kind, count + detail, sum(p.nbytes for p in same), key, phase))
        capacity = {HOST: machine.host_memory, DISK: machine.disk_free}.get(device, machine.gpu_memory)
        out.append(DevicePlan(device, capacity, tuple(parts)))
    return tuple(out)


def can_sleep(cfg: Config, machine: Machine) -> bool:
    """Whether the engine can release its memory between steps (`engine.sleep`): in sync mode, in this process
    (embedded), and for vLLM on GPUs only with the trainer's GPU among the engine's (elsewhere it frees nothing
    the trainer uses)."""
    if cfg.mode != "sync" or cfg.runtime.backend != "embedded":
        return False
    if cfg.engine.backend == "builtin":
        return True
    trainer = _placed(cfg.trainer.device, 0, machine.gpus)
    return machine.gpus > 0 and sleep_frees_trainer_gpu(cfg.engine, trainer)


def engine_sleeps(cfg: Config, shapes: ModelShapes, machine: Machine) -> bool:
    """`engine.sleep` as set, or when empty: on where the engine can sleep and the run fits `machine` only if it
    does."""
    if not can_sleep(cfg, machine):
        return False  # an explicit engine.sleep=true is a placement problem (`placement_problems`)
    if cfg.engine.sleep is not None:
        return cfg.engine.sleep
    return not memory_plan(cfg, shapes, machine, sleeps=False).fits and memory_plan(cfg, shapes, machine, True).fits


def memory_plan(cfg: Config, shapes: ModelShapes, machine: Machine, sleeps: bool | None = None) -> MemoryPlan:
    """Where every part of a run of `cfg` on `machine` goes and how many bytes it takes (module docstring);
    `sleeps`: whether the engine sleeps between steps (None: `engine_sleeps`)."""
    if sleeps is None:
        sleeps = engine_sleeps(cfg, shapes, machine)
    counts = parameter_counts(shapes, cfg.model.lora)
    placed: list[tuple[str, Part]] = []
    for rank in range(cfg.trainer.world_size):
        trainer = _placed(cfg.trainer.device, rank, machine.gpus)
        placed += [(trainer, p) for p in trainer_parts(cfg, shapes, counts, trainer.startswith("cuda"))]
        placed += oldlogit_parts(cfg, cfg.oldlogits.source, counts, rank, trainer, machine.gpus)
    placed += engine_parts(cfg, shapes, counts, machine, sleeps)
    warnings = []
    if not shapes.known:
        warnings.append(
            f"model_type {shapes.model_type!r} is not one of {', '.join(KNOWN_MODEL_TYPES)}: its parameters are "
            "counted as a Llama-shaped decoder's"
        )
    unknown = lora_targets(shapes, cfg.model.lora)[1] if cfg.model.lora.r else []
    if unknown:
        warnings.append(f"LoRA target modules not counted (not a q/k/v/o or MLP projection): {', '.join(unknown)}")
    if cfg.runtime.backend == "ray":
        warnings.append("runtime.backend=ray: Ray places the parts on its nodes; each row is what they need together")
    return MemoryPlan(
        shapes,
        counts,
        machine,
        _merge(placed, machine),
        tuple(placement_problems(cfg, shapes, counts, machine)),
        tuple(warnings),
        sleeps,
    )


# --------------------------------------------------------------------------- reading it


def format_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB', 30462466048 -> '28.4 GiB'; binary units, one decimal."""
    if n is None:
        return "unknown"
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _alike(devices: Sequence[DevicePlan]) -> list[tuple[str, DevicePlan]]:
    """Runs of GPUs that hold the same parts (a sharded trainer's ranks 1..N-1), each as one labelled device."""
    runs: list[list[DevicePlan]] = []
    for d in devices:
        gpus = bool(runs) and not {HOST, DISK} & {d.device, runs[-1][0].device}
        if gpus and (runs[-1][0].parts, runs[-1][0].capacity) == (d.parts, d.capacity):
            runs[-1].append(d)
        else:
            runs.append([d])
    return [(r[0].device if len(r) == 1 else f"{r[0].device}-{r[-1].device.split(':')[1]} each", r[0]) for r in runs]


def _largest(d: DevicePlan) -> Part:
    return max(d.parts, key=lambda p: p.nbytes)


def verdict(plan: MemoryPlan) -> str:
    """One line: 'fits', or what does not fit and by how many bytes."""
    devices = _alike(plan.devices)
    if plan.fits:
        return "fits: " + ", ".join(
            f"{name} {format_bytes(d.peak)} of {format_bytes(d.capacity)}" for name, d in devices
        )
    over = [
        f"{name} needs {d.peak:,} bytes ({format_bytes(d.peak)}) of {format_bytes(d.capacity)}, {d.overflow:,} "
        f"bytes ({format_bytes(d.overflow)}) over; largest: {_largest(d).kind} {format_bytes(_largest(d).nbytes)} "
        f"({_largest(d).key})"
        for name, d in devices
        if not d.fits
    ]
    return "does not fit: " + "; ".join([*over, *(f"{p.key}: {p.message}" for p in plan.problems)])


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table: per device, each part's bytes and when it is held, the peak, and the verdict."""
    s, n, m = plan.shapes, plan.counts, plan.machine
    tuning = f"LoRA, {n.adapters:,} adapter parameters train" if n.adapters else "full fine-tune"
    gpus = f"{m.gpus} GPU(s) x {format_bytes(m.gpu_memory)}" if m.gpus else "no GPU"
    row = "{:<16}{:<56}{:<12}{:>17}{:>11}"
    sleeping = ["the engine sleeps between steps (engine.sleep): it holds its memory while generating"]
    lines = [
        f"memory plan: {s.name or 'model'} ({s.model_type or 'unknown type'}), {n.base:,} parameters, {tuning}",
        f"machine: {gpus}, host {format_bytes(m.host_memory)}"
        + (f", {format_bytes(m.disk_free)} free on disk" if m.disk_free is not None else ""),
        *(sleeping if plan.engine_sleeps else []),
        *(f"warning: {w}" for w in plan.warnings),
        "",
        row.format("device", "part", "held", "bytes", ""),
    ]
    for name, d in _alike(plan.devices):
        parts = sorted(d.parts, key=lambda p: p.phase != ALWAYS)  # what it always holds first
        for i, p in enumerate(parts):
            part = f"{p.kind} ({p.detail})" if p.detail else p.kind
            lines.append(row.format(name if i == 0 else "", part, p.phase, f"{p.nbytes:,}", format_bytes(p.nbytes)))
        status = "fits" if d.fits else f"DOES NOT FIT: {d.overflow:,} bytes ({format_bytes(d.overflow)}) over"
        peak = f"peak: always + largest phase, of {format_bytes(d.capacity)}"
        lines.append(row.format("", peak, "", f"{d.peak:,}", format_bytes(d.peak)) + f"  {status}")
    lines += [
        "not counted: activations (trainer.max_tokens_per_microbatch, trainer.gradient_checkpointing), the CUDA "
        "context, allocator slack",
        verdict(plan),
    ]
    return "\n".join(lines)


def plan_error(plan: MemoryPlan) -> ConfigError:
    """The refusal of a plan that does not fit, naming the key of the largest part where it overflows."""
    over = [d for d in plan.devices if not d.fits]
    key = _largest(over[0]).key if over else plan.problems[0].key
    return ConfigError(key, f"this run {verdict(plan)} (`twofold plan` prints the table)")


# --------------------------------------------------------------------------- this machine, another machine


def total_ram(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemTotal in bytes; None where the kernel does not say (no /proc)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_disk(path: Path) -> int | None:
    """Free bytes of the file system that `path` is on, or will be: the nearest folder of it that exists is
    asked (a run directory is made after its plan); None where the OS does not say."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def this_machine(run_dir: Path | None = None) -> Machine:
    """This machine: its GPUs (the smallest one's memory for all), its RAM and, given the run directory, the
    free space where its disk snapshots would go."""
    import torch  # here: `twofold plan` for another machine never needs it

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    memory = min((torch.cuda.get_device_properties(i).total_memory for i in range(gpus)), default=0)
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    # a resumed run's store removes the snapshot files its stopped run left, so their bytes count as free
    free = free_disk(run_dir) if run_dir is not None else None
    disk = free + leftover_snapshot_bytes(run_dir) if free is not None else None
    return Machine(gpus, memory, total_ram(), host_bf16_matmul=bf16, disk_free=disk)


def check_memory_plan(cfg: Config, model_path: Path, run_dir: Path | None = None) -> MemoryPlan:
    """The plan of `cfg` on this machine, logged; one that cannot fit is refused (ConfigError) before anything
    is placed on a device. Only the embedded runtime is refused: Ray places parts on nodes of its own."""
    plan = memory_plan(cfg, read_model_shapes(model_path), this_machine(run_dir))
    log.info("%s", format_plan(plan))
    if not plan.fits and cfg.runtime.backend == "embedded":
        raise plan_error(plan)
    return plan


def planned_config(path: str | Path | None, overrides: Sequence[str]) -> Config:
    """The config of a run on another machine: device names (cuda:3) are checked for their form, not against
    this machine's GPUs, as config validation does for a remote Ray cluster; everything else as `load_config`."""
    # (engine.sleep is only checked against the runtime, which the device check below pretends is Ray)
    remote = load_config(path, [*overrides, "runtime.backend=ray", "runtime.ray.address=planned", "engine.sleep=null"])
    cfg = load_config(path, [*overrides, *(f"{key}=cpu" for key in DEVICE_KEYS)])
    for key in DEVICE_KEYS:
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, getattr(getattr(remote, section), field))
    return cfg
