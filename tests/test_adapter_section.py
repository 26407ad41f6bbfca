"""The recipe's adapter section is built from the method table: its keys are the records' recipe fields, and its
defaults are the Python API's but for the differences stated once in RECIPE_DEFAULTS."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit import LoraConfig
from lorakit.adapter_section import RECIPE_DEFAULTS, AdapterSection
from lorakit.errors import ConfigError
from lorakit.methods import METHODS


def test_the_section_holds_exactly_the_keys_the_methods_read():
    keys = {key for method in METHODS.values() for key in method.recipe_fields}
    fields = {f.name for f in dataclasses.fields(AdapterSection)} - {"method", "stack_on"}
    assert fields == keys


def test_defaults_are_the_configs_but_for_the_recipe_defaults():
    section = AdapterSection()
    api = LoraConfig()
    for key, name in METHODS["lora"].recipe_fields.items():
        expected = RECIPE_DEFAULTS.get(key, getattr(api, name))
        assert getattr(section, key) == expected, key
    for method in METHODS.values():  # a method's own keys start unset: its config class's default applies
        for key in set(method.recipe_fields) - set(METHODS["lora"].recipe_fields):
            assert getattr(section, key) is None, key


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_builds_its_config_with_the_api_defaults(method):
    config = AdapterSection(method=method).adapter_config()
    record = METHODS[method]
    assert record.selects(config)
    api = record.config(**{k: getattr(config, k) for k in ("target_modules",)})
    for f in dataclasses.fields(record.config):
        if f.name not in set(record.recipe_fields.values()) | set(record.flags) | {"target_modules"}:
            assert getattr(config, f.name) == getattr(api, f.name), f.name


def test_a_qrlora_config_error_names_the_recipe_key():
    with pytest.raises(ConfigError, match=r"^adapter\.qr_alpha must be a non-zero number, got 0$") as err:
        AdapterSection(method="qrlora", qr_alpha=0)
    assert err.value.field == "qr_alpha"
