"""LoRA on a programmed chip: frozen base, three gradient modes, save/load, merging, the CLI."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

import analogllm as al
from analogllm.cli import main
from analogllm.data import token_blocks
from analogllm.eval.perplexity import evaluate_lm
from analogllm.hf.models import load_model
from analogllm.nn.linear import AnalogLinear
from analogllm.recipes import load_recipe
from analogllm.tuners import lora
from analogllm.hf.checkpoint import is_analog_checkpoint, save_pretrained
from analogllm.config.schema import ConfigError
from analogllm.training.config import DistillSection
from analogllm.training.finetune import MIN_GAP, FinetuneRecipe, TrainSection, finetune, train_adapters
from analogllm.training.hwa import Teacher, distillation_loss
from analogllm.tuners.pat import HardwareBackend, SimulatedChip, hardware_layers, on_hardware
from analogllm.tuners.zeroth_order import SPSA, ZerothOrderConfig

DAY = 86400.0


def make_chip(name: str = "tiny-llama", profile: str = "pcm", seconds: float = DAY, **overrides):
    """A freshly converted, programmed, aged and calibrated tiny model, and its data."""
    model, tok = load_model(name)
    al.analogize_(model, al.AnalogConfig.from_profile(profile, **overrides))
    al.program_(model, seed=0, seconds=seconds)
    train = token_blocks(tok, block_size=64, split="train", max_blocks=256)
    val = token_blocks(tok, block_size=64, split="validation", max_blocks=8)
    lora.calibrate_(model, train[:8])
    return model, train, val


def chip_loss(model, val) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)  # the same read-noise stream for every score
        return evaluate_lm(model, val, batch_size=8).loss


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora.adapter_parameters(model)}


TRAIN = TrainSection(steps=20, batch_size=8, lr=1e-2, seed=0)
ZO = ZerothOrderConfig(steps=50, lr=0.3, eps=0.05, directions=4, noise_probe=3)


# ----- the three modes: base frozen, loss lower --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["backprop", "physics-aware", "zeroth-order"])
def test_mode_trains_only_adapters_and_lowers_chip_loss(mode):
    model, train, val = make_chip()
    before_fp = lora.chip_fingerprint(model)
    peft_model = lora.attach_lora(model, lora.LoraSettings(r=4, alpha=8))
    assert lora.chip_fingerprint(peft_model) == before_fp  # a fresh adapter (B = 0) changes nothing
    before_loss = chip_loss(peft_model, val)
    start = adapter_state(peft_model)

    info = train_adapters(peft_model, mode, train, TRAIN, ZO)

    assert lora.chip_fingerprint(peft_model) == before_fp, "the programmed base chip changed"
    moved = [n for n, p in adapter_state(peft_model).items() if not torch.equal(p, start[n])]
    assert moved and all("lora_" in n for n in moved)
    after_loss = chip_loss(peft_model, val)
    assert after_loss < before_loss - 0.02, f"{mode}: chip loss {before_loss:.4f} -> {after_loss:.4f}"
    if mode == "zeroth-order":
        assert info["backwards"] == 0 and info["forwards"] == 2 * ZO.directions * ZO.steps + ZO.noise_probe
    else:
        assert info["forwards"] == info["backwards"] == TRAIN.steps


def test_zeroth_order_builds_no_autograd_graph():
    model, train, _ = make_chip()
    peft_model = lora.attach_lora(model)
    peft_model.eval()
    params = [p for _, p in lora.adapter_parameters(peft_model)]
    spsa = SPSA(params, ZerothOrderConfig(eps=0.05, directions=2, lr=0.3))
    saved = []
    ids = train[:8]

    def loss_fn() -> float:
        assert not torch.is_grad_enabled()
        loss = peft_model(input_ids=ids, labels=ids).loss
        assert loss.grad_fn is None and not loss.requires_grad
        return float(loss)

    # every tensor autograd would keep for a backward pass goes through the pack hook
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        with on_hardware(peft_model):
            for _ in range(2):
                spsa.step(loss_fn)
    assert saved == []
    assert all(p.grad is None for p in params)
    # the same forward with autograd on does save activations: the hook would have seen them
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        peft_model(input_ids=ids, labels=ids).loss.backward()
    assert saved


def test_zeroth_order_directions_are_regenerated_not_stored():
    p = torch.nn.Parameter(torch.zeros(1000))
    spsa = SPSA([p], ZerothOrderConfig(eps=0.1, directions=1, lr=1.0))
    # a linear loss L = c·θ: the projected gradient is exactly c·z, and the step is −lr·(c·z)·z
    c = torch.linspace(-1, 1, 1000)
    step = spsa.step(lambda: float(c @ p.detach()))
    z = torch.randn(1000, generator=torch.Generator().manual_seed(spsa.direction_seed(step=0, k=0)))
    assert step.projected[0] == pytest.approx(float(c @ z), rel=1e-4)
    torch.testing.assert_close(p.detach(), -float(c @ z) * z, rtol=1e-4, atol=1e-5)
    sigma, sigma_g = spsa.probe_noise(lambda: 1.0, passes=3)
    assert sigma == 0.0 and sigma_g == 0.0


# ----- modes, not flags ---------------------------------------------------------------------------------------
def test_train_mode_trains_adapters_and_keeps_the_programmed_chip():
    model, train, val = make_chip()
    peft_model = lora.attach_lora(model, lora.LoraSettings(dropout=0.1, analog=True))
    peft_model.train()  # what an HF Trainer or accelerate does: dropout on, the base stays the chip
    assert peft_model.training
    lora.check_deployed(peft_model)  # base matrices in chip mode, frozen
    base = [m for n, m, _ in al.analog_matrices(peft_model) if ".lora_" not in n]
    adapters = [m for n, m, _ in al.analog_matrices(peft_model) if ".lora_" in n]
    assert base and adapters
    assert all(m.mode == "chip" for m in base + adapters)
    assert all(m.lora_dropout["default"].training for m in peft_model.modules() if hasattr(m, "lora_dropout"))
    # analogue adapters train with the chip in the loop: a gradient, and their chip rewritten after a step
    a = adapters[0]
    w = next(lin for n, lin in peft_model.named_modules() if getattr(lin, "analog", None) is a).weight
    ids = train[:2]
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    before = a.chip.tiles.clone()
    with torch.no_grad():
        w.add_(0.1 * w.grad.sign())
    peft_model(input_ids=ids)
    assert not torch.equal(a.chip.tiles, before) and a.chip.seed == base[0].chip.seed
    al.set_mode(peft_model, "hwa", include="layers.0.")  # a base layer put in another mode is detected
    with pytest.raises(RuntimeError, match="'hwa' mode"):
        lora.check_deployed(peft_model)


def test_attach_requires_a_programmed_calibrated_chip():
    model, tok = load_model("tiny-llama")
    with pytest.raises(ValueError, match="not analogue"):
        lora.attach_lora(model)
    al.analogize_(model, al.AnalogConfig.from_profile("pcm"))
    with pytest.raises(ValueError, match="not programmed"):
        lora.attach_lora(model)
    al.program_(model, 0, DAY)
    with pytest.raises(ValueError, match="calibrate_"):
        lora.attach_lora(model)
    lora.calibrate_(model, token_blocks(tok, block_size=32, max_blocks=2))
    with pytest.raises(ValueError, match="'nope' is not an analogue layer"):
        lora.attach_lora(model, lora.LoraSettings(target_modules=("q_proj", "nope")))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tiny-llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("tiny-gpt2", {"c_attn", "c_proj", "c_fc"}),
        ("tiny-rwkv", {"key", "value", "receptance", "output"}),
        ("tiny-qwen3-moe", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("tiny-mamba", {"in_proj", "x_proj"}),  # peft refuses out_proj on Mamba
    ],
)
def test_family_default_targets(name, expected):
    model, _, _ = make_chip(name)
    assert set(lora.default_target_modules(model)) == expected
    peft_model = lora.attach_lora(model)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == expected


# ----- physics-aware: hardware forward, twin backward ---------------------------------------------------------
class IdealArrays:
    """A HardwareBackend whose arrays compute x·Wᵀ exactly (a perfect chip), as a lab plug-in would."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.programs: list[str] = []

    def program(self, name: str, weight: torch.Tensor) -> None:
        self.weights[name] = weight.clone()
        self.programs.append(name)

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weights[name].T


def lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in lora.adapter_parameters(model)}


@pytest.mark.parametrize("name, analog", [("tiny-llama", False), ("tiny-gpt2", True)])
def test_physics_aware_gradient_is_the_twins_vjp(name, analog):
    # On a perfect chip (identity config) the twin is exact, so physics-aware gradients must equal
    # autograd's; analogue adapters on GPT-2's Conv1D exercise the weight gradient (∂L/∂W = gᵀx) too.
    model, train, _ = make_chip(name, profile="ideal")
    assert model.analog_config.is_identity
    peft_model = lora.attach_lora(model, lora.LoraSettings(analog=analog))
    for _, p in lora.adapter_parameters(peft_model):  # B ≠ 0 so that every gradient path is live
        torch.nn.init.normal_(p, std=0.05)
    peft_model.eval()
    ids = train[:4]
    reference = lora_grads(peft_model, ids)
    backend = IdealArrays()
    assert isinstance(backend, HardwareBackend)
    with on_hardware(peft_model, backend) as session:
        pat = lora_grads(peft_model, ids)
        lora_grads(peft_model, ids)
    layers = hardware_layers(peft_model)
    assert sorted(backend.programs) == sorted(layers)  # each programmed once: nothing changed in between
    assert session.calls == 2 * len(layers)
    assert not any("base_model.model." in n or ".base_layer" in n for n in layers)
    for n, g in reference.items():
        torch.testing.assert_close(pat[n], g, rtol=1e-4, atol=1e-6)
    assert all("forward" not in vars(m) for m in layers.values())  # forwards restored on exit


