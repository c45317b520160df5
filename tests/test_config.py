"""Strict YAML configs: unknown or mistyped keys are refused by name; resolved configs are saved."""
import pytest
import yaml

from flgcore.config import load_config, save_config, to_dict
from flgcore.config import FlgError
from flgcore.pretrain import PretrainConfig


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nlr: 1\narch:\n  num_layers: 3\n")
    cfg = load_config(PretrainConfig, f, ["batch_size=4", "arch.ffn_dim=8"])
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.arch.num_layers, cfg.arch.ffn_dim) == (7, 1.0, 4, 3, 8)
    assert isinstance(cfg.lr, float)
    path = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    assert load_config(PretrainConfig, path) == cfg


def test_unknown_key_names_it_and_the_allowed_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stepz: 7\n")
    with pytest.raises(FlgError, match=r"unknown config key 'stepz'; allowed: out, arch, steps"):
        load_config(PretrainConfig, f)
    with pytest.raises(FlgError, match=r"unknown config key 'arch.layers'"):
        load_config(PretrainConfig, None, ["arch.layers=3"])


@pytest.mark.parametrize("ov,msg", [("steps=many", "'steps' must be int"), ("lr=true", "'lr' must be float"),
                                    ("arch.patch_size=3", "'arch.patch_size' must be a list"),
                                    ("steps", "must look like key=value")])
def test_mistyped_values_are_refused(ov, msg):
    with pytest.raises(FlgError, match=msg):
        load_config(PretrainConfig, None, [ov])


def test_missing_file(tmp_path):
    with pytest.raises(FlgError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
