"""Models and tokenizers: any local Hugging Face causal LM, or a tiny one built here.

The tiny model is an ordinary transformers Qwen2 model with an ordinary `PreTrainedTokenizerFast`
(a byte-level BPE trained on the environments' own text, with a ChatML template), saved to disk and
loaded back through the same generic path as a real model. Nothing is downloaded.

Also what a policy version is made of: `versioned_state` (the parameters that train: the whole model,
or only LoRA adapters) and `full_weights` (what an engine loads, LoRA merged). Trainer-side log-probs
are in `twofold.logprobs`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from twofold.config import ConfigError, ModelConfig
from twofold.distributed import full_tensor, local_tensor

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

# ChatML, with tools the way Qwen2.5's template renders them: the schemas in the system turn, calls as
# <tool_call> JSON, results as <tool_response> blocks in a user turn. Without tools it is plain ChatML.
# Transformers renders templates with trim_blocks, so a newline right after a {% tag %} is written {{ '\n' }}.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each call, return a JSON "
    "object with the function name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' }}{{ message['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}{{ '\\n<tool_call>\\n' }}"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Bump when the tiny model or tokenizer recipe changes, so cached builds are not reused.
TINY_RECIPE = 1


def cache_dir() -> Path:
    """Where built models and warm-start checkpoints are cached (`TWOFOLD_CACHE`, default ./.cache)."""
    return Path(os.environ.get("TWOFOLD_CACHE", ".cache"))


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`: any text encodes, the env text compresses well."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(cfg: ModelConfig, vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def ensure_tiny_model(cfg: ModelConfig, corpus: list[str], seed: int = 0) -> Path:
    """Build (once) and return the directory of the tiny model + tokenizer for this config."""
    shape = {
        k: getattr(cfg, k)
        for k in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "vocab_size",
            "max_positions",
        )
    }
    path = cache_dir() / "models" / f"tiny-{fingerprint(TINY_RECIPE, shape, seed, corpus)}"
    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    model = build_tiny_model(cfg, len(tokenizer), seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.replace(path)
    return path


def save_random_model(
    path: str | Path,
    *,
    arch: str = "qwen2",
    vocab_size: int = 32000,
    hidden_size: int = 512,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    intermediate_size: int = 1024,
    tie_word_embeddings: bool = True,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised Hugging Face causal LM of the given shape, with a BPE tokenizer that has
    a chat template: the stand-in for a real model of that size, built without any download (tests and
    benchmarks). `arch` is "qwen2" or "llama". The model's vocabulary is padded beyond the tokenizer's, as
    real models' are; sampled ids past the tokenizer decode to nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    path = Path(path)
    tokenizer = build_tokenizer(
        corpus or ["user\n", "assistant\n", "<answer>Left</answer> Down Right Up"], min(vocab_size, 2048)
    )
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Any Hugging Face causal LM from a local directory; a clear error otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError("model.path", f"no directory at {str(p)!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("model.path", f"{str(p)!r} is not a loadable causal LM ({first})") from None
    return model.eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    try:
        tok = AutoTokenizer.from_pretrained(Path(path))
    except (ValueError, OSError) as e:
        raise ConfigError("model.path", f"no usable tokenizer in {str(path)!r} ({str(e).splitlines()[0]})") from None
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            "model.path",
            f"the tokenizer in {str(path)!r} has no chat template; multi-turn agents "
            "need one (set tokenizer.chat_template and save it)",
        )
    if tok.eos_token_id is None:
        raise ConfigError("model.path", f"the tokenizer in {str(path)!r} has no eos token")
    return tok


def model_bytes(model: torch.nn.Module, sharing_with: torch.nn.Module | None = None) -> int:
    """Bytes this process holds for `model`'s parameters (its shards, when sharded), leaving out the parameters
    that are `sharing_with`'s own (a copy sharing a frozen base counts only what it adds)."""
    shared = {id(p) for p in sharing_with.parameters()} if sharing_with is not None else set()
    return sum(local_tensor(p).numel() * p.element_size() for p in model.parameters() if id(p) not in shared)


