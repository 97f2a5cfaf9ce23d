"""Evaluation under noise and drift: chip × time sweeps, the JSON / Markdown / PNG report, and the
``eval`` / ``quickstart`` commands end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import analogllm as al
from analogllm.hf.checkpoint import is_analog_checkpoint
from analogllm.cli import main
from analogllm.eval.perplexity import LMScore, evaluate_lm
from analogllm.eval.report import EvalReport, format_perplexity, format_seconds, write_report
from analogllm.eval.sweep import ChipScore, Series, drift_sweep
from analogllm.hf.models import load_model
from analogllm.training.config import DRIFT_TIMES

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ANALOGLLM_CACHE", str(tmp_path_factory.getbasetemp() / "eval-cache"))


@pytest.fixture(scope="module")
def analog_model():
    model, tok = load_model("tiny-llama")
    # strong drift so that ten years clearly differ from programming time even on a random model
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", **{"device.drift_scale": 3.0}))
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_sweep_is_repeatable_and_separates_chips_and_times(analog_model):
    model, ids = analog_model
    a = drift_sweep(model, ids, (0.0, 315_360_000.0), (0, 1, 2), batch_size=4)
    b = drift_sweep(model, ids, (0.0, 315_360_000.0), (0, 1, 2), batch_size=4)
    assert a == b  # same chips, same read-noise streams
    assert len(a.points) == 6 and {p.seed for p in a.points} == {0, 1, 2}
    at0 = [p.loss for p in a.at(0.0)]
    assert len(set(at0)) == 3  # three different chip instances
    # the model really was programmed as each chip at each time (not a cached t = 0 chip)
    al.program_(model, seed=1, seconds=315_360_000.0)
    torch.manual_seed(1_000_003 + 315_360_000)
    direct = evaluate_lm(model, ids, 4)
    assert direct.loss == pytest.approx([p for p in a.points if p.seed == 1 and p.seconds > 0][0].loss, rel=1e-6)
    mean, std = a.stats(0.0, "loss")
    assert mean == pytest.approx(sum(at0) / 3) and std == pytest.approx(torch.tensor(at0, dtype=torch.float64).std().item(), rel=1e-9)
    with pytest.raises(ValueError, match="metric"):
        a.stats(0.0, "bleu")


def test_sweep_needs_an_analogue_model():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="analogize_"):
        drift_sweep(model, torch.zeros(1, 8, dtype=torch.long), (0.0,), (0,))


def test_time_labels_and_number_formats():
    assert [format_seconds(t) for t in DRIFT_TIMES] == ["0 s", "1 h", "1 day", "1 year", "10 years"]
    assert format_seconds(604_800) == "7 days" and format_seconds(90) == "1.5 min"
    assert format_perplexity(14.7987) == "14.80" and format_perplexity(431.25) == "431.2"
    assert format_perplexity(75_568_422.8) == "7.56e+07" and format_perplexity(72.25, like=1837.5) == "72.2"


def _report() -> EvalReport:
    times, seeds = (0.0, 3600.0, 86400.0), (0, 1)
    before = Series("analogue", tuple(ChipScore(s, t, 3.0 + s * 0.1 + t / 1e5, math.exp(3.0 + s * 0.1 + t / 1e5), 0.3)
                                      for s in seeds for t in times))
    after = Series("analogue + HWA", tuple(ChipScore(s, t, 2.8 + s * 0.05, math.exp(2.8 + s * 0.05), 0.32)
                                           for s in seeds for t in times))
    return EvalReport(model="tiny-llama", profile="pcm", blocks=4, tokens=508, drift_times=times, chip_seeds=seeds,
                      digital=LMScore(2.7, math.exp(2.7), 0.33, 508), series=(before, after),
                      meta={"training": {"steps": 10, "seconds": 3.2, "processes": 1, "tokens": 5120}})


def test_report_files_round_trip_and_are_complete(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert EvalReport.from_dict(data) == report
    summary = data["series"]["analogue"]["summary"]
    assert [row["seconds"] for row in summary] == [0.0, 3600.0, 86400.0]
    mean, std = report.series[0].stats(3600.0, "perplexity")
    assert summary[1]["perplexity_mean"] == pytest.approx(mean) and summary[1]["perplexity_std"] == pytest.approx(std)
    md = paths["markdown"].read_text()
    for text in ("| digital", "| analogue + HWA", "1 h", "1 day", "± ", "Token accuracy", "10 steps"):
        assert text in md
    assert f"{mean:.2f} ± {std:.2f}" in md
    assert paths["plot"].read_bytes()[:8] == PNG and paths["plot"].stat().st_size > 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md", "eval.png"]  # no temp files


RUN = ["--set", "pretrain.steps=40", "--set", "train.steps=6", "--set", "eval.max_blocks=4",
       "--set", "eval.chip_seeds=[0, 1]", "--set", "eval.drift_times=[0, 86400]", "--set", "data.block_size=64", "--quiet"]


def test_train_then_eval_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "quickstart", *RUN, "--set", f"output_dir={out}", "--until", "4"]) == 0
    assert "--resume" in capsys.readouterr().out and not (out / "final").exists()
    assert (out / "checkpoints" / "step-00000004").is_dir()
    assert main(["train", "quickstart", *RUN, "--set", f"output_dir={out}", "--resume"]) == 0
    assert "trained steps 4→6 of 6" in capsys.readouterr().out
    assert is_analog_checkpoint(out / "final")
    assert main(["eval", "quickstart", *RUN, "--set", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "eval.json").read_text())
    assert set(data["series"]) == {"analogue", "analogue + HWA"}
    assert data["drift_times"] == [0.0, 86400.0] and data["chip_seeds"] == [0, 1]
    assert len(data["series"]["analogue + HWA"]["chips"]) == 4
    assert data["meta"]["training"]["steps"] == 6 and data["meta"]["recipe"]["train"]["steps"] == 6
    assert "| analogue + HWA" in printed and "eval.png" in printed
    assert (out / "eval.png").read_bytes()[:8] == PNG
    assert main(["eval", "quickstart", *RUN, "--set", f"output_dir={out}", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_quickstart_command_prints_the_before_after_table(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", *RUN, "--set", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    # perplexity and accuracy tables for the training corpus's held-out tail and for the held-out text of
    # another kind (Shakespeare)
    assert [line.split("|")[1].strip() for line in lines] == ["model", "digital", "analogue", "analogue + HWA"] * 4
    data = json.loads((out / "eval.json").read_text())
    assert data["digital"]["tokens"] == 4 * 63 and data["meta"]["text"] == "builtin"
    other = json.loads((out / "eval-shakespeare.json").read_text())
    assert other["meta"]["text"] == "shakespeare" and other["digital"]["loss"] != data["digital"]["loss"]
    assert data["meta"]["training"]["steps"] == 6 and (out / "final").is_dir()
