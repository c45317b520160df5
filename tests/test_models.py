"""Loading: supported families by config class name, strict weight checks, one-line CLI errors."""
import json

import pytest

from flgcore.cli import main
from flgcore.models import load_transformer, tiny_model
from flgcore.config import FlgError


def test_unsupported_directory_names_what_was_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FlgError, match="found model class 'UNet2DConditionModel'; supported: WanTransformer3DModel"):
        load_transformer(tmp_path)
    with pytest.raises(FlgError, match="no transformer config.json found"):
        load_transformer(tmp_path / "missing")


def test_pipeline_directory_resolves_to_its_transformer(tmp_path):
    m = tiny_model("wan-t2v")
    m.save_pretrained(tmp_path / "transformer")
    assert type(load_transformer(tmp_path)).__name__ == "WanTransformer3DModel"


def test_config_with_more_blocks_than_weights_is_refused(tmp_path):
    m = tiny_model("wan-t2v")
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_layers"] += 2  # diffusers would leave two blocks on the meta device, silently
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlgError, match="weights do not match the config"):
        load_transformer(tmp_path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert main(["blocks", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flg: error:") and "\n" not in err and "FluxTransformer2DModel" in err
    assert main(["prune", "--model", "tiny:wan-t2v", "--drop", "9", "--out", str(tmp_path / "p")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # nothing half-written
    assert main(["pretrain", "stepz=3"]) == 2
    assert "unknown config key 'stepz'" in capsys.readouterr().err


def test_cli_prune_roundtrip(tmp_path, capsys):
    assert main(["prune", "--model", "tiny:hunyuan", "--drop", "0,3", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "kept 3/5 blocks" in out
    err = float(out.rsplit("=", 1)[1])
    assert err < 1e-5
    assert main(["blocks", "--model", str(tmp_path / "p")]) == 0


def test_stage_options_accept_both_spellings(capsys):
    from flgcore.cli import _as_overrides
    assert _as_overrides(["--model", "synth-tiny", "--n=3", "steps=5", "--config", "c.yaml", "--seed-offset", "2"]) == \
        ["model=synth-tiny", "n=3", "steps=5", "--config", "c.yaml", "seed_offset=2"]
    assert main(["eval", "--model"]) == 2
    assert "option --model needs a value" in capsys.readouterr().err
    assert main(["eval", "--nn", "2"]) == 2
    assert "unknown config key 'nn'" in capsys.readouterr().err