def state_dict_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes this process holds for `state` (a sharded tensor counts its local shard)."""
    return sum(local_tensor(t).numel() * t.element_size() for t in state.values())


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def load_policy(path: str | Path, cfg: ModelConfig) -> torch.nn.Module:
    """The model RL trains: float32 weights from `path`, with LoRA adapters (peft) when `model.lora.r > 0`.

    With LoRA only the adapters require grad; everything versioned for old logits is adapters only.
    """
    model = load_model(path, torch.float32)
    if cfg.lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError("model.lora.target_modules", f"{e}".splitlines()[0]) from None


def with_lora(model: torch.nn.Module, lora_cfg) -> torch.nn.Module:
    """`model` with the LoRA adapters `lora_cfg` (a `LoraConfig` of twofold's, or peft's own) describes, base
    frozen; `model` itself when its rank is 0 (peft is not imported). On the meta device the adapters are meta
    too (nothing drawn)."""
    if lora_cfg.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    if not isinstance(lora_cfg, LoraConfig):
        lora_cfg = LoraConfig(
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules),
            bias="none",
        )
    try:
        return get_peft_model(model, lora_cfg)
    except ValueError as e:
        raise ConfigError("model.lora.target_modules", f"{e}".splitlines()[0]) from None


def _empty_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def empty_policy(path: str | Path, cfg: ModelConfig) -> torch.nn.Module:
    """The policy `load_policy(path, cfg)` builds, with every parameter and buffer on the meta device: its
    modules, names, shapes and tied weights, no memory and no values (read: `config.json` alone). A sharded
    trainer shards this and then fills its shards (`sharding.load_sharded_policy`)."""
    try:
        config = transformers.AutoConfig.from_pretrained(Path(path))
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("model.path", f"{str(path)!r} has no usable config.json ({first})") from None
    return with_lora(_empty_model(config), cfg.lora)


def versioned_state(model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A detached float32 copy of what changes between policy versions: the parameters that train.

    Every parameter for a full fine-tune (tied weights once, as `named_parameters` gives them); only the
    LoRA adapters under LoRA. Snapshots, the dedicated worker's versions and the EWMA hold this. A sharded
    parameter contributes this rank's shard (a plain tensor: it may live on another device than the mesh).
    A CPU copy of a GPU model goes to pinned memory, so loading it back can be asynchronous.
    """
    device = torch.device(device)
    pin = device.type == "cpu" and torch.cuda.is_available()
    out = {}
    for n, t in trained_tensors(model):
        t = t.to(device=device, dtype=torch.float32, copy=True)
        out[n] = t.pin_memory() if pin else t
    return out


def trained_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's tensor) of every parameter that trains, detached: what a policy version is."""
    for n, p in model.named_parameters():
        if p.requires_grad:
            yield n, local_tensor(p.detach())


def save_versioned_state(model: torch.nn.Module, path: Path) -> int:
    """`versioned_state(model)` written to `path` in torch's format (read back memory-mapped: `load_versioned_state`),
    straight from the parameters' own storage when they are float32 tensors with storage of their own, so no
    second copy is made on their device (`torch.save` moves a GPU storage to the host as it writes it); any
    other parameter (another dtype, a view into a larger buffer, as FSDP2's padded shards can be) is copied to
    the host first. Returns the bytes written."""
    state = {}
    for n, t in trained_tensors(model):
        own_storage = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        whole = t.dtype == torch.float32 and own_storage
        state[n] = t if whole else t.to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    torch.save(state, path)
    return sum(t.numel() * 4 for t in state.values())


def load_versioned_state(path: Path) -> dict[str, torch.Tensor]:
    """A state `save_versioned_state` wrote, memory-mapped on the CPU: its pages are read as the tensors are
    used and leave the process's resident memory with the last reference to them."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


@torch.no_grad()
def load_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (names as `named_parameters` gives them, e.g. a `versioned_state`) into `model`; a
    sharded parameter takes this rank's shard."""
    params = dict(model.named_parameters())
    for n, t in state.items():
        target = local_tensor(params[n])
        target.copy_(local_tensor(t).to(target.dtype), non_blocking=True)


@torch.no_grad()
def gathered_state(
    model: torch.nn.Module, keep: bool = True, dtype: torch.dtype = torch.float32, trained_only: bool = True
) -> dict[str, torch.Tensor]:
    """Whole tensors of the parameters (those that train, or all), on CPU in `dtype`. Sharded parameters are
    gathered one at a time (a collective: every rank calls this); a rank with `keep=False` takes part in the
    gathers and keeps nothing, so no rank ever holds more than one gathered parameter beyond what it keeps."""
    return dict(_iter_gathered(model, keep, dtype, "cpu", trained_only))


