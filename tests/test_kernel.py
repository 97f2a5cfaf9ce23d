"""The chip read op: Philox noise, the fused CPU kernel against the torch reference, and every way the
kernel build can fail falling back cleanly."""

import math
import shutil
import stat

import pytest
import torch

import analogllm as al
from analogllm.nn.linear import AnalogLinear
from analogllm.ops import cpu as kernel
from analogllm.ops import read as readop
from analogllm.ops.philox import normals, philox

needs_kernel = pytest.mark.skipif(kernel.library() is None, reason="no C compiler: reads run on the torch path")


def test_philox_matches_the_random123_known_answers():
    z = torch.zeros(1, dtype=torch.int64)
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    pi = [torch.tensor([v]) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    assert [int(v) for v in philox(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(v) for v in philox(ones, ones, ones, ones, 0xFFFFFFFF, 0xFFFFFFFF)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert [int(v) for v in philox(*pi, 0xA4093822, 0x299F31D0)] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_read_normals_are_standard_normal_and_counter_based():
    z = normals(12345, 2, 500, 2000).double().flatten()
    n = z.numel()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 4 * se
    assert abs(z.var() - 1) < 4 * math.sqrt(2) * se
    assert abs((z**3).mean()) < 4 * math.sqrt(15) * se
    assert abs((z**4).mean() - 3) < 4 * math.sqrt(96) * se
    assert abs((z[1:] * z[:-1]).mean()) < 4 * se  # neighbours, incl. the words of one Philox block
    for k in (1.0, 2.0, 3.0):
        p = math.erfc(k / math.sqrt(2))
        assert abs((z.abs() > k).double().mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    s = z[:200_000].sort().values  # Kolmogorov-Smirnov (critical value at 0.1 %: 1.95/√n)
    i = torch.arange(1, s.numel() + 1, dtype=torch.float64) / s.numel()
    assert (torch.special.ndtr(s) - i).abs().max() < 1.95 / math.sqrt(s.numel())
    other = normals(12346, 2, 500, 2000).double().flatten()
    assert abs((z * other).mean()) < 4 * se  # another key is another stream
    assert torch.equal(normals(7, 3, 9, 1000), normals(7, 3, 9, 1010)[..., :1000])  # a sample is its position's


def test_no_two_rows_of_a_large_read_share_their_normals():
    # the former hash generator gave rows 3032 and 3779 of a 4096-row read the same normals
    z = normals(0x5EED, 1, 4096, 1536)[0]
    rows = {tuple(r[:8].tolist()) for r in z}
    assert len(rows) == 4096
    gram = z @ z.T / 1536
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() < 0.2  # independent rows: |correlation| ~ 1/√1536 · 5


@needs_kernel
def test_kernel_normals_are_the_reference_normals():
    for key in (0, 12345, (1 << 64) - 1, 0xDEADBEEFCAFE):
        a = kernel.normals(3, 70, 1537, key)
        b = normals(key, 3, 70, 1537)
        assert (a - b).abs().max() < 5e-5  # float polynomials vs torch's log/cos/sin


def _op_args(seed=0, tiles=3, n=64, rows=100, out=90, adc=True, sat=0.0, noise=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tiles * rows - 7, generator=g) * 2
    return dict(x=x, tiles=torch.randn(tiles, rows, out, generator=g) / 10, scale=torch.rand(tiles, out, generator=g) + 0.5,
                dac_range=torch.tensor(3.0), gain=torch.tensor(1.1),
                adc_range=torch.tensor([6.0, 4.0, 0.5])[:tiles] if adc else None,
                read_var=torch.full((tiles, out), 1e-4) if noise else None, bias=torch.randn(out, generator=g),
                key=torch.tensor([123, 456]), dac_bits=8, adc_bits=8, out_var=0.04**2 if noise else 0.0, shot=0.0,
                saturation=sat, need_gate=True, need_resid=True)


@needs_kernel
@pytest.mark.parametrize("case", ["adc", "tanh", "no-adc", "noiseless"])
def test_kernel_read_equals_the_reference_read(case):
    kw = _op_args(adc=case != "no-adc", sat=4.0 if case == "tanh" else 0.0, noise=case != "noiseless")
    order = ["x", "tiles", "scale", "dac_range", "gain", "adc_range", "read_var", "bias", "key", "dac_bits",
             "adc_bits", "out_var", "shot", "saturation", "need_gate", "need_resid"]
    k = readop._kernel(*[kw[a] for a in order])
    r = readop.reference(*[kw[a] for a in order])
    # the same Philox noise: outputs agree except where a normal's last bits move a value across an ADC
    # rounding boundary (rare), gates and ADC derivatives likewise
    close = (k[0] - r[0]).abs() <= 1e-4 * (1 + r[0].abs())
    assert close.float().mean() > 0.995
    if k[1].numel():
        assert k[1].dtype == r[1].dtype == (torch.bool if case != "tanh" else torch.float32)
        assert ((k[1].float() - r[1].float()).abs() > 1e-4).float().mean() < 0.005
    if k[2].numel():
        assert ((k[2] - r[2]).abs() > 1e-3).float().mean() < 0.005


@needs_kernel
@pytest.mark.parametrize("layout", ["dense", "tiled"])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("inl", [0.0, 0.7])
def test_kernel_dac_backward_equals_the_reference(layout, per_row, inl):
    # gradients of x (clipped straight-through), of the DAC range (LSQ) and the inputs the weights saw,
    # from a dense (N, in) or tiled (T, N, rows) gradient; rows of clipped inputs, a padded last tile
    g = torch.Generator().manual_seed(1)
    n, rows, tiles = 70, 40, 3
    x = torch.randn(n, tiles * rows - 9, generator=g) * 2
    r = torch.rand(n, 1, generator=g) * 3 + 0.5 if per_row else torch.tensor(2.5)
    shape = (tiles, n, rows) if layout == "tiled" else (n, x.shape[1])
    grad_u = torch.randn(*shape, generator=g)
    if layout == "tiled":
        grad_u[:, :, rows - 9:][-1] = 0.0  # the padding's gradient is dropped (untile_input), as the kernel's
    rg = torch.tensor(1.3)
    args = (x, grad_u, rg, r, 8, inl, rows)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        fused = readop.dac_backward(*args, *need)
        ref = readop.dac_backward_reference(*args, *need)
        for a, b, wanted in zip(fused, ref, need):
            assert a.shape == b.shape and (a.numel() > 0) == wanted
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (layout, per_row, inl, need)
    _, _, ur = readop.dac_backward(*args, False, False, True)
    seen, u = readop.untile_input(ur, x.shape[1]), readop.dac(x, r, 8, inl) * r
    assert torch.equal(seen, u) if not inl else torch.allclose(seen, u, atol=1e-6)  # u·r (the bow to rounding)
    assert ur[-1, :, rows - 9:].abs().max() == 0  # zero padding


@needs_kernel
def test_kernel_adc_range_sums_equal_torch():
    # a learned ADC range's derivative: Σ_n g·resid per tile column; columns not a multiple of the
    # kernel's 64-column blocks, and a column of zero gradient
    g = torch.Generator().manual_seed(2)
    grad, resid = torch.randn(300, 150, generator=g), torch.randn(3, 300, 150, generator=g)
    grad[:, 7] = 0.0
    sums = readop.adc_grad_sums(grad, resid)
    ref = torch.einsum("no,tno->to", grad.double(), resid.double())
    assert sums.shape == (3, 150) and torch.allclose(sums.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.all(sums[:, 7] == 0)
    torch.library.opcheck(readop.adc_grad_sums, (grad, resid), test_utils=("test_schema", "test_faketensor"))


def test_dac_backward_op_traces_with_fake_tensors():
    x, grad_u = torch.randn(16, 30), torch.randn(2, 16, 16)
    torch.library.opcheck(readop.dac_backward, (x, grad_u, torch.tensor(1.0), torch.tensor(2.0), 8, 0.0, 16,
                                                True, True, True), test_utils=("test_schema", "test_faketensor"))


def _layer(profile, overrides, inp=96, out=40):
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile(profile, **overrides)
    lin = AnalogLinear(inp, out, config=cfg)
    with torch.no_grad():
        lin.analog.input_range.fill_(2.5)  # some inputs clip
    lin.analog.mark_range_set()
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


PROFILES = {
    "pcm": {"tiling.rows": 40, "adc.bound": 0.6},
    "rram": {"tiling.rows": 40, "output.saturation": 0.8},
    "photonic": {"tiling.rows": 40, "device.detector_shot": 0.05},
}


@needs_kernel
@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("mode", ["chip", "hwa"])
def test_layer_reads_match_between_kernel_and_reference(profile, mode, monkeypatch):
    # noisy reads, tiles, bias, clipped DAC inputs, saturating ADC (pcm) or tanh (rram), detector shot
    # noise (photonic): the kernel and the torch reference draw the same noise, so outputs and input
    # gradients agree read for read
    lin = _layer(profile, PROFILES[profile])
    al.set_mode(lin, mode)
    x = torch.randn(300, 96) * 2
    y_fused, g_fused = _read(lin, x, monkeypatch, fused=True)
    y_ref, g_ref = _read(lin, x, monkeypatch, fused=False)
    assert lin.analog.tiles == 3
    rare = 3e-3  # outputs whose noise moved them across an ADC rounding boundary (last-bit differences)
    assert ((y_fused - y_ref).abs() > 1e-4 * (1 + y_ref.abs())).float().mean() <= rare
    assert ((g_fused - g_ref).abs() > 1e-4 * (1 + g_ref.abs())).float().mean() <= 2 * rare


@needs_kernel
def test_reads_are_reproducible_and_independent_of_the_thread_count(monkeypatch):
    lin = _layer("pcm", {"tiling.rows": 40})
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


def test_kernel_switched_off_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setenv("ANALOGLLM_KERNEL", "0")
    assert kernel.library() is None
    with pytest.raises(RuntimeError, match="ANALOGLLM_KERNEL"):
        kernel.normals(1, 1, 10, 0)
    lin = _layer("pcm", {})
    with torch.no_grad():
        y = lin(torch.randn(4, 96))
    assert torch.isfinite(y).all()


def _fresh_build(monkeypatch, tmp_path, cc: str | None):
    """Build the kernel from scratch into an empty cache with $CC = ``cc``; returns the library or None."""
    monkeypatch.setenv("ANALOGLLM_CACHE", str(tmp_path / "cache"))
    if cc is None:
        monkeypatch.delenv("CC", raising=False)
    else:
        monkeypatch.setenv("CC", cc)
    kernel.reset()
    try:
        return kernel.library()
    finally:
        kernel.reset()


def _script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc on this machine")
def test_kernel_builds_into_an_empty_cache_and_with_a_compiler_command_that_has_arguments(monkeypatch, tmp_path):
    lib = _fresh_build(monkeypatch, tmp_path, f"{shutil.which('gcc')} -pipe")  # like CC="ccache gcc": two words
    assert lib is not None
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("read-")  # no temporary file left behind
    z = torch.empty(2, 3, 10)
    lib.analogllm_normals(z.data_ptr(), 2, 3, 10, 99)
    assert (z - normals(99, 2, 3, 10)).abs().max() < 5e-5


def test_a_failing_or_hanging_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    failing = _script(tmp_path, "fail-cc", 'echo "cc: error: nothing works" >&2; exit 1')
    with pytest.warns(RuntimeWarning, match="nothing works"):
        assert _fresh_build(monkeypatch, tmp_path, failing) is None
    monkeypatch.setattr(kernel, "_TIMEOUT", 1)
    hanging = _script(tmp_path, "slow-cc", "sleep 30")
    with pytest.warns(RuntimeWarning, match="did not finish"):
        assert _fresh_build(monkeypatch, tmp_path, hanging) is None
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert _fresh_build(monkeypatch, tmp_path, str(tmp_path / "no-such-compiler")) is None
    lin = _layer("pcm", {})  # and reads still work, on the reference
    monkeypatch.setenv("ANALOGLLM_KERNEL", "1")
    monkeypatch.setenv("CC", failing)
    kernel.reset()
    with pytest.warns(RuntimeWarning), torch.no_grad():
        assert torch.isfinite(lin(torch.randn(4, 96))).all()
    kernel.reset()


def test_an_unwritable_cache_falls_back_with_a_warning(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ANALOGLLM_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    kernel.reset()
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert kernel.library() is None
    kernel.reset()


@needs_kernel
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-phi3", "tiny-rwkv", "tiny-lfm2", "tiny-qwen3-next",
                                  "tiny-mamba", "tiny-mamba2", "tiny-qwen3-moe"])
def test_fused_reads_match_the_reference_in_every_family(name, monkeypatch):
    # a noisy pcm chip (programming and read noise, drift, converters, tiles): the same logits either way
    from analogllm.hf.models import load_model

    model, _ = load_model(name)
    al.analogize_(model, al.AnalogConfig.from_profile("pcm"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)  # data-initialised DAC ranges
    al.program_(model, seed=1, seconds=3600.0)
    logits = []
    for switch in ("1", "0"):
        monkeypatch.setenv("ANALOGLLM_KERNEL", switch)
        torch.manual_seed(5)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=2e-3, rtol=1e-3)
