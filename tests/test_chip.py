"""The chip is module state with an explicit mode: it survives moves, copies and pickling, is named by
its module (not conversion order), is untouched by ``.train()``/``.eval()`` and by an HF Trainer run, and
its one read op passes torch's own checks (opcheck, torch.compile)."""

import copy
import io

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import analogllm as al
from analogllm.data import token_blocks
from analogllm.hf.models import load_model
from analogllm.ops import read as readop
from analogllm.ops.noise import seeded
from analogllm.tuners import lora

DAY = 86400.0


def _chip(name="tiny-llama", profile="pcm"):
    model, tok = load_model(name)
    al.analogize_(model, profile)
    ids = token_blocks(tok, split="validation", block_size=32, max_blocks=2)
    with torch.no_grad(), seeded(0):
        model(input_ids=ids)  # data-initialised DAC ranges (from a noisy read: seeded, so every run is one chip)
    al.program_(model, seed=3, seconds=DAY)
    return model, tok, ids


def _logits(model, ids, dtype=None):
    with torch.no_grad(), seeded(11):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe"])
def test_a_deployed_chip_survives_dtype_moves_copies_and_pickling(name):
    model, _, ids = _chip(name)
    al.deploy_(model, seed=3, seconds=DAY)
    ref = _logits(model, ids)
    twin = copy.deepcopy(model)
    assert torch.equal(_logits(twin, ids), ref)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(_logits(loaded, ids), ref)
    model.to(torch.float64)  # used to break the next forward: the chip cache did not move with the model
    out = _logits(model, ids)
    assert out.dtype == torch.float64
    # the same reads in double precision, up to the few converter levels (and, in the MoE, expert choices)
    # that a float32 rounding puts on the other side of a boundary
    if name == "tiny-llama":
        close = (out.float() - ref).abs() <= 1e-3 + 1e-3 * ref.abs()
        assert close.float().mean().item() > 0.99
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05
    matrices = [m for _, m, _ in al.analog_matrices(model)]
    assert all(m.chip.tiles.dtype == torch.float64 for m in matrices)


def test_a_layer_is_the_same_chip_whatever_else_is_converted():
    full, _ = load_model("tiny-llama")
    al.analogize_(full, "pcm")
    part, _ = load_model("tiny-llama")
    al.analogize_(part, "pcm", include=[r"layers\.1\.mlp\.down_proj$"])  # converted first and alone
    al.program_(full, seed=5)
    al.program_(part, seed=5)
    a = full.model.layers[1].mlp.down_proj.analog.chip.tiles
    b = part.model.layers[1].mlp.down_proj.analog.chip.tiles
    assert torch.equal(a, b)
    other = full.model.layers[0].mlp.down_proj.analog.chip.tiles
    assert not torch.allclose(a, other)  # another layer, another chip


def test_train_and_eval_do_not_change_what_the_chip_computes():
    model, _, ids = _chip()
    model.eval()
    ref = _logits(model, ids)
    model.train()  # HF Trainer, accelerate and peft call this: it only means dropout now
    assert torch.equal(_logits(model, ids), ref)
    with al.mode(model, "hwa"):
        assert not torch.equal(_logits(model, ids), ref)
    assert {m for m in al.chip.modes(model).values()} == {"chip"}
    with al.mode(model, "digital"):
        digital = _logits(model, ids)
    assert not torch.allclose(digital, ref)


def test_an_hf_trainer_lora_run_trains_against_the_programmed_chip(tmp_path):
    model, tok, _ = _chip()
    blocks = token_blocks(tok, split="train", block_size=32, max_blocks=16)
    peft_model = lora.attach_lora(model)
    fingerprint = lora.chip_fingerprint(peft_model)
    before = {n: p.detach().clone() for n, p in lora.adapter_parameters(peft_model)}
    seen: list[set[str]] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(set(al.chip.modes(model).values()))

    data = [{"input_ids": b, "labels": b} for b in blocks]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[Watch()]).train()
    assert seen and all(s == {"chip"} for s in seen)  # every step read the chip
    assert lora.chip_fingerprint(peft_model) == fingerprint  # the chip itself is unchanged
    assert any(not torch.equal(p, before[n]) for n, p in lora.adapter_parameters(peft_model))


def test_the_read_op_passes_torch_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 70, generator=g, requires_grad=True)
    tiles = torch.randn(2, 35, 12, generator=g) / 6
    scale = torch.rand(2, 12, generator=g) + 0.5
    r = torch.tensor(2.5, requires_grad=True)
    adc = torch.tensor([4.0, 3.0])
    args = (x, tiles, scale, r, torch.tensor(1.0), adc, None, torch.randn(12, generator=g), None, None,
            torch.tensor([1, 2]), 8, 8, 0.0, 0.0, 0.0, True, False)  # noiseless: opcheck repeats the op
    torch.library.opcheck(readop.read, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_a_compiled_chip_forward_equals_the_eager_one():
    model, _, ids = _chip()
    quiet = al.AnalogConfig.from_profile("pcm", **{"device.read_noise_scale": 0.0, "output.noise": 0.0})
    lin = al.AnalogLinear(64, 32, config=quiet)
    lin.analog.program(lin.weight, seed=1)
    with torch.no_grad():
        lin.analog.input_range.fill_(3.0)
    lin.analog.mark_range_set()
    x = torch.randn(16, 64)
    with torch.no_grad():
        eager = lin(x)
        compiled = torch.compile(lin, backend="aot_eager")(x)
    assert torch.equal(eager, compiled)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_chip_is_the_cpu_chip_and_a_forward_never_syncs_the_host():
    model, _, ids = _chip()
    gpu = copy.deepcopy(model).cuda()
    al.program_(gpu, seed=3, seconds=DAY)
    for (_, a, _), (_, b, _) in zip(al.analog_matrices(model), al.analog_matrices(gpu)):
        assert torch.equal(a.chip.tiles, b.chip.tiles.cpu())  # one seed, one chip, on every device
    ids = ids.cuda()
    with torch.no_grad():
        gpu(input_ids=ids)  # warm-up (first-use allocations)
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu(input_ids=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@cuda
def test_cuda_deployed_chip_moves_and_reads_in_bf16():
    model, _, ids = _chip()
    al.deploy_(model, seed=3, seconds=DAY)
    ref = _logits(model, ids)
    model.cuda()
    out = _logits(model, ids.cuda())
    assert torch.allclose(out.float().cpu(), ref, atol=0.5)  # other read-noise draws on the GPU
    model.to(torch.bfloat16)
    assert torch.isfinite(_logits(model, ids.cuda()).float()).all()
