"""Model assets: conversion outputs, checksum verification, the tiny test model's shape."""

import hashlib
import json
import shutil

import pytest

from refreekv_vllm.models.cache import MANIFEST, verified


def test_default_model_is_a_verified_llama(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (30, 9, 3)
    assert config["rope_theta"] == 100000.0
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config
    source = json.loads((smollm2_dir / MANIFEST).read_text())["source"]
    assert verified(smollm2_dir, source)


def test_tampered_directory_fails_verification(tiny_llama_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    source = json.loads((copy / MANIFEST).read_text())["source"]
    assert verified(copy, source)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    assert not verified(copy, source)
    assert not verified(tiny_llama_dir, {**source, "seed": 99})


def test_tiny_llama_shape(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["num_hidden_layers"] >= 4
    assert config["num_key_value_heads"] < config["num_attention_heads"]


def test_qwen_coder_parts_are_joined_only_into_the_published_gguf(tmp_path, monkeypatch):
    from refreekv_vllm.models import qwen_coder

    parts = []
    for i in range(qwen_coder.NUM_PARTS):
        part = tmp_path / f"part{i + 1:02d}.bin"
        part.write_bytes(bytes([i]) * 1000)
        parts.append(part)
    joined = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="sha256"):
        qwen_coder.assemble_gguf(parts, joined)
    assert not joined.exists()  # no half-checked file left for a later run to trust
    monkeypatch.setattr(qwen_coder, "GGUF_SHA256", hashlib.sha256(
        b"".join(p.read_bytes() for p in parts)).hexdigest())
    qwen_coder.assemble_gguf(parts, joined)
    assert joined.read_bytes() == b"".join(p.read_bytes() for p in parts)


def test_qwen_coder_without_its_wheels_names_the_requirements_file(monkeypatch):
    from refreekv_vllm.models import qwen_coder

    monkeypatch.setattr(qwen_coder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="requirements/assets-qwen.txt"):
        qwen_coder.part_paths()
