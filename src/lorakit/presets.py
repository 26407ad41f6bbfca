"""Model shapes for :mod:`lorakit.plan`: :class:`ModelShape`, and well-known base models as data (no weights).

Each entry holds the fields of the model's published Hugging Face ``config.json`` that decide its memory:
hidden size, MLP width, layers, attention heads, key/value heads (grouped-query attention), vocabulary, whether
the output head shares the embedding matrix, and whether q/k/v have biases (Qwen2). ``model_type`` names the
transformers architecture, so a test can build the same model on the meta device and compare parameter counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA-1 65B (the QLoRA paper's largest model): arXiv 2302.13971, Table 2
    "llama-65b": dict(model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=64, vocab_size=32000),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, attention_bias=True),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, attention_bias=True),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip

# Other spellings accepted on the command line.
ALIASES: dict[str, str] = {
    "llama2-7b": "llama-2-7b",
    "llama2-13b": "llama-2-13b",
    "llama2-70b": "llama-2-70b",
    "llama3-8b": "llama-3-8b",
    "llama3-70b": "llama-3-70b",
    "llama-3.1-8b": "llama-3-8b",
    "llama-3.1-70b": "llama-3-70b",
    "mistral-7b-v0.1": "mistral-7b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
    "qwen2.5-72b-instruct": "qwen2.5-72b",
}


def preset_config(name: str) -> dict[str, Any] | None:
    """The config fields of preset ``name`` (case-insensitive, aliases allowed), or None if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    entry = PRESETS.get(key)
    if entry is None:
        return None
    return {"tie_word_embeddings": False, "attention_bias": False, **entry, "_name_or_path": key}


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-style decoder: all the planner needs to know about a model.

    Args:
        name (str): A label (preset name or path).
        hidden_size (int): Width of the residual stream ``H``.
        intermediate_size (int): Width of the SwiGLU MLP ``I``.
        num_layers (int): Decoder layers ``L``.
        num_heads (int): Query heads.
        num_kv_heads (int): Key/value heads (grouped-query attention when fewer than ``num_heads``).
        vocab_size (int): Vocabulary ``V``.
        tie_word_embeddings (bool): The output head shares the embedding matrix. Default False.
        head_dim (int | None): Per-head width; default ``hidden_size // num_heads``.
        attention_bias (bool): q/k/v (and o for Llama) have biases (Qwen2: q/k/v only). Default False.
        model_type (str): transformers ``model_type``. Default ``"llama"``.
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    attention_bias: bool = False
    model_type: str = "llama"

    @property
    def head_width(self) -> int:
        """Per-head width."""
        return self.head_dim or self.hidden_size // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """``name -> (in_features, out_features, has_bias)`` of the seven projections of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_width, self.num_kv_heads * self.head_width
        qkv_bias = self.attention_bias
        o_bias = self.attention_bias and self.model_type not in ("qwen2",)
        return {
            "q_proj": (h, q, qkv_bias), "k_proj": (h, kv, qkv_bias), "v_proj": (h, kv, qkv_bias),
            "o_proj": (q, h, o_bias), "gate_proj": (h, i, False), "up_proj": (h, i, False), "down_proj": (i, h, False),
        }  # fmt: skip

    def num_parameters(self) -> int:
        """Every parameter, as ``sum(p.numel() for p in model.parameters())`` counts them."""
        per_layer = sum(a * b + (b if bias else 0) for a, b, bias in self.linear_shapes().values())
        per_layer += 2 * self.hidden_size  # two RMSNorm weights
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """Read the fields from a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2 and look-alikes).

        Raises:
            ConfigError: A required field is missing or not a positive integer (names the field).
        """
        text = config.get("text_config") or config
        fields = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                  "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "vocab_size": "vocab_size"}  # fmt: skip
        values: dict[str, Any] = {}
        for ours, theirs in fields.items():
            value = text.get(theirs)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"{name}: config field {theirs!r} must be a positive integer, got {value!r}"
                )
            values[ours] = value
        kv = text.get("num_key_value_heads") or values["num_heads"]
        model_type = text.get("model_type", "llama")
        bias = bool(text.get("attention_bias", model_type == "qwen2"))
        return cls(name=name, num_kv_heads=kv, tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
                   head_dim=text.get("head_dim"), attention_bias=bias, model_type=model_type, **values)  # fmt: skip

    @classmethod
    def resolve(cls, model: str | Path) -> ModelShape:
        """A preset name, a model directory holding ``config.json``, or a ``config.json`` path.

        Raises:
            ConfigError: Not a preset and not a readable config (lists the presets).
        """
        text = str(model)
        preset = preset_config(text)
        if preset is not None:
            return cls.from_config(preset, name=preset["_name_or_path"])
        path = Path(text)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"--model {text!r}: not a known preset and not a model directory or config.json; "
                f"known presets: {', '.join(PRESETS)}"
            )
        try:
            config = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return cls.from_config(config, name=str(path))


__all__ = ["ALIASES", "PRESETS", "ModelShape", "preset_config"]
