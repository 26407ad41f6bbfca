"""Precision chosen by the hardware: the bf16 probe, ``auto`` everywhere, the warning, ``lorakit env``.

Every test injects the probe's answer (:func:`lorakit.hardware.set_bf16_probe`), so each holds on an AVX2-only
CPU and on an AMX one alike; the real probe is checked only for consistency with its own measurement.
"""

import contextlib
import io
import json
import warnings

import pytest
import torch
import yaml

from lorakit import hardware
from lorakit.cli import main
from lorakit.hardware import Bf16Report
from lorakit.loading import load_model
from lorakit.recipe import load_recipe
from lorakit.train import train
from train_fixtures import make_workspace, tiny_recipe

from tiny_models import write_causal_lm_dir
from tokenizer_factory import build_tokenizer


def _fake(native: bool):
    def probe(device: str) -> Bf16Report:
        fp32, bf16 = (60.0, 120.0) if native else (60.0, 0.8)
        return Bf16Report(native, device, f"injected: native={native}", fp32, bf16)

    return probe


@pytest.fixture
def bf16_native():
    """Call with True / False to make the probe answer that; the real probe is restored afterwards."""
    yield lambda native: hardware.set_bf16_probe(_fake(native))
    hardware.set_bf16_probe(None)


def _cli(args):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(args)
    return status, printed.getvalue()


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_follows_the_probe_on_cpu(bf16_native, native, expected):
    bf16_native(native)
    assert hardware.auto_dtype("cpu") == expected
    assert hardware.resolve_dtype("auto", "cpu") == expected
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


def test_explicit_bf16_without_native_support_runs_and_warns_once(bf16_native):
    bf16_native(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hardware.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # honoured, not replaced
        assert hardware.resolve_precision("bf16", "cpu") == "bf16"
        hardware.resolve_dtype(torch.bfloat16, "cpu")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "75x slower" in messages[0] and "auto" in messages[0] and "float32" in messages[0]


def test_no_warning_where_bf16_is_native_or_not_asked_for(bf16_native):
    bf16_native(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hardware.resolve_dtype("bfloat16", "cpu")
        hardware.resolve_precision("bf16", "cpu")
    bf16_native(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hardware.resolve_dtype("float32", "cpu")
        hardware.resolve_precision("fp32", "cpu")
        hardware.resolve_dtype("auto", "cpu")


def test_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="bfloat17"):
        hardware.resolve_dtype("bfloat17")


def test_environment_variable_forces_the_answer(monkeypatch):
    for value, native in (("0", False), ("1", True)):
        monkeypatch.setenv("LORAKIT_NATIVE_BF16", value)
        report = hardware.default_bf16_probe("cpu")
        assert report.native is native and "LORAKIT_NATIVE_BF16" in report.reason


def test_real_probe_agrees_with_its_own_timing(monkeypatch):
    """Whatever this CPU is, the verdict is what the measured rates say (native: >= half the fp32 rate)."""
    monkeypatch.delenv("LORAKIT_NATIVE_BF16", raising=False)
    report = hardware.default_bf16_probe("cpu")
    assert report.fp32_gflops > 0 and report.bf16_gflops > 0
    if report.native:
        assert report.bf16_gflops >= hardware.NATIVE_RATIO * report.fp32_gflops
    assert report.reason


@pytest.mark.parametrize(
    "overrides, native, dtype, precision",
    [
        ([], False, "float32", "fp32"),
        ([], True, "bfloat16", "bf16"),
        (["model.compute_dtype=float32"], True, "float32", "fp32"),  # auto precision follows the dtype
        (["train.precision=fp32"], True, "float32", "fp32"),  # auto dtype follows the precision
        (["train.precision=bf16"], False, "bfloat16", "bf16"),  # explicit: kept (with a warning)
    ],
)
def test_recipe_auto_resolution(bf16_native, overrides, native, dtype, precision):
    bf16_native(native)
    recipe = load_recipe(None, overrides)
    assert recipe.model.compute_dtype == ("auto" if not any("compute" in o for o in overrides) else dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = recipe.with_precision_resolved("cpu")
    assert (resolved.model.compute_dtype, resolved.train.precision) == (dtype, precision)


def test_defaults_are_auto():
    recipe = load_recipe(None)
    assert recipe.model.compute_dtype == "auto" and recipe.train.precision == "auto"


def test_dry_run_prints_what_auto_means_here(bf16_native):
    bf16_native(False)
    status, printed = _cli(["train", "--dry-run"])
    assert status == 0
    header, body = printed.split("\n", 1)
    assert header.startswith("# precision: fp32 (compute dtype float32); auto on this cpu: injected")
    resolved = yaml.safe_load(body)
    assert resolved["model"]["compute_dtype"] == "float32" and resolved["train"]["precision"] == "fp32"


def test_a_run_trains_and_records_the_resolved_precision(bf16_native, tmp_path, capsys):
    bf16_native(False)
    root = make_workspace(tmp_path)
    recipe = tiny_recipe(root, "model.compute_dtype=auto", "train.precision=auto", "train.max_steps=2")
    result = train(recipe, progress=False)
    assert "precision: fp32 (compute dtype float32); auto on this cpu" in capsys.readouterr().out
    saved = yaml.safe_load((result.output_dir / "recipe.yaml").read_text())
    assert saved["model"]["compute_dtype"] == "float32" and saved["train"]["precision"] == "fp32"
    # Resuming with the same (unresolved) recipe is accepted: both sides resolve alike.
    train(recipe, resume=True, progress=False)


def test_load_model_auto_dtype(bf16_native, tmp_path):
    write_causal_lm_dir(tmp_path / "m", build_tokenizer())
    for native, expected in ((False, torch.float32), (True, torch.bfloat16)):
        bf16_native(native)
        model = load_model(tmp_path / "m", quantize=None)
        assert model.get_input_embeddings().weight.dtype == expected


def test_env_json_reports_the_machine_and_auto(bf16_native):
    bf16_native(False)
    status, printed = _cli(["env", "--json", "--seconds", "0.02"])
    assert status == 0
    report = json.loads(printed)
    assert report["bf16_native"]["cpu"] is False and report["auto"]["cpu"] == "float32"
    assert report["versions"]["torch"] == torch.__version__
    assert report["cpu"]["isa"] == hardware.cpu_isa() and report["cpu"]["model"]
    assert report["cpu"]["cores"] >= 1 and report["cpu_matmul_gflops"]["float32"] > 0
    bf16_native(True)
    report = json.loads(_cli(["env", "--json", "--seconds", "0.02"])[1])
    assert report["bf16_native"]["cpu"] is True and report["auto"]["cpu"] == "bfloat16"


def test_env_text_names_the_machine(bf16_native):
    bf16_native(True)
    status, printed = _cli(["env", "--seconds", "0.02"])
    assert status == 0
    for field in (
        "versions:",
        "cpu:",
        "isa:",
        "cpu matmul:",
        "bf16 native:   yes",
        "auto:          cpu -> bfloat16",
    ):
        assert field in printed, printed


def test_machine_summary_for_benchmarks():
    summary = hardware.machine_summary()
    assert {"cpu", "isa", "cores", "threads", "bf16_native_cpu", "auto_dtype", "versions"} <= summary.keys()