def test_physics_aware_forward_is_the_chip_and_backward_the_twin():
    model, train, _ = make_chip()
    peft_model = lora.attach_lora(model)
    peft_model.eval()
    ids = train[:4]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        chip_logits = peft_model(input_ids=ids).logits
    with on_hardware(peft_model, SimulatedChip(peft_model)), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        hw_logits = peft_model(input_ids=ids).logits
    torch.testing.assert_close(hw_logits, chip_logits)  # the forward is the deployed chip's, noise and all
    # one layer: ∂L/∂x = g·W with the target weights, not the programmed noisy ones
    layer = next(m for m in hardware_layers(peft_model).values())
    x = torch.randn(3, layer.in_features, requires_grad=True)
    g = torch.randn(3, layer.out_features)
    with on_hardware(peft_model):
        layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ layer.weight)


# ----- save / load -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, analog", [("tiny-llama", False), ("tiny-gpt2", True)])
def test_adapters_round_trip_beside_the_chip(tmp_path, name, analog):
    model, train, _ = make_chip(name)
    peft_model = lora.attach_lora(model, lora.LoraSettings(analog=analog))
    train_adapters(peft_model, "backprop", train, replace(TRAIN, steps=3), ZO)
    lora.save_deployment(peft_model, tmp_path / "dep", name="task")
    assert is_analog_checkpoint(tmp_path / "dep/chip")
    assert (tmp_path / "dep/adapters/task/adapter_config.json").is_file()
    assert (tmp_path / "dep/adapters/task/adapter_model.safetensors").is_file()
    meta = json.loads((tmp_path / "dep/adapters/task/analog_adapters.json").read_text())
    assert meta["analog"] == analog and meta["chip"] == al.chip_info(peft_model)  # the chip the adapter corrects
    assert not [p for p in (tmp_path / "dep").rglob(".*")]  # no temporary leftovers
    ids = train[:4]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = peft_model(input_ids=ids).logits
    loaded = lora.load_deployment(tmp_path / "dep")
    assert lora.has_analog_adapters(loaded) == analog
    assert lora.chip_fingerprint(loaded) == lora.chip_fingerprint(peft_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    fresh = lora.attach_lora(make_chip(name)[0], lora.LoraSettings(analog=analog))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        untrained = fresh(input_ids=ids).logits
    assert not torch.allclose(untrained, expected)  # same chip, same noise: the trained adapters differ
    with pytest.raises(FileNotFoundError, match="no adapter 'other'"):
        lora.load_deployment(tmp_path / "dep", name="other")


# ----- merging -----------------------------------------------------------------------------------------------
def test_peft_merge_is_refused_and_leaves_the_chip_alone():
    model, train, _ = make_chip()
    peft_model = lora.attach_lora(model)
    train_adapters(peft_model, "backprop", train, replace(TRAIN, steps=2), ZO)
    fp = lora.chip_fingerprint(peft_model)
    for call in (peft_model.merge_and_unload, peft_model.merge_adapter, peft_model.base_model.merge_and_unload):
        with pytest.raises(lora.ChipMergeError, match="reprogramming the chip"):
            call()
    assert lora.chip_fingerprint(peft_model) == fp
    with pytest.raises(lora.ChipMergeError, match="fresh programming noise"):
        lora.merge_and_reprogram(peft_model, seed=0)


def test_merge_and_reprogram_programs_new_chip_with_merged_weights():
    model, train, _ = make_chip()
    peft_model = lora.attach_lora(model)
    train_adapters(peft_model, "backprop", train, replace(TRAIN, steps=3), ZO)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    merged_target = (q.base_layer.weight + q.scaling["default"] * q.lora_B["default"].weight
                     @ q.lora_A["default"].weight).detach()
    merged = lora.merge_and_reprogram(peft_model, seed=7)
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is AnalogLinear and layer.analog.mode == "chip"
    torch.testing.assert_close(layer.weight, merged_target)  # digital target = W + (α/r)·B·A
    assert al.chip_info(merged) == {"seed": 7, "seconds": 0.0}  # new chip instance, drift clock restarted
    realised = layer.analog.realised_weight(layer.weight)
    reference = type(layer.analog)(layer.analog.config, layer.analog.name, layer.in_features)
    torch.testing.assert_close(realised, _program(reference, merged_target, 7))
    old_chip = _program(reference, merged_target, 0, DAY)
    assert not torch.allclose(realised, old_chip)  # fresh noise, not the old chip's draws
    assert not torch.allclose(realised, merged_target, atol=1e-4)  # programming noise is there


def test_adapters_leave_the_kv_prefix_as_the_host_stored_it_from_the_exact_weights():
    # the attention sink's keys and values stay the exact digital ones while the adapters train (computed
    # through them at every forward they moved with the adapters, without a gradient), and a merge keeps
    # the prefix the adapters were trained with
    model, train, _ = make_chip(kv_prefix="bos")
    prefix = model.analog_kv_prefix
    exact = prefix._compute(model.base_model)
    peft_model = lora.attach_lora(model)
    train_adapters(peft_model, "backprop", train, replace(TRAIN, steps=3), ZO)
    assert prefix.stored is not None
    assert all(torch.equal(a, b) for kv, kv0 in zip(prefix.stored, exact) for a, b in zip(kv, kv0))
    through = prefix._compute(model.base_model)  # what the prefix would be through the trained adapters
    assert not all(torch.allclose(a, b) for kv, kv0 in zip(through, exact) for a, b in zip(kv, kv0))
    merged = lora.merge_and_reprogram(peft_model, seed=7)
    assert merged.analog_kv_prefix.stored is prefix.stored


def _program(matrix, weight, seed, seconds=0.0):
    matrix.program(weight, seed, seconds)
    return matrix.realised_weight(weight)


def test_merge_on_an_ideal_chip_reproduces_the_adapted_model():
    model, train, _ = make_chip(profile="ideal")
    peft_model = lora.attach_lora(model)
    train_adapters(peft_model, "backprop", train, replace(TRAIN, steps=3), ZO)
    ids = train[:4]
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged = lora.merge_and_reprogram(peft_model, seed=1)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


# ----- recipes and CLI ---------------------------------------------------------------------------------------
def test_builtin_recipes_validate():
    assert set(load_recipe(FinetuneRecipe, "finetune-tiny").train.modes) == {"backprop", "physics-aware", "zeroth-order"}
    smol = load_recipe(FinetuneRecipe, "finetune-smollm2")
    assert smol.baseline == "smollm2-135m" and smol.model.endswith("smollm2-pcm-hwa/final")  # LoRA on the HWA chip
    assert smol.chip.ages == (DAY, 365 * DAY) and len(smol.chip.seeds) >= 3


def test_cli_finetune_writes_chip_adapters_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["train.steps=2", "zeroth_order.steps=1", "zeroth_order.noise_probe=0", "data.eval_blocks=2",
            "data.train_blocks=32", f"out={out}"]
    assert main(["finetune", "finetune-tiny", "--quiet", *sum((["--set", s] for s in sets), [])]) == 0
    printed = capsys.readouterr().out
    for row in ("digital", "chip", "chip + LoRA (backprop)", "chip + LoRA (physics-aware)", "chip + LoRA (zeroth-order)"):
        assert f"| {row} " in printed
    assert "Perplexity on builtin" in printed and "Perplexity on shakespeare" in printed
    results = json.loads((out / "results.json").read_text())
    assert [m["mode"] for m in results["modes"]] == ["backprop", "physics-aware", "zeroth-order"]
    assert [m["forwards"] for m in results["modes"]] == [2, 2, 8]
    assert all(m["trainable"] == results["modes"][0]["trainable"] > 0 for m in results["modes"])
    for mode in ("backprop", "physics-aware", "zeroth-order"):
        assert (out / "adapters" / f"{mode}-chip0-t86400" / "adapter_model.safetensors").is_file()
    loaded = lora.load_deployment(out, name="physics-aware-chip0-t86400")
    assert al.chip_info(loaded) == {"seed": 0, "seconds": 86400.0}
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_over_chips_and_ages_against_a_baseline(tmp_path):
    # a 'trained' model (here: the tiny model itself, converted) and its baseline on the same two chips at two
    # ages: every row has one score per (chip, age) on every held-out text, and the recovery is recorded
    recipe = load_recipe(FinetuneRecipe, "finetune-tiny", {
        "baseline": "tiny-llama", "label": "chip + HWA", "baseline_label": "chip", "chip.seeds": [0, 1],
        "chip.ages": [0, 86400], "train.modes": ["backprop"], "train.steps": 2, "data.eval_blocks": 2,
        "data.train_blocks": 32, "out": str(tmp_path / "r")})
    result = finetune(recipe, progress=False, log=lambda _: None)
    assert list(result.scores) == ["chip", "chip + HWA", "chip + HWA + LoRA (backprop)"]
    for row in result.scores.values():
        for text in ("builtin", "shakespeare"):
            assert sorted((s, a) for s, a, _ in row[text]) == [(0, 0.0), (0, 86400.0), (1, 0.0), (1, 86400.0)]
    mean, std = result.stats("chip + HWA", "builtin", 86400.0)
    assert mean > 0 and std > 0  # two chips differ
    gap = result.stats("chip + HWA", "builtin", 86400.0, "loss")[0] - result.digital["builtin"].loss
    recovered = result.recovered("chip + HWA + LoRA (backprop)", "builtin", 86400.0)
    assert (recovered is None) == (gap <= MIN_GAP)  # a share of a gap only where there is one
    lora_loss = result.stats("chip + HWA + LoRA (backprop)", "builtin", 86400.0, "loss")[0]
    if recovered is not None:
        assert recovered == pytest.approx((gap + result.digital["builtin"].loss - lora_loss) / gap)
    assert "± " in result.table("shakespeare") and (tmp_path / "r" / "drift.png").is_file()


def test_finetune_trains_on_text_the_baseline_writes_itself(tmp_path, monkeypatch):
    # data.source: generated: the adapters' training blocks are the digital baseline's own samples (the ones
    # the HWA recipe samples, from the same cache), scores stay on the built-in and held-out texts
    from analogllm.training.finetune import recipe_texts
    from analogllm.training.selfgen import generated_blocks

    monkeypatch.setenv("ANALOGLLM_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(FinetuneRecipe, "finetune-tiny", {
        "data.source": "generated", "data.generated_blocks": 6, "data.block_size": 16, "data.eval_blocks": 2})
    digital, tok = load_model("tiny-llama")
    train, texts = recipe_texts(recipe, tok, digital)
    assert torch.equal(train, generated_blocks(digital, tok, 6, 16, 1.0, recipe.train.seed))
    assert train.shape == (6, 16) and list(texts) == ["builtin", "shakespeare"]
    assert not torch.equal(train, texts["builtin"][: len(train)])
    with pytest.raises(ConfigError, match="baseline"):
        recipe_texts(recipe, tok, None)


