"""Models and tokenizers: any local Hugging Face causal LM, or a tiny one built here.

The tiny model is an ordinary transformers Qwen2 model with an ordinary `PreTrainedTokenizerFast`
(a byte-level BPE trained on the environments' own text, with a ChatML template), saved to disk and
loaded back through the same generic path as a real model. Nothing is downloaded.

`sequence_logprobs` / `compute_logprobs` are the trainer-side log-probs (float32): the reference
that engine log-probs and every old-logit source are compared against.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from twofold.config import ConfigError, ModelConfig

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Bump when the tiny model or tokenizer recipe changes, so cached builds are not reused.
TINY_RECIPE = 1


def cache_dir() -> Path:
    """Where built models and warm-start checkpoints are cached (`TWOFOLD_CACHE`, default ./.cache)."""
    return Path(os.environ.get("TWOFOLD_CACHE", ".cache"))


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


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


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


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


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_dict_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def clone_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached float32 copy of the parameters (tied weights stored once, as named_parameters does)."""
    return {n: p.detach().to(torch.float32).clone() for n, p in model.named_parameters()}


@torch.no_grad()
def load_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        p.copy_(state[n].to(p.dtype))


# --------------------------------------------------------------------------- trainer-side log-probs


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


def sequence_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(x_t | x_<t) for every position of right-padded sequences, [B, T]; position 0 gets 0.

    Computed in float32 as log_softmax(logits / temperature): the distribution the engine samples
    from before top-k/top-p (trainers do not apply those filters, as in verl and AReaL).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    target = input_ids[:, 1:].unsqueeze(-1)
    lp = torch.gather(logits, -1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1) * attention_mask


@torch.no_grad()
def compute_logprobs(
    model: torch.nn.Module,
    token_ids: list[list[int]],
    *,
    pad_id: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Trainer-side per-token log-probs of given sequences (float32, no grad), one tensor per sequence."""
    out: list[torch.Tensor] = []
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        ids, attn = pad_right(chunk, pad_id)
        lp = sequence_logprobs(model, ids, attn, temperature)
        out.extend(lp[i, : len(s)].clone() for i, s in enumerate(chunk))
    return out
