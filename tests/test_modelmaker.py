"""The model maker: deterministic bytes from a seed, real checkpoints, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import invariant_cli
from invariant.modelmaker import ModelSpec, make_model
from invariant.modelmaker.make import CLOSE_GROUP, ModelMakerError


def files_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = make_model(tmp_path / "a", ModelSpec(seed=3))
    b = make_model(tmp_path / "b", ModelSpec(seed=3))
    fa, fb = files_bytes(a), files_bytes(b)
    assert set(fa) >= {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json"}
    assert fa == fb


def test_different_seed_gives_different_weights_same_tokenizer(tmp_path):
    a = make_model(tmp_path / "a", ModelSpec(seed=1))
    b = make_model(tmp_path / "b", ModelSpec(seed=2))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(not torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch,cls", [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_checkpoint_loads_in_transformers(tmp_path, arch, cls, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_model(tmp_path / "m", ModelSpec(arch=arch, dtype=dtype))
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [cls]
    assert config["dtype"] == dtype
    weights = load_file(path / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {getattr(torch, dtype)}
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Tell me about reproducibility.")["input_ids"]
    assert tok.decode(ids) == "Tell me about reproducibility."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "user: hi\nassistant:"
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), len(tok))


def test_small_size_is_bigger(tmp_path):
    tiny = json.loads((make_model(tmp_path / "t", ModelSpec()) / "config.json").read_text())
    small = json.loads((make_model(tmp_path / "s", ModelSpec(size="small")) / "config.json").read_text())
    assert small["hidden_size"] > tiny["hidden_size"]
    assert small["num_hidden_layers"] > tiny["num_hidden_layers"]


def test_close_logits_groups_lm_head_rows(tmp_path):
    ordinary = load_file(make_model(tmp_path / "o", ModelSpec(dtype="float32")) / "model.safetensors")["lm_head.weight"]
    close = load_file(make_model(tmp_path / "c", ModelSpec(dtype="float32", close_logits=True))
                      / "model.safetensors")["lm_head.weight"]

    def neighbour_distance(w):
        return (w[1:CLOSE_GROUP] - w[0]).norm(dim=-1).max() / w[0].norm()

    assert neighbour_distance(close) < 0.05   # rows of a group are near-copies ...
    assert neighbour_distance(ordinary) > 1.0  # ... unlike independent rows
    assert not torch.equal(close[0], close[1])  # but not exact ties


def test_refuses_non_empty_dir_without_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(ModelMakerError, match="not empty"):
        make_model(tmp_path / "m", ModelSpec())
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["--arch", "gpt2"], "unsupported architecture 'gpt2': choose one of qwen3, llama"),
    (["--size", "huge"], "unsupported size 'huge': choose one of tiny, small, medium"),
    (["--dtype", "int8"], "unsupported dtype 'int8': choose one of bfloat16, float32"),
    (["--seed", "-1"], "seed must be in [0, 2**63), got -1"),
])
def test_cli_bad_arguments(tmp_path, args, message):
    res = invariant_cli("model", "make", str(tmp_path / "m"), "--quiet", *args)
    assert res.returncode == 2
    assert res.stderr.strip() == f"invariant: error: {message}"
    assert not (tmp_path / "m").exists()


def test_cli_makes_model_with_progress(tmp_path):
    res = invariant_cli("model", "make", str(tmp_path / "m"), "--arch", "llama", "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert "making model" in res.stderr and "4/4" in res.stderr
    assert "wrote llama tiny bfloat16 (seed 5)" in res.stdout
    assert json.loads((tmp_path / "m" / "invariant_model.json").read_text())["seed"] == 5
