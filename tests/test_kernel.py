"""The fused CPU read kernel: its Gaussian generator, and reads that match the eager torch path."""

import math
import shutil

import pytest
import torch

import analogllm as al
from analogllm.ops import cpu as kernel
from analogllm.nn.linear import AnalogLinear

needs_kernel = pytest.mark.skipif(kernel.library() is None, reason="no C compiler: reads run on the torch path")


def test_kernel_is_built_wherever_a_compiler_is(tmp_path, monkeypatch):
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine")
    assert kernel.library() is not None
    monkeypatch.setenv("ANALOGLLM_CACHE", str(tmp_path))  # a fresh build into an empty cache
    lib = kernel._build()
    built = list((tmp_path / "kernels").iterdir())
    assert lib is not None and len(built) == 1 and built[0].name.startswith("read-")  # no temp file left
    z = torch.empty(8)
    lib.analogllm_normals(z.data_ptr(), 8, 3, 5)
    assert torch.equal(z, kernel.normals(8, row=3, key=5))


@needs_kernel
def test_kernel_normals_are_standard_normal():
    n = 2_000_000
    z = kernel.normals(n, row=0, key=12345).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 4 * se
    assert abs(z.var() - 1) < 4 * math.sqrt(2) * se
    assert abs((z**3).mean()) < 4 * math.sqrt(15) * se  # skewness
    assert abs((z**4).mean() - 3) < 4 * math.sqrt(96) * se  # kurtosis
    assert abs((z[1:] * z[:-1]).mean()) < 4 * se  # neighbours, incl. the two normals of one pair
    for k in (1.0, 2.0, 3.0):  # two-sided tails
        p = math.erfc(k / math.sqrt(2))
        assert abs((z.abs() > k).double().mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Kolmogorov-Smirnov distance to the normal CDF (critical value at 0.1 %: 1.95/√n)
    s = z[:200_000].sort().values
    cdf = torch.special.ndtr(s)
    i = torch.arange(1, s.numel() + 1, dtype=torch.float64) / s.numel()
    assert (cdf - i).abs().max() < 1.95 / math.sqrt(s.numel())
    other = kernel.normals(n, row=0, key=12346).double()
    assert abs((z * other).mean()) < 4 * se  # another key is another stream
    assert abs((z * kernel.normals(n, row=1, key=12345).double()).mean()) < 4 * se  # another row
    assert torch.equal(kernel.normals(1000, 9, 7), kernel.normals(1010, 9, 7)[:1000])  # counter-based


def _pair(profile, overrides, inp=96, out=40):
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile(profile, **overrides)
    lin = AnalogLinear(inp, out, config=cfg)
    with torch.no_grad():
        lin.analog.input_range.fill_(2.5)  # some inputs clip
        lin.analog.range_ready.fill_(True)
    lin.eval()
    lin.analog.program(lin.weight, seed=4, seconds=3600.0)
    return lin


def _read(lin, x, monkeypatch, fused: bool, seed=0):
    monkeypatch.setenv("ANALOGLLM_KERNEL", "1" if fused else "0")
    x = x.clone().requires_grad_(torch.is_grad_enabled())
    torch.manual_seed(seed)
    y = lin(x)
    if not torch.is_grad_enabled():
        return y, None
    g = torch.linspace(-1, 1, y.numel()).view_as(y)
    (gx,) = torch.autograd.grad(y, [x], g)
    return y.detach(), gx


NOISELESS = {
    "pcm": {"device.read_noise_scale": 0.0, "output.noise": 0.0, "tiling.rows": 40, "adc.bound": 0.6},
    "rram": {"device.read_noise": 0.0, "output.noise": 0.0, "tiling.rows": 40, "output.saturation": 0.8},
    "photonic": {"device.detector_thermal": 0.0, "device.detector_shot": 0.0, "tiling.rows": 40},
}


@needs_kernel
@pytest.mark.parametrize("profile", sorted(NOISELESS))
def test_fused_read_matches_the_eager_path_without_noise(profile, monkeypatch):
    # tiled, bias, clipped DAC inputs, saturating ADC (pcm) or tanh (rram): output and input gradient
    lin = _pair(profile, NOISELESS[profile])
    x = torch.randn(300, 96) * 2
    y_fused, g_fused = _read(lin, x, monkeypatch, fused=True)
    y_eager, g_eager = _read(lin, x, monkeypatch, fused=False)
    assert lin.analog.tiles == 3
    # own tanh polynomial vs torch's (rram): a rare output lands on the neighbouring ADC level
    rare = 2e-3 if profile == "rram" else 0.0
    assert ((y_fused - y_eager).abs() > 1e-4).float().mean() <= rare
    assert ((g_fused - g_eager).abs() > 1e-4 * (1 + g_eager.abs())).float().mean() <= 2 * rare


NOISY = {
    "pcm": {"tiling.rows": 40, "adc.bits": None},
    "photonic": {"tiling.rows": 40, "adc.bits": None, "device.detector_shot": 0.05},
}


@needs_kernel
@pytest.mark.parametrize("profile", [*sorted(NOISY), "train"])
def test_fused_read_noise_has_the_eager_statistics(profile, monkeypatch):
    # one input row repeated 4000 times: every row is an independent read of the same outputs; "train":
    # hardware-aware training noise (weight noise as output noise σ_w‖u‖, plus output noise)
    lin = _pair("pcm" if profile == "train" else profile, NOISY.get(profile, NOISY["pcm"]))
    lin.train(profile == "train")
    x = torch.randn(1, 96).expand(4000, 96).contiguous()
    with torch.no_grad():
        y_fused, _ = _read(lin, x, monkeypatch, fused=True)
        y_eager, _ = _read(lin, x, monkeypatch, fused=False)
    var_f, var_e = y_fused.var(0), y_eager.var(0)
    assert var_e.mean() > 0
    assert abs(var_f.mean() / var_e.mean() - 1) < 0.05
    assert torch.allclose(var_f, var_e, rtol=0.2)  # per output (4000 samples: ±9 % at 4σ)
    sd = var_e.sqrt()
    assert ((y_fused.mean(0) - y_eager.mean(0)).abs() < 5 * sd / math.sqrt(4000)).all()


@needs_kernel
def test_reads_are_reproducible_and_independent_of_the_thread_count(monkeypatch):
    lin = _pair("pcm", {"tiling.rows": 40})
    x = torch.randn(256, 96)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one, _ = _read(lin, x, monkeypatch, fused=True, seed=3)
            torch.set_num_threads(2)
            two, _ = _read(lin, x, monkeypatch, fused=True, seed=3)
            other, _ = _read(lin, x, monkeypatch, fused=True, seed=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(one, other)  # fresh read noise per seed


def test_kernel_switched_off_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("ANALOGLLM_KERNEL", "0")
    assert kernel.library() is None
    with pytest.raises(RuntimeError, match="ANALOGLLM_KERNEL"):
        kernel.normals(10)
    lin = _pair("pcm", {})
    with torch.no_grad():
        y = lin(torch.randn(4, 96))
    assert torch.isfinite(y).all()


@needs_kernel
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-phi3", "tiny-rwkv", "tiny-lfm2", "tiny-qwen3-next",
                                  "tiny-mamba", "tiny-mamba2", "tiny-qwen3-moe"])
def test_fused_reads_match_the_eager_path_in_every_family(name, monkeypatch):
    # noiseless pcm chip (programming noise, drift, converters, tiles): the same logits either way
    from analogllm.hf.models import load_model

    model, _ = load_model(name)
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", **{"device.read_noise_scale": 0.0, "output.noise": 0.0}))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        model(ids)  # data-initialised DAC ranges
    al.program_(model, seed=1, seconds=3600.0)
    model.eval()
    logits = []
    for switch in ("1", "0"):
        monkeypatch.setenv("ANALOGLLM_KERNEL", switch)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])
