"""The trainer-side model: Qwen3 and Llama checkpoints as an ``nn.Module`` whose forward gives the
logprobs the invariant CPU worker served, bit for bit, and whose backward trains them.

The forward follows vLLM's own model code step by step (vllm/model_executor/models/qwen3.py,
llama.py): merged q/k/v and gate/up projections, per-head q/k RMSNorm (Qwen3), neox rotary, paged
causal attention, ``silu(gate) * up`` as torch computes it, the fused residual add + RMSNorm, lm_head
in the model's dtype and the sampler's fp32 log_softmax of the raw logits. Each step calls the kernel
the worker calls (invariant.trainer.ops). Sequences of different lengths are packed back to back,
as the engine packs a step, so a batch needs no padding and no mask.

Parameters keep the checkpoint's names (``model.layers.0.self_attn.q_proj.weight``, ...), so
:meth:`PolicyModel.save_pretrained` writes a directory the worker serves as it is.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from invariant.trainer import ops

ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM")
WEIGHTS = "model.safetensors"


class TrainerModelError(ValueError):
    """The checkpoint is not one the trainer model can reproduce exactly."""


def _param(shape: Sequence[int], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype))


class _Norm(nn.Module):
    def __init__(self, size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _param((size,), dtype)


class _Proj(nn.Module):
    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        self.weight = _param((out_features, in_features), dtype)
        self.bias = _param((out_features,), dtype) if bias else None


class _Attention(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype, qk_norm: bool):
        super().__init__()
        hidden, heads, kv_heads, head_dim = cfg["hidden_size"], cfg["num_attention_heads"], \
            cfg["num_key_value_heads"], cfg["head_dim"]
        bias = bool(cfg.get("attention_bias", False))
        self.q_proj = _Proj(heads * head_dim, hidden, dtype, bias)
        self.k_proj = _Proj(kv_heads * head_dim, hidden, dtype, bias)
        self.v_proj = _Proj(kv_heads * head_dim, hidden, dtype, bias)
        self.o_proj = _Proj(hidden, heads * head_dim, dtype, bool(cfg.get("o_proj_bias", False)))
        if qk_norm:
            self.q_norm = _Norm(head_dim, dtype)
            self.k_norm = _Norm(head_dim, dtype)
        self.qk_norm = qk_norm
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.eps = cfg["rms_norm_eps"]

    def forward(self, x, positions, lengths, rope):
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = ops.linear(x, weight, bias)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if self.qk_norm:
            q = ops.rms_norm(q.reshape(-1, self.heads, self.head_dim), self.q_norm.weight, self.eps).reshape(q.shape)
            k = ops.rms_norm(k.reshape(-1, self.kv_heads, self.head_dim), self.k_norm.weight, self.eps).reshape(k.shape)
        q, k = ops.rotary(positions, q, k, self.head_dim, rope)
        out = ops.attention(q, k, v, lengths, num_heads=self.heads, num_kv_heads=self.kv_heads,
                            head_dim=self.head_dim, scale=self.head_dim ** -0.5)
        return ops.linear(out, self.o_proj.weight, self.o_proj.bias)


class _Mlp(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        bias = bool(cfg.get("mlp_bias", False))
        self.gate_proj = _Proj(inter, hidden, dtype, bias)
        self.up_proj = _Proj(inter, hidden, dtype, bias)
        self.down_proj = _Proj(hidden, inter, dtype, bias)

    def forward(self, x):
        weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        bias = None if self.gate_proj.bias is None else torch.cat([self.gate_proj.bias, self.up_proj.bias])
        gate_up = ops.linear(x, weight, bias)
        d = gate_up.shape[-1] // 2
        # vLLM's SiluAndMul.forward_native on x86 (its forward_cpu): torch's own elementwise kernels
        return ops.linear(F.silu(gate_up[..., :d]) * gate_up[..., d:], self.down_proj.weight, self.down_proj.bias)


class _Layer(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype, qk_norm: bool):
        super().__init__()
        self.self_attn = _Attention(cfg, dtype, qk_norm)
        self.mlp = _Mlp(cfg, dtype)
        self.input_layernorm = _Norm(cfg["hidden_size"], dtype)
        self.post_attention_layernorm = _Norm(cfg["hidden_size"], dtype)
        self.eps = cfg["rms_norm_eps"]

    def forward(self, x, residual, positions, lengths, rope):
        if residual is None:
            residual = x
            x = ops.rms_norm(x, self.input_layernorm.weight, self.eps)
        else:
            x, residual = ops.fused_add_rms_norm(x, residual, self.input_layernorm.weight, self.eps)
        x = self.self_attn(x, positions, lengths, rope)
        x, residual = ops.fused_add_rms_norm(x, residual, self.post_attention_layernorm.weight, self.eps)
        return self.mlp(x), residual


class _Body(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype, qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"], dtype=dtype)
        self.layers = nn.ModuleList(_Layer(cfg, dtype, qk_norm) for _ in range(cfg["num_hidden_layers"]))
        self.norm = _Norm(cfg["hidden_size"], dtype)


def _check_config(cfg: dict) -> None:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise TrainerModelError(f"architecture {arch} is not supported: the trainer reproduces "
                                f"{', '.join(ARCHITECTURES)}")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise TrainerModelError(f"rope {rope} is not supported: default full rotary embedding only")
    if cfg.get("use_sliding_window") or (cfg.get("sliding_window") and arch != "Qwen3ForCausalLM"):
        raise TrainerModelError("sliding-window attention is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise TrainerModelError(f"activation {cfg['hidden_act']} is not supported: silu only")


class PolicyModel(nn.Module):
    """A causal LM whose logprobs equal the invariant CPU worker's (see the module docstring)."""

    def __init__(self, config: dict):
        super().__init__()
        _check_config(config)
        cfg = dict(config)
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        self.config = cfg
        self.dtype_ = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
        if self.dtype_ not in (torch.bfloat16, torch.float32):
            raise TrainerModelError(f"dtype {self.dtype_} is not supported: bfloat16 or float32")
        qk_norm = cfg["architectures"][0] == "Qwen3ForCausalLM"
        self.model = _Body(cfg, self.dtype_, qk_norm)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = _Proj(cfg["vocab_size"], cfg["hidden_size"], self.dtype_)
        self._rope = None
        self.source: Path | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PolicyModel":
        """Load a checkpoint directory (config.json + safetensors), as the worker does."""
        from safetensors.torch import load_file

        path = Path(path)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        model = cls(config)
        state: dict[str, torch.Tensor] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise TrainerModelError(f"{path}: no .safetensors weights")
        for file in files:
            state.update(load_file(str(file)))
        if model.tied:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TrainerModelError(f"{path}: weights do not match {config['architectures'][0]}: "
                                    f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        model.source = path
        return model

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write this model's weights into a checkpoint directory the worker can serve; config and
        tokenizer files are copied from the directory it was loaded from."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.source is not None:
            for item in self.source.iterdir():
                if item.is_file() and not item.name.endswith(".safetensors") and item.name != "invariant_model.json":
                    shutil.copy2(item, path / item.name)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
        return path

    def _rope_cache(self) -> torch.Tensor:
        if self._rope is None:
            cfg = self.config
            self._rope = ops.rope_cache(cfg["head_dim"], cfg["max_position_embeddings"],
                                        cfg.get("rope_parameters"), self.dtype_)
        return self._rope

    def _lm_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tied else self.lm_head.weight

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final-norm hidden states of every position, sequences packed back to back."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("every sequence needs at least one token")
        lengths = [len(s) for s in sequences]
        limit = self.config["max_position_embeddings"]
        if max(lengths) > limit:
            raise ValueError(f"a sequence of {max(lengths)} tokens is longer than the model's {limit} positions")
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.config["vocab_size"]:
            raise ValueError(f"token ids must lie in [0, {self.config['vocab_size']})")
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])
        x = self.model.embed_tokens(ids)
        residual = None
        rope = self._rope_cache()
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, lengths, rope)
        x, _ = ops.fused_add_rms_norm(x, residual, self.model.norm.weight, self.config["rms_norm_eps"])
        return x

    def token_logprobs(self, prompts: Sequence[Sequence[int]],
                       completions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-token logprobs (fp32, differentiable) of each completion after its prompt, teacher
        forced, all sequences in one packed forward: what the worker returned as ``logprobs`` for
        the tokens it sampled (vLLM's default ``raw_logprobs``: before temperature, top-k/top-p)."""
        if len(prompts) != len(completions):
            raise ValueError("one completion per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
        hidden = self.hidden_states(sequences)
        rows, targets, start = [], [], 0
        for p, c in zip(prompts, completions):
            rows.extend(range(start + len(p) - 1, start + len(p) - 1 + len(c)))
            targets.extend(c)
            start += len(p) + len(c)
        if not rows:
            return [torch.empty(0) for _ in completions]
        logits = ops.linear(hidden[torch.tensor(rows)], self._lm_weight())
        logprobs = ops.log_softmax(logits)
        picked = logprobs.gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1)
        return list(picked.split([len(c) for c in completions]))
