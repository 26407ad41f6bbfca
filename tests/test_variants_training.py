"""AdaLoRA and QR-LoRA through the product: recipe -> train() -> files -> PEFT / lorakit / CLI.

Each method trains once on the tiny workspace (module fixture; the first test that asks for a method's run trains
it); the tests read what that run wrote: the loss, the AdaLoRA rank budget per step, resume exactness, PEFT loading
the AdaLoRA adapter, lorakit loading QR-LoRA's, ``lorakit merge`` / ``generate`` / ``inspect`` on the outputs, and
short runs on a 4-bit bf16 base.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.adapters.base import AdapterLinear
from lorakit.adapters.rank_allocator import AdaLoraController
from lorakit.cli import main
from lorakit.data import load_dataset, training_collator
from lorakit.errors import ConfigError
from lorakit.evaluate import evaluate_loss
from lorakit.inject import (
    adapter_configs,
    adapter_layers,
    batch_adapters,
    list_adapters,
    trainable_parameters,
)
from lorakit.recipe import apply_overrides, recipe_from_dict
from lorakit.train import load_base, train
from train_fixtures import make_workspace

STEPS, MATRICES = 6, 14  # the tiny Llama has 2 layers x 7 projections
METHODS = {
    # init_r 8 -> target_r 2: warm-up step 1, budget phase steps 2-4, pattern fixed at step 5 (= T - tfinal).
    "adalora": ["adapter.method=adalora", "adapter.r=8", "adapter.target_r=2", "adapter.tinit=1",
                "adapter.tfinal=1", "adapter.lora_dropout=0.1", "train.lr=2e-2"],
    "qrlora": ["adapter.method=qrlora", "adapter.r=8", "train.lr=5e-2"],
}  # fmt: skip


def _recipe(root, *overrides: str):
    """tests/train_fixtures.tiny_recipe's settings, built without the bundled quickstart recipe underneath."""
    base = [
        f"model.path={root / 'model'}", "model.quantize=null", "model.compute_dtype=float32",
        f"data.path={root / 'train.jsonl'}", f"data.val_path={root / 'val.jsonl'}",
        f"train.max_steps={STEPS}", "train.batch_size=4", "train.grad_accum=2", "train.precision=fp32",
        "train.warmup_steps=2", "train.save_every=3", "train.keep_last=5", f"output_dir={root / 'out'}",
    ]  # fmt: skip
    return recipe_from_dict(apply_overrides({}, [*base, *overrides]), source="test recipe")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("variants"))


def _train(workspace, method):
    """One run of ``method``; an AdaLoRA run records when the loop calls the controller."""
    calls = []
    real_regularizer, real_step = AdaLoraController.regularizer, AdaLoraController.step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            AdaLoraController, "regularizer", lambda self, m: calls.append("reg") or real_regularizer(self, m)
        )
        patch.setattr(AdaLoraController, "step", lambda self, m, s: calls.append(s) or real_step(self, m, s))
        recipe = _recipe(workspace, *METHODS[method], f"output_dir={workspace / method}")
        result = train(recipe, progress=False)
    weights = load_file(result.output_dir / "adapter_model.safetensors")
    return {"recipe": recipe, "result": result, "weights": weights, "calls": calls}


class _Runs(dict):
    """Method -> its run, trained once when a test first asks for it (so a method's tests need only its row)."""

    def __init__(self, workspace):
        super().__init__()
        self.workspace = workspace

    def __missing__(self, method):
        self[method] = _train(self.workspace, method)
        return self[method]


@pytest.fixture(scope="module")
def runs(workspace):
    return _Runs(workspace)


def _fresh(recipe, adapter=None, is_trainable=False):
    tokenizer, model = load_base(recipe)
    if adapter is not None:
        lorakit.load_adapter(model, adapter, is_trainable=is_trainable)
    return tokenizer, model.eval()


def _eval_loss(recipe, tokenizer, model) -> float:
    _, val_set, _ = load_dataset(recipe.data, tokenizer)
    collator = training_collator(tokenizer, model, recipe.data.padding_free)  # the batches training evaluated
    return evaluate_loss(model, val_set, collator, recipe.train, torch.device("cpu"))


IDS = torch.tensor([[1, 5, 9, 30, 44, 2, 17, 8]])


