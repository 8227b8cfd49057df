"""``invariant.kernels.gpu.enable()`` makes an unmodified Hugging Face model batch-invariant.

A Qwen3-architecture model (random weights, eager attention) generates greedily for one prompt
alone and inside batches of other prompts of the same length; token ids and per-step logprobs must
be bitwise equal. The control runs the same without ``enable()`` and must see the difference. On
the device the model is big enough for cuBLAS to change its split-K with the batch (``-m gpu``);
in CI it is tiny and runs through Triton's interpreter on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from triton_cpu import DEVICE, ON_GPU, interpreter_blas  # noqa: I001 - sets TRITON_INTERPRET before triton loads

from invariant.kernels.gpu import enable, enabled  # noqa: E402

pytestmark = [pytest.mark.gpu] if ON_GPU else []
PROMPT_LEN, NEW_TOKENS = (24, 16) if ON_GPU else (6, 4)
SIZES = [2, 5, 16, 33, 64] if ON_GPU else [3, 8]


def small_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if ON_GPU:
        cfg = Qwen3Config(vocab_size=32000, hidden_size=4096, intermediate_size=12288, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096)
        dtype = torch.bfloat16
    else:
        cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
        dtype = torch.float32
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(device=DEVICE, dtype=dtype).eval()
    return model, cfg.vocab_size


@pytest.fixture(scope="module")
def model():
    return small_qwen3()


def generate(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the log-probabilities of every step, for each row."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    logprobs = torch.stack([step.float().log_softmax(-1) for step in out.logits], 1)
    return out.sequences[:, ids.shape[1]:], logprobs


def differing_batch_sizes(model, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(1, vocab, (1, PROMPT_LEN), generator=g)
    alone_tokens, alone_lp = generate(model, target.to(DEVICE))
    differ = []
    for n in SIZES:
        batch = torch.randint(1, vocab, (n, PROMPT_LEN), generator=g)
        at = n // 2
        batch[at] = target[0]
        tokens, lp = generate(model, batch.to(DEVICE))
        if not (torch.equal(tokens[at], alone_tokens[0]) and torch.equal(lp[at], alone_lp[0])):
            differ.append(n)
    return differ


@interpreter_blas
def test_enable_makes_generation_batch_invariant(model):
    net, vocab = model
    with enable(DEVICE):
        assert enabled()
        assert differing_batch_sizes(net, vocab) == []
    assert not enabled()


def test_control_without_enable_the_batch_changes_the_bits(model):
    """On the device: cuBLAS's split-K changes with M. On the CPU: PyTorch's fp32 GEMM (MKL/oneDNN)
    blocks K by the batch (measured on this machine kind: every batch size differs)."""
    net, vocab = model
    assert differing_batch_sizes(net, vocab) != []


def test_enable_routes_the_ops_and_disable_restores_them():
    from invariant.kernels.gpu import matmul, rowops

    a = torch.randn(5, 70).to(DEVICE)
    b = torch.randn(70, 9).to(DEVICE)
    with enable(DEVICE):
        ours = a @ b
        assert torch.equal(ours, matmul.mm(a, b))
        assert torch.equal(torch.nn.functional.linear(a, b.t()), matmul.mm(a, b))
        x = torch.randn(3, 4, 50).to(DEVICE)
        assert torch.equal(x.mean(-1), rowops.mean(x, -1))
        assert torch.equal(torch.softmax(x, -1), rowops.softmax(x, -1))
        assert torch.equal(torch.log_softmax(x, -1), rowops.log_softmax(x, -1))
        assert torch.allclose(x.mean((0, 2)), x.double().mean((0, 2)).float(), atol=1e-6)
        assert torch.allclose(torch.log_softmax(x, 1), torch.log_softmax(x.double(), 1).float(), atol=1e-6)
    assert not enabled()
    stock = a @ b
    assert torch.allclose(stock, ours, atol=1e-4)