def test_cli_finetune_bad_settings_are_one_line_errors(capsys):
    assert main(["finetune", "finetune-tiny", "--set", "train.modes=[sideways]"]) == 2
    assert "train.modes[0]" in capsys.readouterr().err
    assert main(["finetune", "finetune-tiny", "--set", "lora.r=0"]) == 2
    assert "lora.r" in capsys.readouterr().err
    assert main(["finetune", "no-such-recipe"]) == 2
    assert "no-such-recipe" in capsys.readouterr().err


# ----- distillation from the digital model ----------------------------------------------------------------------
def sharp_pair(profile: str, seconds: float):
    """(digital teacher, its programmed chip, training blocks): tiny-llama with its final norm scaled ×30, so
    its next-token distributions are peaked (a random tiny model's are nearly uniform: nothing to distil)."""
    digital, tok = load_model("tiny-llama")
    with torch.no_grad():
        digital.model.norm.weight.mul_(30.0)
    chip = copy.deepcopy(digital)
    al.analogize_(chip, al.AnalogConfig.from_profile(profile))
    al.program_(chip, seed=0, seconds=seconds)
    train = token_blocks(tok, block_size=64, split="train", max_blocks=256)
    lora.calibrate_(chip, train[:8])
    return Teacher(digital), chip, train