def test_arithmetic_compression_and_stacking_refuse_adalora_adapters_by_name(tmp_path):
    from lorakit.adapters.adalora import AdaLoraConfig
    from lorakit.arithmetic import add_weighted_adapter, stack_adapters
    from lorakit.compress import save_adapter_int8
    from lorakit.variants import wrap_adapter

    from tiny_models import tiny_llama

    model = tiny_llama()
    lorakit.wrap(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="plain")
    ada = AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=["k_proj"])
    wrap_adapter(model, ada, adapter_name="ada")
    with pytest.raises(ConfigError, match=r"add_weighted_adapter: .* 'ada' is an AdaLoRA adapter"):
        add_weighted_adapter(model, ["ada"], [1.0], "sum")
    with pytest.raises(ConfigError, match=r"save_adapter_int8: .* 'ada' is an AdaLoRA adapter"):
        save_adapter_int8(model, tmp_path / "int8", adapter_name="ada")
    assert not (tmp_path / "int8").exists()
    with pytest.raises(ConfigError, match=r"stack_adapters: .* 'ada' is an AdaLoRA adapter"):
        stack_adapters(model, frozen=["ada"], trainable="plain")


@pytest.mark.parametrize("method", list(METHODS))
def test_training_lowers_the_loss_and_the_saved_adapter_reproduces_the_model(runs, method):
    recipe, result = runs[method]["recipe"], runs[method]["result"]
    tokenizer, model = _fresh(recipe, result.output_dir)
    assert any(isinstance(m, AdapterLinear) for m in model.modules())
    tuned = _eval_loss(recipe, tokenizer, model)
    assert tuned == pytest.approx(result.eval_loss, abs=1e-5)  # the file holds what was trained
    with lorakit.disable_adapters(model):
        base = _eval_loss(recipe, tokenizer, model)
    assert tuned < base - 1e-3, (tuned, base)


def test_qrlora_trains_only_one_scalar_per_component(runs):
    recipe, result = runs["qrlora"]["recipe"], runs["qrlora"]["result"]
    _, model = _fresh(recipe, result.output_dir, is_trainable=True)
    trainable, _ = trainable_parameters(model)
    assert trainable == 8 * MATRICES
    names = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"qr_lambda"}


