"""What an adapter is: :class:`LoraConfig`, its validation, and its ``adapter_config.json`` mapping.

Field names and meanings follow PEFT's ``LoraConfig`` wherever the concept is the same, so an
``adapter_config.json`` written by either library reads in the other. Validation happens once, in
``__post_init__``; everything downstream trusts a constructed config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.bounded_yaml import shown
from lorakit.errors import ConfigError

# Named target presets. Each entry lists module-name suffixes for the architectures we know (Llama, Mistral,
# Qwen2: *_proj; GPT-2: c_attn / c_proj / c_fc; BERT: query / key / value / dense). Only the suffixes that
# exist in a given model are kept when the preset is resolved, so one preset works across families.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "minimal": ("q_proj", "v_proj", "query", "value", "c_attn"),
    "attention": (
        "q_proj", "k_proj", "v_proj", "o_proj",
        "query", "key", "value", "attention.output.dense",
        "c_attn", "attn.c_proj",
    ),
    "all": (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "query", "key", "value", "dense",
        "c_attn", "c_proj", "c_fc",
    ),
}  # fmt: skip
ALL_LINEAR = "all-linear"
MAX_RANK = 1 << 16  # far above any useful rank; a larger one is a typo that would try to allocate it

# Fields of PEFT's LoraConfig that lorakit writes to every adapter_config.json. Newer PEFT fields are written
# only when they differ from PEFT's default, so older PEFT releases (which reject unknown keys) still load
# plain LoRA adapters: see PEFT issues #1979, #2275.
_PEFT_CORE_KEYS = (
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
)  # fmt: skip

# PEFT fields lorakit does not implement; an adapter that sets them to a non-default value is refused with
# a clear error instead of being loaded wrongly.
_PEFT_UNSUPPORTED = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
}


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (PEFT-compatible field names).

    Args:
        r (int): Rank of the update ``ΔW = s·B A``. Default 8.
        lora_alpha (float): Scale numerator: ``s = lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA). Default 8.
        target_modules (list[str] | str | None): A list is matched against module paths exactly or as a
            ``.suffix``; a string is a full regex over the path; ``"all-linear"`` takes every Linear / GPT-2
            Conv1D except the output head; ``"minimal"`` (q, v), ``"attention"`` (q, k, v, o) and ``"all"``
            (attention + MLP) are presets. ``None`` means ``"minimal"``.
        exclude_modules (list[str] | str | None): Same matching rules; matched modules are never wrapped.
        lora_dropout (float): Dropout on the adapter input, in ``[0, 1)``. Default 0.
        use_rslora (bool): Scale by ``lora_alpha / sqrt(r)`` (rank-stabilized LoRA). Default False.
        use_dora (bool): DoRA: a trainable magnitude per output row rescales ``W0 + s·B A`` to
            ``m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖`` (:mod:`lorakit.adapters.dora`). Default False.
        init_lora_weights (bool | str): ``True``: A kaiming-uniform (a=√5), B zero. ``"gaussian"``:
            A ~ N(0, 1/r), B zero. ``False``: A and B random (output changes at step 0; for tests).
            ``"pissa"``: A, B from the top-r singular vectors of W0 and W0 replaced by the residual (output
            unchanged); ``"pissa_niter_<k>"``: the same with randomized SVD, ``k`` subspace iterations
            (:mod:`lorakit.adapters.pissa`).
        bias (str): Only ``"none"``: biases stay frozen and are not saved.
        modules_to_save (list[str] | None): Modules (by name suffix) trained in full and saved with the
            adapter, e.g. ``["lm_head"]`` or a classification head ``["classifier"]``.
        rank_pattern (dict[str, int]): Per-module rank, keyed by a regex matched as ``(.*\\.)?(key)$``.
        alpha_pattern (dict[str, float]): Per-module alpha, same matching.
        layers_to_transform (list[int] | int | None): Only wrap targets in these layer indices (needs a list
            ``target_modules``).
        layers_pattern (list[str] | str | None): Name of the layer list (``"layers"``, ``"h"``) used to find
            the layer index; ``None`` takes the first numbered path segment.
        fan_in_fan_out (bool): Weight stored as ``[in, out]``; set automatically for GPT-2 Conv1D.
        task_type (str | None): PEFT task type written to the file (``"CAUSAL_LM"``, ``"SEQ_CLS"`` ...);
            inferred from the model when ``None``.
        base_model_name_or_path (str | None): Recorded in the file for users and tools.

    Raises:
        ConfigError: A field has an invalid value; the message names the field, expected and got.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise field_error("LoraConfig", "r", f" must be a positive integer, got {shown(self.r)}")
        if self.r > MAX_RANK:
            raise field_error("LoraConfig", "r", f" must be at most {MAX_RANK}, got {shown(self.r)}")
        if not _is_positive_number(self.lora_alpha):
            raise field_error(
                "LoraConfig", "lora_alpha", f" must be a positive number, got {self.lora_alpha!r}"
            )
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise field_error("LoraConfig", "lora_dropout", f" must be in [0, 1), got {self.lora_dropout!r}")
        init = self.init_lora_weights
        if not (init in (True, False, "gaussian") or is_pissa_init(init)):
            raise field_error(
                "LoraConfig",
                "init_lora_weights",
                " must be True, False, 'gaussian', 'pissa' or 'pissa_niter_<k>' "
                f"(k >= 0 subspace iterations), got {self.init_lora_weights!r}",
            )
        if not isinstance(self.use_dora, bool):
            raise field_error("LoraConfig", "use_dora", f" must be true or false, got {self.use_dora!r}")
        if self.bias != "none":
            raise field_error(
                "LoraConfig",
                "bias",
                f"={self.bias!r} is not supported: lorakit keeps base biases frozen "
                "(bias='none'); train a bias with modules_to_save instead",
            )
        check_target_fields(self, "LoraConfig")
        for name in ("rank_pattern", "alpha_pattern"):
            _check_patterns("LoraConfig", name, getattr(self, name))
        for key, value in self.rank_pattern.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK):
                raise field_error(
                    "LoraConfig", "rank_pattern", f"[{key!r}] must be an integer in 1..{MAX_RANK}, got {shown(value)}"
                )
        for key, value in self.alpha_pattern.items():
            if not _is_positive_number(value):
                raise field_error(
                    "LoraConfig", "alpha_pattern", f"[{key!r}] must be a positive number, got {value!r}"
                )

    # ----------------------------------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        """Rank of the adapter on ``module_path`` (``rank_pattern`` first, else ``r``)."""
        key = _pattern_key(self.rank_pattern, module_path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        """Alpha of the adapter on ``module_path`` (``alpha_pattern`` first, else ``lora_alpha``)."""
        key = _pattern_key(self.alpha_pattern, module_path)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, r: int, alpha: float) -> float:
        """The adapter scale ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ----------------------------------------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, in PEFT's schema (``peft_type: LORA``)."""
        values = dataclasses.asdict(self)
        target = values["target_modules"]
        values.update(
            peft_type="LORA",
            revision=None,
            inference_mode=True,
            target_modules=sorted(target) if isinstance(target, list) else target,
        )
        out = {key: values[key] for key in _PEFT_CORE_KEYS}
        if self.exclude_modules is not None:
            out["exclude_modules"] = self.exclude_modules
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Build a config from an ``adapter_config.json`` dict written by lorakit or PEFT.

        Unknown keys are ignored (newer PEFT fields); PEFT features lorakit does not implement are refused.

        Raises:
            ConfigError: The file describes something other than a plain LoRA adapter, or a field is invalid.
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(f"{source}: peft_type is {peft_type!r}; a LoraConfig reads 'LORA' adapters")
        for key, default in _PEFT_UNSUPPORTED.items():
            if data.get(key, default) not in (default, [], {}):
                raise ConfigError(
                    f"{source}: {key}={data[key]!r} is a PEFT feature lorakit does not implement; "
                    "merge the adapter with PEFT first or re-train without it"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in names and value is not None}
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and init != "gaussian" and not is_pissa_init(init):
            # olora / loftq / eva ... only change the initialization; read the weights as plain LoRA. PiSSA is kept:
            # as in PEFT, loading re-runs it so the base becomes the residual the adapter was trained on.
            kwargs["init_lora_weights"] = True
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def is_pissa_init(value: Any) -> bool:
    """True for ``"pissa"`` and ``"pissa_niter_<k>"`` (k a non-negative integer)."""
    return isinstance(value, str) and re.fullmatch(r"pissa(_niter_\d+)?", value) is not None


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key matching ``(.*\\.)?(key)$`` against the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


