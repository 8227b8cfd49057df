"""Write a small, deterministic Hugging Face checkpoint with a locally trained BPE tokenizer.

Everything is a function of (arch, size, dtype, seed, close_logits): the same arguments give
byte-identical files, so a model made in CI and one made on a laptop hash the same, and the
numerics fingerprint of a worker serving them is the same too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from invariant import companions

ARCHS = ("qwen3", "llama")
SIZES = ("tiny", "small", "medium")
DTYPES = ("bfloat16", "float32")

VOCAB_SIZE = 1024
EOS_TOKEN = "<|endoftext|>"
# Roles rendered as plain text: the tokenizer is byte-level, so no extra special tokens are needed.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# (hidden, intermediate, layers, heads, kv_heads, head_dim)
_SHAPES = {
    "tiny": (128, 256, 2, 4, 2, 32),
    "small": (1024, 2816, 4, 16, 4, 64),
    # GPU-bound on an H100 (the cost benchmark and the GPU invariance tests): ~0.4 B parameters.
    "medium": (2048, 6144, 8, 16, 8, 128),
}

# Sampling defaults written to generation_config.json. vLLM fills omitted request parameters from
# them, so they are part of what decides a response (and of the gateway's key resolution).
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.0}

# close_logits: lm_head rows come in groups of this many near-copies, so the top logits of every
# step have neighbours within a rounding error or two; batch variance then flips tokens, not just
# logprobs. The relative spread inside a group is 2**-7, about two bf16 ulps.
CLOSE_GROUP = 4
CLOSE_SPREAD = 2.0**-7


class ModelMakerError(ValueError):
    """A bad argument to the model maker; its message is meant for the command line."""


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "qwen3"
    size: str = "tiny"
    dtype: str = "bfloat16"
    seed: int = 0
    close_logits: bool = False

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ModelMakerError(f"unsupported architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.size not in SIZES:
            raise ModelMakerError(f"unsupported size {self.size!r}: choose one of {', '.join(SIZES)}")
        if self.dtype not in DTYPES:
            raise ModelMakerError(f"unsupported dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if not 0 <= self.seed < 2**63:
            raise ModelMakerError(f"seed must be in [0, 2**63), got {self.seed}")


def corpus_text() -> list[str]:
    """The shipped training text for the tokenizer, one line per item."""
    lines: list[str] = []
    folder = resources.files("invariant.modelmaker") / "corpus"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".txt"):
            lines.extend(entry.read_text(encoding="utf-8").splitlines())
    return lines


def train_tokenizer():
    """Train a byte-level BPE tokenizer on the shipped corpus (deterministic, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    companions.hide_broken()  # before transformers: see invariant.companions
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(spec: ModelSpec, vocab_size: int):
    companions.hide_broken()
    from transformers import LlamaConfig, Qwen3Config

    hidden, inter, layers, heads, kv_heads, head_dim = _SHAPES[spec.size]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
        dtype=spec.dtype,
    )
    if spec.arch == "qwen3":
        return Qwen3Config(**common)
    return LlamaConfig(**common)


def _close_lm_head(weight, generator) -> None:
    """Make lm_head rows near-copies of each other in groups (in place), so logits nearly tie."""
    import torch

    rows = weight.shape[0]
    base = weight[::CLOSE_GROUP].clone()
    expanded = base.repeat_interleave(CLOSE_GROUP, dim=0)[:rows]
    noise = torch.randn(expanded.shape, generator=generator, dtype=expanded.dtype)
    weight.copy_(expanded + noise * expanded.abs().mean() * CLOSE_SPREAD)


def _build_model(spec: ModelSpec, vocab_size: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    config = _config(spec, vocab_size)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        # Re-draw every parameter from our own generator in a fixed (sorted) order: HF's init order
        # and scheme may change between releases, our weights should not.
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                std = 1.0 / param.shape[-1] ** 0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        if spec.close_logits:
            _close_lm_head(model.lm_head.weight, generator)
    return model.to(getattr(torch, spec.dtype))


def _generation_config() -> dict:
    return {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "do_sample": True, **GENERATION_DEFAULTS}


def make_model(
    out_dir: str | os.PathLike,
    spec: ModelSpec = ModelSpec(),
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the checkpoint to ``out_dir`` atomically (a half-written model never appears there)."""
    spec.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelMakerError(f"{out} exists and is not empty: pass --overwrite or choose another directory")
    step = progress or (lambda _msg: None)  # called after each step with the step's name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".making-", dir=out.parent))
    try:
        tokenizer = train_tokenizer()
        step("tokenizer trained")
        model = _build_model(spec, len(tokenizer))
        step("weights drawn")
        model.save_pretrained(tmp, safe_serialization=True)
        step("safetensors written")
        tokenizer.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(), indent=2, sort_keys=True) + "\n")
        (tmp / "invariant_model.json").write_text(
            json.dumps(
                {"arch": spec.arch, "size": spec.size, "dtype": spec.dtype, "seed": spec.seed,
                 "close_logits": spec.close_logits},
                indent=2, sort_keys=True,
            )
            + "\n"
        )
        step("tokenizer and configs written")
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
