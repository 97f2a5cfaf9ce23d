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
