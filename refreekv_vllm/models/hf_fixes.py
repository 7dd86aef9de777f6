"""Config fixes that make a GGUF-converted directory load under transformers 4.x/5.x and vLLM."""

import json
from collections.abc import Callable
from pathlib import Path


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def patch_tokenizer_config(out_dir: Path) -> None:
    def fix(config: dict) -> None:
        # transformers 5 writes a class name that 4.x does not know.
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # Without this, 4.x emits token_type_ids and generate() fails.
        config.setdefault("model_input_names", ["input_ids", "attention_mask"])
        template = out_dir / "chat_template.jinja"
        if "chat_template" not in config and template.exists():
            config["chat_template"] = template.read_text()

    _edit_json(out_dir / "tokenizer_config.json", fix)


def patch_model_config(out_dir: Path) -> None:
    def fix(config: dict) -> None:
        # transformers 5 nests rope_theta; 4.x silently falls back to 10000 without it.
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            config.setdefault("rope_theta", rope["rope_theta"])

    _edit_json(out_dir / "config.json", fix)
