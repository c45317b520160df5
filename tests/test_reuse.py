"""Cached runs are reused only for the same config over the same input weights (`models.fingerprint`)."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from flgcore import report
from flgcore.models import fingerprint
from flgcore.config import FlgError


def _perturb(model_dir):
    f = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in w.items()}, f)


def test_a_cached_run_is_redone_when_the_weights_under_its_model_name_change(tiny_bundle_dir, tmp_path):
    model = tmp_path / "teacher"
    shutil.copytree(tiny_bundle_dir, model)
    fields = dict(model=str(model), out=str(tmp_path / "s1"), n=2, batch_size=2, sigmas=[0.5], retention=0.75)
    first = report.run("stage1", **fields)
    stamp = (tmp_path / "s1" / "metrics.json").stat().st_mtime_ns
    assert report.run("stage1", **fields) == first
    assert (tmp_path / "s1" / "metrics.json").stat().st_mtime_ns == stamp  # reused, not run again
    print_before = fingerprint(model)
    _perturb(model)
    assert fingerprint(model) != print_before and fingerprint(str(model / "transformer")) == fingerprint(model)
    again = report.run("stage1", **fields)
    assert (tmp_path / "s1" / "metrics.json").stat().st_mtime_ns != stamp
    assert again["importance_first"] != first["importance_first"]  # scored on the new weights


def test_a_folder_that_is_not_a_run_is_never_removed(tiny_bundle_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FlgError, match="not a run folder"):
        report.run("stage1", model=str(tiny_bundle_dir), out=str(tmp_path / "mine"), n=2, batch_size=2, sigmas=[0.5])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_an_executed_notebook_is_not_reused_after_its_model_or_its_code_changed(tiny_bundle_dir, tmp_path):
    from flgcore.notebooks import _done, _inputs
    model = tmp_path / "teacher"
    shutil.copytree(tiny_bundle_dir, model)
    params = dict(model=str(model), n=2)
    cell = lambda text, tags=(): {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": text}  # noqa: E731
    src = tmp_path / "01.ipynb"
    src.write_text(json.dumps({"cells": [cell("n = 1", ["parameters"]), cell("print(n)")]}))
    executed = tmp_path / "nb" / "01.ipynb"
    executed.parent.mkdir()
    ran = {"cells": [cell("n = 1", ["parameters"]), cell("n = 2\n", ["injected-parameters"]), cell(["print", "(n)"])],
           "metadata": {"papermill": {"parameters": params, "end_time": "now"}}}
    executed.write_text(json.dumps(ran))
    (tmp_path / "nb" / "inputs.json").write_text(json.dumps(_inputs(params)))
    assert _done(executed, params, src)  # the injected cell is papermill's, not the notebook's
    src.write_text(json.dumps({"cells": [cell("n = 1", ["parameters"]), cell("print(n + 1)")]}))
    assert not _done(executed, params, src)  # edited after it ran
    src.write_text(json.dumps({"cells": ran["cells"][:1] + ran["cells"][2:]}))
    assert _done(executed, params, src)
    _perturb(model)
    assert not _done(executed, params, src)
