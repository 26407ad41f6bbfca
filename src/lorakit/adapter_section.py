"""A recipe's ``adapter`` section: a method (a row of :data:`lorakit.methods.METHODS`) and its config's fields, flat.

The section is the YAML face of the methods' config dataclasses: each record's ``recipe_fields`` says which keys
its method reads and which config field each one fills, so the section validates a key against the chosen method
and builds that method's config with the Python API's defaults (but for :data:`RECIPE_DEFAULTS`). A config's
field error names the recipe key (``adapter.qr_alpha``), from the error's ``field``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lorakit.config import LoraConfig, field_error, is_pissa_init
from lorakit.errors import ConfigError
from lorakit.methods import METHODS as METHOD_TABLE

METHODS = tuple(METHOD_TABLE)

# A recipe starts from LoRA practice (QLoRA paper, §4), not from PEFT's minimal defaults: these are the only adapter
# defaults that differ from the Python API's (LoraConfig: r 8, lora_alpha 8, lora_dropout 0, target_modules None,
# i.e. "minimal"). Every other AdapterSection default is its config class's (tests/test_recipe.py checks it).
RECIPE_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all"}


@dataclass
class _SharedFields:
    """The adapter: a method (a row of :data:`lorakit.methods.METHODS`) plus its config's fields, flat.

    The fields are :class:`~lorakit.LoraConfig`'s (same names, meanings and defaults, but for
    :data:`RECIPE_DEFAULTS`), then each method's own keys, named as in its record's ``recipe_fields`` and documented
    on its config class and in docs/variants.md (AdaLoRA's ``target_r``, ``tinit`` ...; QR-LoRA's ``tau``, ``max_r``,
    ``qr_alpha``). :class:`AdapterSection` is this class with those keys added from the table (:func:`_own_keys`),
    so they come and go with the rows. A method's own key left unset (null) takes its config class's default. A
    field the chosen method does not read is refused (it would be ignored).

    Args:
        method (str): A row of :data:`lorakit.methods.METHODS` (default ``"lora"``).
        stack_on (list[str]): Adapter directories loaded frozen under the new one (continual learning; methods
            with LoRA factors).
        Other fields: see :class:`~lorakit.LoraConfig` and the method's config class.

    Raises:
        ConfigError: An invalid field, or a field the chosen method does not read (``adapter.<field>``).
    """

    method: str = "lora"
    r: int = RECIPE_DEFAULTS["r"]
    lora_alpha: float = RECIPE_DEFAULTS["lora_alpha"]
    lora_dropout: float = RECIPE_DEFAULTS["lora_dropout"]
    target_modules: list[str] | str | None = RECIPE_DEFAULTS["target_modules"]
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    stack_on: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adapter.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        self._check_fields_apply()
        if is_pissa_init(self.init_lora_weights) and self.stack_on:
            # PiSSA replaces the base weights by residuals; adapters trained on the original weights would not fit.
            raise ConfigError(
                "adapter.init_lora_weights: expected no PiSSA init together with stack_on, "
                f"got {self.init_lora_weights!r}"
            )
        self.lora_config()  # the fields every method shares (r, targets ...)
        self.adapter_config()

    def _default(self, name: str) -> Any:
        spec = self.__dataclass_fields__[name]
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default

    def _check_fields_apply(self) -> None:
        """Refuse a field the chosen method does not read (from the records' ``recipe_fields``)."""
        method = METHOD_TABLE[self.method]
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "method" or name in method.recipe_fields or value == self._default(name):
                continue
            if name == "stack_on" and method.lora_factors:
                continue
            readers = [m.name for m in METHOD_TABLE.values() if name in m.recipe_fields]
            if "lora" not in readers and name != "stack_on":
                raise ConfigError(
                    f"adapter.{name}={value!r} applies to method {readers[0]} only, but adapter.method is "
                    f"{self.method}; remove it or set adapter.method={readers[0]}"
                )
            own_key = next((k for k, v in method.recipe_fields.items() if v == method.alpha_field), None)
            hint = (
                f" ({method.title}'s scale is adapter.{own_key})" if name == "lora_alpha" and own_key else ""
            )
            raise ConfigError(
                f"adapter.{name}={value!r} does not apply to method {self.method} and would be ignored; "
                f"remove it{hint}"
            )

    def adapter_config(self) -> Any:
        """The config object of ``method``, from the fields its record's ``recipe_fields`` names (unset ones take the
        config's default; AdaLoRA's ``total_step`` is left for the training loop).

        Raises:
            ConfigError: A field is invalid; the message names it as the recipe does (``adapter.qr_alpha``).
        """
        method = METHOD_TABLE[self.method]
        values = {key: getattr(self, key) for key in self.__dataclass_fields__}
        defaults = {key: self._default(key) for key in self.__dataclass_fields__}
        kwargs = method.recipe_config(values, defaults)
        return _build(method.config, kwargs, {name: key for key, name in method.recipe_fields.items()})

    def lora_config(self) -> LoraConfig:
        """The :class:`~lorakit.LoraConfig` of this section's shared fields (with the method's flags when it is a
        LoRA variant: DoRA's ``use_dora``)."""
        names = {f.name for f in dataclasses.fields(LoraConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        method = METHOD_TABLE[self.method]
        if method.config is LoraConfig:
            values.update(method.flags)
        return _build(LoraConfig, values, {})


def _own_keys() -> list[tuple[str, str, Any]]:
    """The recipe keys the methods read beyond the shared fields, in table order, as ``make_dataclass`` fields:
    typed as the config field each fills (optional) and unset (None) by default, so the config's default applies.
    A method's keys are its row's ``recipe_fields``, so they come and go with the row."""
    shared = {f.name for f in dataclasses.fields(_SharedFields)}
    own: dict[str, tuple[str, str, Any]] = {}
    for method in METHOD_TABLE.values():
        types = {f.name: str(f.type) for f in dataclasses.fields(method.config)}  # annotations are strings
        for key, name in method.recipe_fields.items():
            if key not in shared and key not in own:
                kind = types[name] if "None" in types[name] else f"{types[name]} | None"
                own[key] = (key, kind, field(default=None))
    return list(own.values())


AdapterSection = dataclasses.make_dataclass(
    "AdapterSection",
    _own_keys(),
    bases=(_SharedFields,),
    namespace={"__module__": __name__, "__doc__": _SharedFields.__doc__},
)


def _build(cls: type, values: dict[str, Any], recipe_keys: dict[str, str]) -> Any:
    """``cls(**values)``; a field error names the field as the recipe does (``adapter.<key>``)."""
    try:
        return cls(**values)
    except ConfigError as err:
        if err.field is None:
            raise
        raise field_error("adapter", recipe_keys.get(err.field, err.field), err.detail) from None


__all__ = ["RECIPE_DEFAULTS", "AdapterSection"]