def _iter_gathered(
    model: torch.nn.Module, keep: bool, dtype: torch.dtype, device: str | torch.device, trained_only: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """`gathered_state`'s parameters one at a time, each a copy in `dtype` on `device` (every rank gathers)."""
    for n, p in model.named_parameters():
        if p.requires_grad or not trained_only:
            whole = full_tensor(p.detach())
            if keep:
                yield n, whole.to(device=device, dtype=dtype, copy=True)
            del whole


@torch.no_grad()
def full_weights(
    model: torch.nn.Module, keep: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Every weight under its Hugging Face name, detached, on CPU in `dtype`: what an engine loads for a version
    (`iter_full_weights`, kept whole)."""
    return dict(iter_full_weights(model, keep, dtype))


def _whole(p: torch.Tensor) -> torch.Tensor:
    return full_tensor(p.detach())


def _merged(module) -> torch.Tensor:
    """A LoRA layer's base weight with its active adapters merged, W + scale * B @ A, a float32 copy computed from the
    gathered A and B; the trainer's model is not touched, so no merge/unmerge rounding builds up."""
    weight = full_tensor(module.get_base_layer().weight.detach()).to(torch.float32, copy=True)
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            a = full_tensor(module.lora_A[adapter].weight.detach()).float()
            b = full_tensor(module.lora_B[adapter].weight.detach()).float()
            delta = (b @ a) * module.scaling[adapter]
            weight += delta.T if getattr(module, "fan_in_fan_out", False) else delta
    return weight


Gather = Callable[[], torch.Tensor]


def _publication(model: torch.nn.Module) -> Iterator[tuple[str, torch.Size, Gather, bool]]:
    """Every weight an engine loads: (Hugging Face name, whole shape, the gather that makes it, whether what it
    makes is a copy of its own), in order. Under LoRA, an adapted layer's weight is its merge (`_merged`) under
    the base layer's name."""
    if not is_lora(model):
        for n, p in model.named_parameters():
            yield n, p.shape, functools.partial(_whole, p), False
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    modules = dict(base.named_modules())
    for n, p in base.named_parameters():  # in the model's own order, layer by layer (vLLM reloads per layer)
        if "lora_" in n:
            continue
        owner = n.removesuffix(".base_layer.weight")
        if owner != n and isinstance(modules.get(owner), LoraLayer):
            yield f"{owner}.weight", p.shape, functools.partial(_merged, modules[owner]), True
        else:
            yield n.replace(".base_layer.", "."), p.shape, functools.partial(_whole, p), False


class WeightStream:
    """`iter_full_weights`: every weight under its Hugging Face name, one at a time, detached, in `dtype` on
    `device`, as (name, tensor) pairs when iterated; `metadata()` declares each one's name, dtype and whole shape
    before any is gathered (vLLM's senders announce them first: the stream is never held whole to learn them).

    Sharded parameters are gathered one at a time on every rank (a collective: every rank runs the iteration to
    its end, in the same order); a rank with `keep=False` (all but the engine's) yields nothing. `finish()` runs
    the gathers an engine's send left undone when it failed partway, so the other ranks are not left waiting in
    one."""

    def __init__(self, model: torch.nn.Module, keep: bool, dtype: torch.dtype, device: str | torch.device):
        self.model, self.keep, self.dtype, self.device = model, keep, dtype, device
        self._pass: Iterator[tuple[str, torch.Tensor]] | None = None  # the latest pass
        self._gathered = 0  # weights the latest pass has gathered (all of them once it ended)

    def metadata(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(name, self.dtype, tuple(shape)) for name, shape, _, _ in _publication(self.model)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._pass, self._gathered = self._weights(), 0
        return self._pass

    @torch.no_grad()  # applies to each step of the generator (torch wraps generator functions)
    def _weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, _, gather, own_copy in _publication(self.model):
            whole = gather()
            self._gathered += 1
            if self.keep:  # a copy, never the trainer's own tensor
                yield name, whole.to(device=self.device, dtype=self.dtype, copy=not own_copy)
            del whole  # one gathered (or merged) weight alive at a time (the memory plan's "weight being published")

    @torch.no_grad()
    def finish(self) -> None:
        """Complete one pass, as every other rank runs one, whatever the engine consumed or wherever it failed
        (in the engine's send, or in this stream's own copy of a gathered weight): the gathers after the last
        one done, a whole pass if none was started, nothing if one ended. Nothing is kept. (A failure inside a
        gather is not resumable: under LoRA a merged weight takes several.)"""
        if self._pass is not None:
            self._pass.close()  # a pass the engine left suspended, or one that ended (closing it does nothing)
        for _, _, gather, _ in itertools.islice(_publication(self.model), self._gathered, None):
            gather()
            self._gathered += 1


def iter_full_weights(
    model: torch.nn.Module, keep: bool = True, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> WeightStream:
    """Every weight under its Hugging Face name, one at a time, in `dtype` on `device` (`WeightStream`): an engine
    that loads them as they come (the built-in one, on its own device) never holds a second whole model, and one
    on the trainer's GPU never sends them through host memory. Under LoRA the adapters are merged into a copy of
    each base weight."""
    return WeightStream(model, keep, dtype, device)