def test_distillation_objective_is_zero_on_an_exact_chip_and_trains_on_a_noisy_one():
    # On the ideal profile the chip computes the digital model, so KL(teacher || chip) starts at ~0; on pcm
    # it starts well above and the adapters lower it, with the teacher never receiving a gradient.
    distill = replace(TRAIN, steps=40, lr=1e-3, distill=DistillSection(enabled=True))
    teacher, exact, train = sharp_pair("ideal", 0.0)
    info = train_adapters(lora.attach_lora(exact, lora.LoraSettings(r=4, alpha=8)), "backprop", train,
                          replace(distill, steps=1), ZO, teacher=teacher)
    assert abs(info["first_loss"]) < 1e-4
    teacher, noisy, train = sharp_pair("pcm", DAY)
    peft_model = lora.attach_lora(noisy, lora.LoraSettings(r=16, alpha=32))
    ids = train[:8]

    def kl() -> float:  # on a fixed batch under a fixed read-noise stream
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            return float(distillation_loss(peft_model(input_ids=ids).logits, teacher.logits(ids)))

    before = kl()
    info = train_adapters(peft_model, "backprop", train, distill, ZO, teacher=teacher)
    after = kl()
    assert info["first_loss"] > 0.05 and after < 0.9 * before, (info, before, after)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ValueError, match="teacher"):
        train_adapters(peft_model, "backprop", train, distill, ZO)


def test_a_teacher_must_be_digital():
    model, _, _ = make_chip()
    with pytest.raises(ValueError, match="digital"):
        Teacher(model)
    al.set_mode(model, "digital")
    assert Teacher(model).model is model  # an analogue model's exact targets qualify


def test_finetune_distils_from_the_baseline_and_needs_one(tmp_path):
    recipe = load_recipe(FinetuneRecipe, "finetune-tiny", {
        "train.modes": ["backprop"], "train.steps": 2, "data.eval_blocks": 2, "data.train_blocks": 16,
        "train.distill.enabled": True, "eval.plot": False})
    result = finetune(recipe, progress=False, log=lambda _: None)
    assert result.modes[0].first_loss < 0.05  # KL(digital || chip) of a random tiny model, not its CE (~ln V)
    chip_dir = tmp_path / "chip"
    save_pretrained(make_chip()[0], chip_dir, tokenizer=load_model("tiny-llama")[1])
    with pytest.raises(ConfigError, match="baseline"):
        finetune(replace(recipe, model=str(chip_dir)), progress=False, log=lambda _: None)
