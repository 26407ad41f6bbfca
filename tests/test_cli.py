"""The lorakit command line: help, dry run, clear errors, and the train -> generate -> merge -> inspect path."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import COMMANDS, build_parser, main
from lorakit.train import load_base
from train_fixtures import make_workspace, tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("cli"))
    recipe = tiny_recipe(
        root, f"output_dir={root / 'run'}", "train.max_steps=3", "adapter.init_lora_weights=false"
    )
    from lorakit.train import train

    train(recipe, progress=False)
    return root


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_complete_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: lorakit" in text
    parser = build_parser()
    actions = parser._subparsers._group_actions[0].choices[command]._actions if command else parser._actions
    for action in actions:
        assert action.help, f"{command} {action.dest} has no help text"


def test_dry_run_prints_resolved_recipe(capsys):
    assert main(["train", "train.lr=1e-3", "adapter.r=4", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-3 and printed["adapter"]["r"] == 4
    assert set(printed) >= {"model", "adapter", "data", "train", "output_dir"}


def test_overrides_may_follow_an_option(capsys):
    assert main(["train", "train.lr=1e-3", "--dry-run", "adapter.r=4", "train.seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["train"]["lr"], printed["adapter"]["r"], printed["train"]["seed"]) == (1e-3, 4, 7)
    with pytest.raises(SystemExit):  # anything else left over is still refused
        main(["train", "--dry-run", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_bad_input_is_one_clear_line_not_a_traceback(capsys):
    assert main(["train", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'lr'" in err and "Traceback" not in err
    assert main(["inspect", "/nonexistent/adapter"]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


def test_generate_merge_inspect_on_a_trained_run(trained, tmp_path, capsys):
    run = trained / "run"
    assert main(["generate", "--model", str(trained / "model"), "--adapter", str(run), "--greedy",
                 "--max-new-tokens", "5", "Repeat the word twice."]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() != ""

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(trained / "model"), "--adapter", str(run), "--out", str(out),
                 "--dtype", "float32"]) == 0  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    _, base = load_base(tiny_recipe(trained))
    lorakit.load_adapter(base, run)
    ids = torch.tensor([[1, 5, 9, 30, 44, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
    assert main(["merge", "--model", str(trained / "model"), "--adapter", str(run), "--out", str(out)]) == 2
    capsys.readouterr()

    assert main(["inspect", str(run), "--json"]) == 0
    info = yaml.safe_load(capsys.readouterr().out)
    assert info["kind"] == "run" and info["r"] == 16 and info["wrapped_layers"] == 14


def test_preprocess_debug_shows_the_mask(trained, capsys):
    recipe = tiny_recipe(trained)
    assert (
        main(
            [
                "preprocess",
                f"model.path={recipe.model.path}",
                f"data.path={recipe.data.path}",
                "--debug",
                "-n",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[masked]" in out and "### Response:" in out