# The fields that say which modules an adapter targets; every method's config has them, with LoraConfig's meaning.
TARGET_FIELDS = (
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)


def check_target_fields(config: Any, owner: str) -> None:
    """Validate and normalize the :data:`TARGET_FIELDS` of a method config in place (sets sorted into lists ...).

    Args:
        config: A config dataclass holding the target fields (:class:`LoraConfig`, ``AdaLoraConfig`` ...).
        owner (str): Its class name, used in error messages (``"AdaLoraConfig"``).

    Raises:
        ConfigError: A field is invalid; the message names ``owner.field``, expected and got.
    """
    config.target_modules = _names(owner, "target_modules", config.target_modules)
    config.exclude_modules = _names(owner, "exclude_modules", config.exclude_modules)
    if isinstance(config.target_modules, str) and config.target_modules not in (ALL_LINEAR, *TARGET_PRESETS):
        _check_regex(owner, "target_modules", config.target_modules)
    if isinstance(config.exclude_modules, str):
        _check_regex(owner, "exclude_modules", config.exclude_modules)
    if config.modules_to_save is not None:
        config.modules_to_save = list(_names(owner, "modules_to_save", config.modules_to_save) or [])
    if config.layers_to_transform is not None:
        if isinstance(config.target_modules, str):
            raise field_error(
                owner,
                "layers_to_transform",
                f" needs target_modules as a list of names, got the string {config.target_modules!r}",
            )
        layers = config.layers_to_transform
        layers = [layers] if isinstance(layers, int) else list(layers)
        if not all(isinstance(i, int) and i >= 0 for i in layers):
            raise field_error(
                owner,
                "layers_to_transform",
                f" must hold non-negative integers, got {config.layers_to_transform!r}",
            )


