"""Model assets: conversion outputs, checksum verification, the tiny test model's shape."""

import json
import shutil

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