def test_adalora_budget_shrinks_by_the_cubic_schedule(runs):
    result, weights = runs["adalora"]["result"], runs["adalora"]["weights"]
    b0, bT, tinit, tfinal = 8 * MATRICES, 2 * MATRICES, 1, 1
    expected = []
    for t in range(1, STEPS + 1):  # the paper's eq. 12 (PEFT's schedule), written out here
        if t <= tinit:
            expected.append(b0)
        elif t >= STEPS - tfinal:
            expected.append(bT)
        else:
            expected.append(int((b0 - bT) * (1 - (t - tinit) / (STEPS - tfinal - tinit)) ** 3 + bT))
    steps = [h for h in result.history if "loss" in h]
    assert [h["adalora_rank"] for h in steps] == expected
    assert all(h["orth_reg"] > 0 for h in steps)
    # The loop called the regularizer once per optimizer step (not per micro-batch) and the allocator after
    # every step, counting from 1.
    calls = runs["adalora"]["calls"]
    assert calls == [c for s in range(1, STEPS + 1) for c in ("reg", s)]
    # The saved adapter is trimmed to the final pattern: target_r x matrices components, shared unevenly.
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    kept = {k[: -len(".lora_E")]: sum(v) for k, v in config["rank_pattern"].items()}
    rows = {k.removeprefix("base_model.model.")[: -len(".lora_A")]: int(v.shape[0])
            for k, v in weights.items() if k.endswith(".lora_A")}  # fmt: skip
    assert rows == kept and sum(rows.values()) == bT and len(set(rows.values())) > 1
    assert config["total_step"] == STEPS and config["init_r"] == 8 and config["target_r"] == 2


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_reaches_the_same_final_loss_and_weights(runs, method):
    recipe, full, weights = (runs[method][k] for k in ("recipe", "result", "weights"))
    checkpoint = full.output_dir / "checkpoints" / "step-000003"
    if method == "adalora":  # mid budget phase: the importance EMAs are part of the checkpoint
        ema = load_file(checkpoint / "adalora_state.safetensors")
        assert len(ema) == 2 * 3 * MATRICES  # sensitivity and uncertainty of A, E, B per matrix
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert sum(map(sum, state["adalora"]["rank_pattern"].values())) == full.history[2]["adalora_rank"]
    again = train(recipe, resume=str(checkpoint), progress=False)
    assert again.final_train_loss == pytest.approx(full.final_train_loss, abs=1e-6)
    resumed = load_file(again.output_dir / "adapter_model.safetensors")
    assert resumed.keys() == weights.keys()
    for key, value in resumed.items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def test_peft_loads_the_trained_adalora_adapter_with_the_same_logits(runs):
    from peft import PeftModel

    recipe, result = runs["adalora"]["recipe"], runs["adalora"]["result"]
    _, ours = _fresh(recipe, result.output_dir)
    theirs = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(recipe.model.path), result.output_dir
    )
    with torch.no_grad():
        ours_logits, theirs_logits = ours(IDS).logits, theirs.eval()(IDS).logits
        with lorakit.disable_adapters(ours):
            base_logits = ours(IDS).logits
    torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-5, rtol=0)
    assert (ours_logits - base_logits).abs().max() > 1e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_merge_generate_and_inspect_on_a_run(runs, workspace, tmp_path, method, capsys):
    recipe, result = runs[method]["recipe"], runs[method]["result"]
    run, model_dir = str(result.output_dir), str(workspace / "model")
    out = tmp_path / "merged"
    assert (
        main(["merge", "--model", model_dir, "--adapter", run, "--out", str(out), "--dtype", "float32"]) == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    _, unmerged = _fresh(recipe, result.output_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, unmerged(IDS).logits, atol=1e-5, rtol=0)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    assert (
        main(["generate", "--model", model_dir, "--adapter", run, "--greedy", "--max-new-tokens", "3", "Hi"])
        == 0
    )
    capsys.readouterr()

    assert main(["inspect", run, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method and info["wrapped_layers"] == MATRICES
    shapes = {}  # module path -> (in, out) of the tiny Llama
    for name, module in unmerged.named_modules():
        if isinstance(module, AdapterLinear):
            shapes[name] = (module.in_features, module.out_features)
    if method == "adalora":
        kept = info["rank_pattern"]
        assert sum(kept.values()) == 2 * MATRICES and info["r"] == 8 and info["target_r"] == 2
        assert info["trainable_parameters"] == sum(
            k * (shapes[p][0] + shapes[p][1] + 1) for p, k in kept.items()
        )
    else:
        assert info["ranks_in_file"] == [8] and info["trainable_parameters"] == 8 * MATRICES
        assert info["parameters"] == 8 * MATRICES + sum(8 * (i + o) for i, o in shapes.values())


@pytest.mark.parametrize("method", list(METHODS))
def test_4bit_base_in_bf16_trains_and_its_adapter_reloads(workspace, tmp_path, method):
    overrides = [o for o in METHODS[method] if "tinit" not in o]  # 3 steps: budget phase is step 1
    recipe = _recipe(
        workspace, *overrides, "train.max_steps=3", "model.quantize=nf4", "model.compute_dtype=bfloat16",
        "train.precision=bf16", f"output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    result = train(recipe, progress=False)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    tokenizer, model = _fresh(recipe, result.output_dir)  # a 4-bit base again
    assert (
        type(next(m for m in model.modules() if isinstance(m, AdapterLinear)).base_layer).__name__
        == "Linear4bit"
    )
    assert _eval_loss(recipe, tokenizer, model) == pytest.approx(result.eval_loss, abs=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adapter.target_r=4"], r"adapter\.target_r=4 applies to method adalora only"),
        (["adapter.method=dora", "adapter.tau=0.9"], r"adapter\.tau=0\.9 applies to method qrlora only"),
        (["adapter.method=adalora", "adapter.target_r=40"], r"adapter\.target_r must be <= init_r=16"),
        (["adapter.method=adalora", "adapter.beta1=1.5"], r"adapter\.beta1 must be a number in \(0, 1\), got 1\.5"),
        (["adapter.method=adalora", "adapter.use_rslora=true"], r"adapter\.use_rslora=True does not apply to method adalora"),
        (["adapter.method=adalora", "adapter.init_lora_weights=pissa"], r"adapter\.init_lora_weights must be true or false"),
        (["adapter.method=adalora", "adapter.r=8", "adapter.init_r=12"], r"adapter\.r=8 and adapter\.init_r=12 disagree"),
        (["adapter.method=qrlora", "adapter.lora_alpha=8"], r"adapter\.lora_alpha=8 does not apply to method qrlora.*qr_alpha"),
        (["adapter.method=qrlora", "adapter.qr_alpha=0"], r"adapter\.qr_alpha must be a non-zero number, got 0"),
        (["adapter.method=qrlora", "adapter.tau=1.5"], r"adapter\.tau must be in \(0, 1\], got 1\.5"),
        (["adapter.method=qrlora", "adapter.r=4", "adapter.tau=0.5"], r"adapter\.r=4 .* and adapter\.tau=0\.5 .* exclude"),
        (["adapter.method=qrlora", "adapter.max_r=4"], r"adapter\.max_r=4 caps .* adapter\.tau, which is not set"),
    ],
    ids=[  # the method each case needs (its node id must name it: scripts/check_method_rows.py)
        "adalora-key-on-lora", "qrlora-key-on-dora", "adalora-target_r", "adalora-beta1",
        "adalora-use_rslora", "adalora-init_lora_weights", "adalora-r-and-init_r", "qrlora-lora_alpha",
        "qrlora-qr_alpha", "qrlora-tau", "qrlora-r-and-tau", "qrlora-max_r",
    ],
)  # fmt: skip
def test_recipe_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(apply_overrides({}, overrides))


def test_recipe_builds_the_adalora_config():
    from lorakit.adapters.adalora import AdaLoraConfig

    ada = recipe_from_dict(apply_overrides({}, METHODS["adalora"])).adapter.adapter_config()
    assert isinstance(ada, AdaLoraConfig) and (ada.init_r, ada.target_r, ada.tinit, ada.tfinal) == (
        8,
        2,
        1,
        1,
    )
    assert (ada.deltaT, ada.beta1, ada.beta2, ada.orth_reg_weight, ada.total_step) == (
        1,
        0.85,
        0.85,
        0.5,
        None,
    )


def test_recipe_builds_the_qrlora_config():
    from lorakit.adapters.qrlora import QRLoraConfig

    energy = recipe_from_dict(
        apply_overrides({}, ["adapter.method=qrlora", "adapter.tau=0.5", "adapter.max_r=4"])
    )
    qr = energy.adapter.adapter_config()
    assert isinstance(qr, QRLoraConfig) and (qr.r, qr.tau, qr.max_r, qr.alpha) == (None, 0.5, 4, 1.0)


def test_recipe_builds_a_lora_config_by_default():
    assert isinstance(recipe_from_dict({}).adapter.adapter_config(), lorakit.LoraConfig)


def test_a_run_too_short_for_the_adalora_schedule_is_refused(workspace, tmp_path):
    recipe = _recipe(workspace, *METHODS["adalora"], "adapter.tinit=5", f"output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"adapter\.tinit=5 and adapter\.tfinal=1 .* 6 optimizer steps"):
        train(recipe, progress=False)


def test_mixed_batches_refuse_qrlora_adapters_and_list_adapters_reports_them(runs):
    recipe, result = runs["qrlora"]["recipe"], runs["qrlora"]["result"]
    _, model = _fresh(recipe, result.output_dir)
    with (
        pytest.raises(
            ConfigError, match="mixed batches take LoRA and DoRA adapters only, and 'default' is a QR-LoRA"
        ),
        batch_adapters(model, ["default"]),
    ):
        pass
    rows = list_adapters(model)
    assert rows[0]["method"] == "qrlora" and rows[0]["ranks"] == [8] and rows[0]["parameters"] == 8 * MATRICES


@pytest.mark.parametrize("method", list(METHODS))
def test_unload_and_delete_adapter_leave_the_base_model(runs, method):
    recipe, result = runs[method]["recipe"], runs[method]["result"]
    _, model = _fresh(recipe, result.output_dir)
    _, bare = _fresh(recipe)
    with torch.no_grad():
        base_logits = bare(IDS).logits
        assert (model(IDS).logits - base_logits).abs().max() > 1e-3
        lorakit.delete_adapter(model, "default")
        assert not adapter_configs(model) and not any(
            layer.adapter_names() for _, layer in adapter_layers(model)
        )
        torch.testing.assert_close(model(IDS).logits, base_logits, atol=0, rtol=0)
        lorakit.load_adapter(model, result.output_dir)  # into the emptied wrappers again
        lorakit.unload(model)
        assert not any(isinstance(m, AdapterLinear) for m in model.modules())
        torch.testing.assert_close(model(IDS).logits, base_logits, atol=0, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_load_without_activating_then_set_adapter(runs, method):
    recipe, result = runs[method]["recipe"], runs[method]["result"]
    _, active = _fresh(recipe, result.output_dir)
    _, model = _fresh(recipe)
    with torch.no_grad():
        base_logits = model(IDS).logits
        lorakit.load_adapter(model, result.output_dir, adapter_name="x", activate=False)
        assert lorakit.active_adapters(model) == []
        torch.testing.assert_close(model(IDS).logits, base_logits, atol=0, rtol=0)
        lorakit.set_adapter(model, "x")
        torch.testing.assert_close(model(IDS).logits, active(IDS).logits, atol=0, rtol=0)
