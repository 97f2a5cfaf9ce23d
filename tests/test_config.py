"""AnalogConfig: profiles by name, dict/YAML round trips, and clear errors for malformed input."""

import json

import pytest

import analogllm as al
from analogllm.config.schema import ConfigError


@pytest.mark.parametrize("name", ["ideal", "pcm", "rram", "photonic"])
def test_profiles_load_and_round_trip(name, tmp_path):
    cfg = al.AnalogConfig.from_profile(name)
    assert cfg.device.kind == name
    assert al.AnalogConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert al.AnalogConfig.load(path) == cfg


def test_profile_values_are_the_documented_ones():
    pcm = al.AnalogConfig.from_profile("pcm")
    assert pcm.device.g_max == 25.0 and pcm.dac.bits == 8 and pcm.adc.bits == 8
    assert (pcm.tiling.rows, pcm.tiling.cols) == (512, 512)
    assert al.AnalogConfig.from_profile("ideal").is_identity
    assert not pcm.is_identity


def test_overrides_are_validated():
    cfg = al.AnalogConfig.from_profile("pcm", **{"adc.bits": 6, "device.g_max": 20})
    assert cfg.adc.bits == 6 and cfg.device.g_max == 20.0
    with pytest.raises(ConfigError, match="adc.bits"):
        cfg.set("adc.bits", "six")


def test_numbers_in_exponent_form_are_numbers():
    # YAML 1.1 (PyYAML) reads 5e-5 as a string; `--set train.lr=5e-5` and `lr: 5e-5` in a recipe mean a number
    from analogllm.cli.args import parse_overrides
    from analogllm.config.schema import replace_path
    from analogllm.training.config import TrainSection

    cfg = al.AnalogConfig.from_profile("pcm", **parse_overrides(["device.g_max=2.5e1", "output.noise=4E-2"]))
    assert cfg.device.g_max == 25.0 and cfg.output.noise == 0.04
    assert replace_path(TrainSection(), "lr", "5e-5").lr == 5e-5
    for bad in ("5e", "e5", "5e-5x", "1e5.0"):
        with pytest.raises(ConfigError, match="output.noise"):
            al.AnalogConfig.from_profile("pcm", **{"output.noise": bad})


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"adc": {"bits": -3}}, "adc.bits"),
        ({"dac": {"bits": 0}}, "dac.bits"),
        ({"tiling": {"rows": 0}}, "tiling.rows"),
        ({"adc": {"bitz": 8}}, "valid fields of adc are: bits, bound"),
        ({"device": {"kind": "memristor9000"}}, "unknown device 'memristor9000'"),
        ({"device": {"kind": "pcm", "g_max": -1}}, "device.g_max"),
        ({"output": {"nonlinearity": "cubic"}}, "output.nonlinearity"),
        ({"exclude": ["lm_head("]}, "not a valid regular expression"),
        ({"training": {"clip_sigma": "big"}}, "training.clip_sigma"),
        ({"mapping": {"clip_fractions": [0.9, 1.5]}}, "mapping.clip_fractions"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_malformed_configs_name_the_problem(patch, message):
    data = al.AnalogConfig.from_profile("pcm").to_dict()
    data.update(patch)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        al.AnalogConfig.from_dict(data)


def test_unknown_profile_lists_the_built_ins():
    with pytest.raises(ConfigError, match="built-in profiles: ideal, pcm, photonic, rram"):
        al.AnalogConfig.from_profile("nope")


def test_include_exclude_selection():
    cfg = al.AnalogConfig(include=(r"mlp",), exclude=(r"lm_head", r"down"))
    assert cfg.selects("model.layers.0.mlp.up_proj")
    assert not cfg.selects("model.layers.0.mlp.down_proj")
    assert not cfg.selects("model.layers.0.self_attn.q_proj")


# ----- sources --------------------------------------------------------------------------------------------
def test_every_device_field_of_every_profile_has_its_own_source():
    import dataclasses

    from analogllm.config import profile_names, profile_sources

    for name in profile_names():
        device = al.AnalogConfig.from_profile(name).device
        keys = {part.strip() for key in profile_sources(name) for part in key.split("/")}
        missing = [f.name for f in dataclasses.fields(device) if f"device.{f.name}" not in keys]
        assert not missing, f"profile {name}: no source for device field(s) {', '.join(missing)}"


def test_source_lookup_takes_the_most_specific_key():
    from analogllm.config import source_of

    sources = {"dac/adc": "converters", "adc.bound": "bound", "device.g_max": "g"}
    assert source_of("adc.bits", sources) == "converters" and source_of("dac.range", sources) == "converters"
    assert source_of("adc.bound", sources) == "bound"
    assert source_of("device.g_max", sources) == "g"
    assert source_of("device.g_maximum", sources) is None  # a prefix only counts at a dot
    assert source_of("tiling.rows", {**sources, "all": "everything"}) == "everything"


def test_cli_profiles_sources_lists_every_parameter_with_its_source(capsys):
    import re

    from analogllm.cli import main
    from analogllm.config import profile_names, profile_parameters

    assert main(["profiles", "--sources"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        profile, parameter, value, source = (c.strip().replace("\\|", "|") for c in cells)
        rows[profile, parameter] = (value, source)
    for name in profile_names():
        for parameter, _, source in profile_parameters(name):
            assert (name, parameter) in rows
            if parameter.startswith("device."):
                assert rows[name, parameter][1] == source and source and source != "—"
    assert rows["pcm", "device.g_max"][0] == "25.0"
    assert "Wan et al." in rows["rram", "device.prog_noise"][1]