def _names(owner: str, name: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        # Sets (as PEFT writes them in memory) are sorted so files and comparisons are deterministic.
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise field_error(owner, name, f" must be a string or a list of strings, got {value!r}")


def _check_patterns(owner: str, name: str, patterns: Any) -> None:
    """``rank_pattern`` / ``alpha_pattern``: a mapping from module regexes (valid ones) to values."""
    if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
        raise field_error(owner, name, f" must be a mapping of module-name regex -> value, got {shown(patterns)}")
    for key in patterns:
        _check_regex(owner, name, key)


def _check_regex(owner: str, name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise field_error(owner, name, f"={pattern!r} is not a valid regular expression: {err}") from None


def field_error(owner: str, name: str, detail: str) -> ConfigError:
    """The error for field ``name`` of config ``owner``: ``"<owner>.<name><detail>"``, e.g.
    ``field_error("LoraConfig", "r", " must be a positive integer, got 0")``. The error keeps ``field`` and
    ``detail``, so a recipe can name the field as its YAML does (``adapter.r``)."""
    return ConfigError(f"{owner}.{name}{detail}", field=name, detail=detail)


def config_fields(cls: type) -> set[str]:
    """Field names of a config dataclass."""
    return {f.name for f in dataclasses.fields(cls)}
