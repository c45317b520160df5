"""Bad input to every `flg` command: one line naming the bad value, exit status 2, no traceback, and nothing
written (in the working folder, beside the inputs, or in the repository) that was not there before.

Most cases call `cli.main` in-process (the CLI's start-up imports torch: seconds per process); a few run the
installed `flg` to prove the real exit path.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flgcore.cli import main
from flgcore.models import BUILTIN

REPO = Path(__file__).resolve().parent.parent
FLG = Path(sys.executable).parent / "flg"


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def untracked(repo: Path) -> set[str]:
    """New files a run could leave in the repository (untracked or ignored), apart from caches and sources."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=repo, capture_output=True, text=True).stdout
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if "__pycache__" not in p and ".pytest_cache" not in p
            and not p.endswith((".py", ".md", ".ipynb", ".yaml", ".toml"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Readable and unreadable inputs: broken copies of the shipped teacher, selections, configs, manifests, clips."""
    d = tmp_path_factory.mktemp("inputs")
    model = BUILTIN["synth-tiny"]
    weights = "transformer/diffusion_pytorch_model.safetensors"

    def copy(name):
        shutil.copytree(model, d / name)
        return d / name
    blob = (model / weights).read_bytes()
    (copy("trunc") / weights).write_bytes(blob[: len(blob) // 2])
    (copy("badjson") / "transformer" / "config.json").write_text("{")
    tcfg = json.loads((model / "transformer" / "config.json").read_text())
    tcfg["num_layers"] += 2  # a config that disagrees with its weights
    (copy("other") / "transformer" / "config.json").write_text(json.dumps(tcfg))
    (copy("badmeta") / "flgcore.json").write_text('{"sampler": "eu')
    (copy("noweights") / weights).unlink()
    (d / "sel_trunc.json").write_text('{"kept": [0, 1')
    (d / "sel_other.json").write_text(json.dumps(dict(kept=[0, 1, 2, 3, 4, 5], dropped=[6, 7])))
    (d / "bad.yaml").write_text("steps: [1,\nlr: 2\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "clips").mkdir()
    (d / "clips" / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    (d / "garbage.csv").write_bytes(b"\xff\xfe\x00video,caption\x00\x81")
    (d / "nocols.csv").write_text("path,text\na.mp4,a red square\n")
    (d / "manifest.csv").write_text("video,caption\na.mp4,a red square moves left\n")
    (d / "pipe").mkdir()
    (d / "pipe" / "model_index.json").write_text("{not json")
    from tiny_pipelines import write_tiny_pipeline
    write_tiny_pipeline(d / "i2v", image_conditioned=True)
    (d / "t2v_suite.csv").write_text("prompt\na red square moves left\n")
    (d / "noimage_suite.csv").write_text("prompt,image\na red square moves left,gone.png\n")
    (d / "colour_suite.csv").write_text("prompt,image,colour\na red square moves left,x.png,red\n")
    (d / "empty_suite.csv").write_text("")
    from PIL import Image
    Image.new("RGB", (32, 32)).save(d / "f.png")
    (d / "suite.csv").write_text("prompt,image\na red square moves left,f.png\n")
    (d / "evalrun").mkdir()
    (d / "evalrun" / "clips.csv").write_text("seed,average\n1,0.5\n")
    return d


@pytest.fixture(scope="module")
def repo_clean():
    before = untracked(REPO)
    yield
    assert untracked(REPO) - before == set(), "a bad input left files in the repository"


M = "synth-tiny"  # the shipped teacher; {d} is the inputs folder; the working folder holds a plain file `afile`
CASES = [
    # (id, argv, a word the one error line must contain)
    ("blocks-missing", ["blocks", "--model", "nowhere"], "nowhere"),
    ("blocks-tiny-kind", ["blocks", "--model", "tiny:bogus"], "bogus"),
    ("blocks-config-json", ["blocks", "--model", "{d}/badjson"], "config.json"),
    ("blocks-truncated-weights", ["blocks", "--model", "{d}/trunc"], "trunc"),
    ("blocks-weights-of-another-model", ["blocks", "--model", "{d}/other"], "do not match"),
    ("blocks-no-weights", ["blocks", "--model", "{d}/noweights"], "no weights"),
    ("blocks-unknown-option", ["blocks", "--mdl", "x"], "--mdl"),
    ("prune-keep-parse", ["prune", "--model", "tiny:wan-t2v", "--keep", "1,x", "--out", "p"], "block indices"),
    ("prune-drop-range", ["prune", "--model", "tiny:wan-t2v", "--drop", "9", "--out", "p"], "9"),
    ("prune-keep-none", ["prune", "--model", "tiny:wan-t2v", "--keep", "", "--out", "p"], "at least one block"),
    ("prune-keep-and-drop", ["prune", "--model", "tiny:wan-t2v", "--keep", "0", "--drop", "1", "--out", "p"],
     "exactly one"),
    ("prune-out-is-a-file", ["prune", "--model", "tiny:wan-t2v", "--drop", "1", "--out", "afile"], "afile"),
    ("sample-seed-parse", ["sample", "--model", M, "--seed", "1,x", "--out", "s"], "seeds"),
    ("sample-seed-negative", ["sample", "--model", M, "--seed", "-1", "--out", "s"], "-1"),
    ("sample-steps", ["sample", "--model", M, "--steps", "0", "--out", "s"], "steps"),
    ("sample-cfg", ["sample", "--model", M, "--cfg", "-2", "--out", "s"], "cfg"),
    ("sample-image", ["sample", "--model", M, "--image", "nowhere.png", "--out", "s"], "nowhere.png"),
    ("sample-caption", ["sample", "--model", M, "--caption", "a purple cat", "--out", "s"], "purple"),
    ("sample-out-is-a-file", ["sample", "--model", M, "--out", "afile/s"], "afile"),
    ("sample-flgcore-json", ["sample", "--model", "{d}/badmeta", "--out", "s"], "flgcore.json"),
    ("sample-drop-range", ["sample", "--model", M, "--drop", "99", "--out", "s"], "99"),
    ("sample-sampler", ["sample", "--model", M, "--sampler", "heun", "--out", "s"], "heun"),
    ("eval-n", ["eval", f"model={M}", "n=0", "out=e"], "'n'"),
    ("eval-batch-size", ["eval", f"model={M}", "batch_size=0", "out=e"], "batch_size"),
    ("eval-sigmas", ["eval", f"model={M}", "sigmas=[0.5, 2]", "out=e"], "sigmas[1]"),
    ("eval-seed-offset", ["eval", f"model={M}", "seed_offset=-5", "out=e"], "seed_offset"),
    ("eval-steps-type", ["eval", f"model={M}", "steps=abc", "out=e"], "abc"),
    ("eval-view", ["eval", f"model={M}", "view=middle", "n=1", "out=e"], "middle"),
    ("eval-out-is-a-file", ["eval", f"model={M}", "out=afile"], "afile"),
    ("eval-clips-missing", ["eval", "clips=nowhere", "out=e"], "clips"),
    ("eval-clips-corrupt", ["eval", "clips={d}/clips", "out=e"], "bad.npz"),
    ("eval-model-truncated", ["eval", "model={d}/trunc", "n=1", "out=e"], "trunc"),
    ("eval-real-no-suite", ["eval", "model={d}/i2v", "out=e"], "suite="),
    ("eval-real-t2v-suite", ["eval", "model={d}/i2v", "suite={d}/t2v_suite.csv", "out=e"], "image"),
    ("eval-real-missing-image", ["eval", "model={d}/i2v", "suite={d}/noimage_suite.csv", "out=e"], "gone.png"),
    ("eval-real-unknown-column", ["eval", "model={d}/i2v", "suite={d}/colour_suite.csv", "out=e"], "colour"),
    ("eval-real-empty-suite", ["eval", "model={d}/i2v", "suite={d}/empty_suite.csv", "out=e"], "empty_suite.csv"),
    ("eval-real-teacher-drop-view", ["eval", "model={d}/i2v", "suite={d}/suite.csv", "view=drop", "out=e"],
     "drop set"),
    ("eval-real-scheduler", ["eval", "model={d}/i2v", "suite={d}/suite.csv", "scheduler=heun", "out=e"], "heun"),
    ("eval-synth-with-suite", ["eval", f"model={M}", "suite={d}/t2v_suite.csv", "out=e"], "suite"),
    ("sample-real-no-prompt", ["sample", "--model", "{d}/i2v", "--out", "s"], "--prompt"),
    ("compare-boot", ["compare", "{d}/evalrun", "{d}/evalrun", "--boot", "0"], "boot"),
    ("compare-missing", ["compare", "{d}/evalrun", "nowhere"], "nowhere"),
    ("compare-bad-csv", ["compare", "{d}/garbage.csv", "{d}/evalrun"], "garbage.csv"),
    ("stage1-yaml", ["stage1", "--config", "{d}/bad.yaml"], "bad.yaml"),
    ("stage1-yaml-not-a-mapping", ["stage1", "--config", "{d}/list.yaml"], "list.yaml"),
    ("stage1-config-missing", ["stage1", "--config", "nowhere.yaml"], "nowhere.yaml"),
    ("stage1-override-yaml", ["stage1", f"model={M}", "n=[1,", "out=r"], "n=[1,"),
    ("stage1-option-without-value", ["stage1", "--n"], "--n"),
    ("stage1-data", ["stage1", f"model={M}", "data=nowhere", "out=r"], "data"),
    ("stage1-retention", ["stage1", f"model={M}", "retention=1.5", "out=r"], "retention"),
    ("stage1-seed", ["stage1", f"model={M}", "seed=-1", "out=r"], "seed"),
    ("stage1-sigmas-empty", ["stage1", f"model={M}", "sigmas=[]", "out=r"], "sigmas"),
    ("stage1-method", ["stage1", f"model={M}", "method=greedy", "out=r"], "greedy"),
    ("stage1-model-of-another-config", ["stage1", "model={d}/other", "out=r"], "do not match"),
    ("stage1-out-is-a-file", ["stage1", f"model={M}", "out=afile"], "afile"),
    ("stage2-selection-missing", ["stage2", f"model={M}", "selection=nowhere.json", "out=r"], "selection"),
    ("stage2-selection-truncated", ["stage2", f"model={M}", "selection={d}/sel_trunc.json", "out=r"], "selection"),
    ("stage2-selection-of-another-model", ["stage2", f"model={M}", "selection={d}/sel_other.json", "out=r"],
     "covers blocks"),
    ("stage2-lr", ["stage2", f"model={M}", "drop=[1]", "lr=-0.1", "out=r"], "lr"),
    ("stage2-p", ["stage2", f"model={M}", "drop=[1]", "p=0", "out=r"], "'p'"),
    ("stage2-steps", ["stage2", f"model={M}", "drop=[1]", "steps=0", "out=r"], "steps"),
    ("stage2-batch-size", ["stage2", f"model={M}", "drop=[1]", "batch_size=-2", "out=r"], "batch_size"),
    ("stage2-ckpt-every", ["stage2", f"model={M}", "drop=[1]", "ckpt_every=0", "out=r"], "ckpt_every"),
    ("stage2-drop-range", ["stage2", f"model={M}", "drop=[99]", "out=r"], "99"),
    ("stage2-precision", ["stage2", f"model={M}", "drop=[1]", "precision=fp16", "out=r"], "fp16"),
    ("stage3-fake-lr", ["stage3", f"model={M}", "fake_lr=-1", "out=r"], "fake_lr"),
    ("stage3-sigmas", ["stage3", f"model={M}", "sigmas=[0.9, 0]", "out=r"], "sigmas[1]"),
    ("stage3-fake-updates", ["stage3", f"model={M}", "fake_updates=0", "out=r"], "fake_updates"),
    ("stage3-beta-range", ["stage3", f"model={M}", "beta1_range=-1", "out=r"], "beta1_range"),
    ("stage3-model-missing", ["stage3", "model=nowhere", "out=r"], "nowhere"),
    ("stage3-no-drop-set", ["stage3", f"model={M}", "out=r"], "drop set"),
    ("pretrain-lr", ["pretrain", "lr=.nan", "out=r"], "lr"),
    ("pretrain-ema-decay", ["pretrain", "ema_decay=1", "out=r"], "ema_decay"),
    ("pretrain-cond-dropout", ["pretrain", "cond_dropout=1.5", "out=r"], "cond_dropout"),
    ("pretrain-steps", ["pretrain", "steps=-1", "out=r"], "steps"),
    ("pretrain-arch", ["pretrain", "arch.num_layers=0", "out=r"], "arch.num_layers"),
    ("pretrain-unknown-key", ["pretrain", "stepz=3", "out=r"], "stepz"),
    ("pretrain-prediction", ["pretrain", "prediction=eps", "steps=0", "out=r"], "eps"),
    ("pretrain-init-missing", ["pretrain", "init_from=nowhere", "out=r"], "init_from"),
    ("pretrain-init-of-another-arch", ["pretrain", f"init_from={M}", "arch.num_layers=2", "steps=0", "out=r"],
     "init_from"),
    ("pretrain-export-to-a-file", ["pretrain", "out=r", "--export-to", "afile"], "afile"),
    ("cache-pipeline-missing", ["cache", "pipeline=nowhere", "manifest={d}/manifest.csv", "out=c"], "pipeline"),
    ("cache-manifest-missing", ["cache", "pipeline={d}/pipe", "manifest=nowhere.csv", "out=c"], "manifest"),
    ("cache-shard-size", ["cache", "pipeline={d}/pipe", "manifest={d}/manifest.csv", "shard_size=0", "out=c"],
     "shard_size"),
    ("cache-manifest-unreadable", ["cache", "pipeline={d}/pipe", "manifest={d}/garbage.csv", "out=c"], "garbage.csv"),
    ("cache-manifest-columns", ["cache", "pipeline={d}/pipe", "manifest={d}/nocols.csv", "out=c"], "column"),
    ("cache-model-index-json", ["cache", "pipeline={d}/pipe", "manifest={d}/manifest.csv", "out=c"],
     "model_index.json"),
    ("bench-n", ["bench", f"student={M}", "n=0", "out=b"], "'n'"),
    ("bench-repeats", ["bench", f"student={M}", "repeats=0", "out=b"], "repeats"),
    ("bench-student-missing", ["bench", "student=nowhere", "out=b"], "student"),
    ("bench-teacher-missing", ["bench", "teacher=nowhere", f"student={M}", "out=b"], "teacher"),
    ("bench-student-not-few-step", ["bench", f"teacher={M}", f"student={M}", "n=1", "out=b"], "few-step"),
    ("check-steps", ["check", "stage2", "steps=0"], "steps"),
    ("notebooks-parameter-name", ["notebooks", "run", "-p", "nonexistent=1", "--out", "nb"], "nonexistent"),
    ("notebooks-parameter-of-another-notebook",
     ["notebooks", "run", "--only", "01_block_importance", "-p", "alphas=[0.5]", "--out", "nb"], "alphas"),
    ("notebooks-parameter-type", ["notebooks", "run", "-p", "n=abc", "--out", "nb"], "abc"),
    ("notebooks-parameter-value", ["notebooks", "run", "-p", "eval_n=0", "--out", "nb"], "eval_n"),
    ("notebooks-parameter-yaml", ["notebooks", "run", "-p", "sigmas=[0.5,", "--out", "nb"], "sigmas=[0.5,"),
    ("notebooks-parameter-no-value", ["notebooks", "run", "-p", "seed", "--out", "nb"], "seed"),
    ("notebooks-model-missing", ["notebooks", "run", "-p", "model=nowhere", "--out", "nb"], "nowhere"),
    ("notebooks-only", ["notebooks", "run", "--only", "06_nothing", "--out", "nb"], "06_nothing"),
    ("notebooks-profile", ["notebooks", "run", "--profile", "huge", "--out", "nb"], "huge"),
    ("notebooks-out-is-a-file", ["notebooks", "run", "--out", "afile"], "afile"),
]


def _argv(argv, inputs):
    return [a.replace("{d}", str(inputs)) for a in argv]


def _check_one_line(rc, err, word):
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("flg: error: "), err
    assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("argv, word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(argv, word, inputs, repo_clean, tmp_path, monkeypatch, capfd):
    (tmp_path / "afile").write_text("not a folder\n")
    monkeypatch.chdir(tmp_path)
    before, before_inputs = listing(tmp_path), listing(inputs)
    capfd.readouterr()
    rc = main(_argv(argv, inputs))
    _, err = capfd.readouterr()
    _check_one_line(rc, err, word)
    if word == "seeds":
        assert "block" not in err
    assert listing(tmp_path) == before
    assert listing(inputs) == before_inputs


def test_at_least_thirty_distinct_bad_inputs_across_the_commands():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30
    assert {c[1][0] for c in CASES} >= {"blocks", "prune", "sample", "eval", "compare", "stage1", "stage2", "stage3",
                                        "pretrain", "cache", "bench", "notebooks"}


def test_the_installed_command_exits_2_with_one_line(inputs, repo_clean, tmp_path):
    """The real process: its exit status, and nothing else on stderr (warnings, progress bars, usage text)."""
    runs = [["stage1", "n=0", "out=r"], ["blocks", "--model", str(inputs / "trunc")]]
    words = ["'n'", "trunc"]
    procs = [subprocess.Popen([str(FLG), *argv], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for argv in runs]  # together: each start-up imports torch
    for p, word in zip(procs, words):
        _, err = p.communicate(timeout=300)
        _check_one_line(p.returncode, err, word)
    assert listing(tmp_path) == []
