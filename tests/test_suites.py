"""Prompt suites: CSV, VBench's own info JSON (VBench-I2V's format and image layout), a latent cache; load_image."""
import json

import numpy as np
import pytest
from PIL import Image

from flgcore.config import FlgError
from flgcore.suites import SuiteItem, load_image, read_suite


def _png(path, color=(200, 30, 30), size=(48, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _mp4(path, n=3, size=32):
    """A short mp4 whose frame t is flat grey 60 * (t + 1): frame 0 is told apart from the rest."""
    import imageio.v2 as imageio
    frames = [np.full((size, size, 3), 60 * (t + 1), np.uint8) for t in range(n)]
    imageio.mimwrite(path, frames, fps=8, macro_block_size=1)
    return path


def test_csv_suites_for_text_and_image_models(tmp_path):
    (tmp_path / "t2v.csv").write_text("prompt\na cat runs\n\"a dog, jumping\"\n")
    items = read_suite(str(tmp_path / "t2v.csv"), image_conditioned=False)
    assert items == [SuiteItem(0, "a cat runs", None), SuiteItem(1, "a dog, jumping", None)]

    _png(tmp_path / "imgs" / "cat.png")
    _mp4(tmp_path / "imgs" / "dog.mp4")
    (tmp_path / "i2v.csv").write_text("prompt,image\na cat runs,imgs/cat.png\na dog jumps,imgs/dog.mp4\n")
    items = read_suite(str(tmp_path / "i2v.csv"), image_conditioned=True)
    assert [it.image for it in items] == [(tmp_path / "imgs" / "cat.png").resolve(), (tmp_path / "imgs" / "dog.mp4").resolve()]
    assert all(it.image.is_absolute() for it in items)


@pytest.mark.parametrize("text, i2v, words", [
    ("prompt,seed\na cat,1\n", False, "unknown column 'seed'; a suite CSV has prompt[,image]"),
    ("prompt\na cat\n", True, "needs an image per prompt"),
    ("prompt,image\na cat,cat.png\n", False, "text-only, but the suite has an 'image' column"),
    ("", False, "empty file"),
    ("prompt\n", False, "no rows"),
    ("prompt\na cat\n\"\"\n", False, "row 1: empty prompt"),
    ("prompt,image\na cat,missing.png\n", True, "row 0: image file not found: "),
    ("prompt\na cat/dog\n", False, "row 0: prompt 'a cat/dog' contains '/'"),
    ("prompt\n" + "a" * 300 + "\n", False, "row 0: prompt is 300 bytes"),
    ("prompt\n\"a cat\n", False, "cannot be read as CSV"),
    ("prompt\na,cat\n", False, "row 0: 2 fields, but the header has 1"),
])
def test_bad_csv_suites_are_one_line_errors(tmp_path, text, i2v, words):
    (tmp_path / "s.csv").write_text(text)
    with pytest.raises(FlgError) as e:
        read_suite(str(tmp_path / "s.csv"), image_conditioned=i2v)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unreadable_and_unknown_suite_files(tmp_path):
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81prompt")
    for spec, words in [(str(tmp_path / "bin.csv"), "cannot be read as CSV"), (str(tmp_path / "none.csv"), "no such file"),
                        (str(tmp_path / "s.txt"), "expected a .csv"), (f"cache:{tmp_path}/none", "no such folder")]:
        with pytest.raises(FlgError, match=words):
            read_suite(spec, image_conditioned=False)


def _vbench_i2v(root):
    """VBench-I2V's layout in miniature: vbench2_beta_i2v/vbench2_i2v_full_info.json, entries as VBench writes
    them ({prompt_en, dimension, image_type, image_name}), images in data/crop/<ratio>/."""
    d = root / "vbench2_beta_i2v"
    info = [
        {"prompt_en": "a close up of a blue and orange liquid", "dimension": ["i2v_background", "aesthetic_quality"],
         "image_type": "abstract", "image_name": "a close up of a blue and orange liquid.jpg"},
        {"prompt_en": "a close up of a blue and orange liquid, camera pans left", "dimension": ["camera_motion"],
         "image_type": "abstract", "image_name": "a close up of a blue and orange liquid.jpg"},
        {"prompt_en": "a cat sitting on a sofa", "dimension": ["i2v_subject", "dynamic_degree"],
         "image_type": "animal", "image_name": "a cat sitting on a sofa.jpg"},
    ]
    d.mkdir(parents=True)
    (d / "vbench2_i2v_full_info.json").write_text(json.dumps(info, indent=4))
    for ratio, color in [("1-1", (255, 0, 0)), ("16-9", (0, 0, 255))]:
        for e in info[::2]:
            _png(d / "data" / "crop" / ratio / e["image_name"], color)
    return d / "vbench2_i2v_full_info.json"


def test_vbench_i2v_info_json_and_its_image_folders(tmp_path):
    path = _vbench_i2v(tmp_path)
    items = read_suite(str(path), image_conditioned=True)
    assert [it.index for it in items] == [0, 1, 2] and items[1].prompt.endswith("camera pans left")
    assert items[0].image == items[1].image == (path.parent / "data/crop/1-1/a close up of a blue and orange liquid.jpg").resolve()
    wide = read_suite(str(path), image_conditioned=True, images="16-9")
    assert wide[2].image.parent.name == "16-9"
    assert read_suite(str(path), True, images=str(path.parent / "data/crop/16-9")) == wide
    r, _, b = load_image(wide[2], 9, 16).getpixel((8, 4))
    assert b > 240 and r < 15  # the 16-9 folder's blue image (a JPEG: not exactly 255)
    (path.parent / "data/crop/16-9" / "a cat sitting on a sofa.jpg").unlink()
    with pytest.raises(FlgError, match="entry 2: image file not found: .*a cat sitting on a sofa.jpg"):
        read_suite(str(path), True, images="16-9")
    with pytest.raises(FlgError, match="image folder not found"):
        read_suite(str(path), True, images="4-3")
    with pytest.raises(FlgError, match="text-only, but the suite names images"):
        read_suite(str(path), image_conditioned=False)


def test_vbench_t2v_info_json(tmp_path):
    info = [{"prompt_en": "In a still frame, a stop sign", "dimension": ["temporal_flickering"]},
            {"prompt_en": "a person swimming", "dimension": ["human_action"], "auxiliary_info": {"human_action": {}}}]
    (tmp_path / "VBench_full_info.json").write_text(json.dumps(info))
    items = read_suite(str(tmp_path / "VBench_full_info.json"), image_conditioned=False)
    assert [it.prompt for it in items] == ["In a still frame, a stop sign", "a person swimming"] and items[0].image is None
    with pytest.raises(FlgError, match="needs an image per prompt"):
        read_suite(str(tmp_path / "VBench_full_info.json"), image_conditioned=True)
    (tmp_path / "bad.json").write_text(json.dumps({"prompt_en": "x"}))
    with pytest.raises(FlgError, match="not a VBench info file"):
        read_suite(str(tmp_path / "bad.json"), image_conditioned=False)


def _cache(root):
    """A latent cache as `flg cache` leaves it (cache.json naming the manifest; shards whose metadata `videos`
    lists their clips' videos in order), with dummy tensors: reading a suite never opens them."""
    import torch
    from safetensors.torch import save_file
    vids = [_mp4(root / f"v{i}.mp4") for i in range(3)]
    (root / "manifest.csv").write_text("video,caption\n" + "".join(f"v{i}.mp4,clip number {i}\n" for i in range(3)))
    out = root / "cache"
    out.mkdir()
    for k, shard in enumerate([vids[:2], vids[2:]]):
        meta = {"clips": str(len(shard)), "videos": json.dumps([str(v.resolve()) for v in shard])}
        save_file({"latents": torch.zeros(len(shard), 1)}, str(out / f"shard_{k:05d}.safetensors"), metadata=meta)
    save_file({"prompt_embeds": torch.zeros(1)}, str(out / "null.safetensors"))
    (out / "cache.json").write_text(json.dumps(dict(clips=3, manifest=str((root / "manifest.csv").resolve()))))
    return out, vids


def test_cache_suite_is_the_clips_in_cache_order(tmp_path):
    out, vids = _cache(tmp_path)
    items = read_suite(f"cache:{out}", image_conditioned=True)
    assert [(it.index, it.prompt, it.image) for it in items] == [(i, f"clip number {i}", v.resolve()) for i, v in enumerate(vids)]
    assert [it.image for it in read_suite(f"cache:{out}", image_conditioned=False)] == [None] * 3
    first = np.asarray(load_image(items[0], 16, 16))
    assert first.shape == (16, 16, 3) and abs(first.mean() - 60) < 8  # frame 0 (grey 60), not frame 1 (120)

    vids[2].unlink()
    with pytest.raises(FlgError, match="clip 2: video file not found: .*v2.mp4"):
        read_suite(f"cache:{out}", image_conditioned=True)
    (tmp_path / "manifest.csv").write_text("video,caption\nv0.mp4,clip number 0\n")
    with pytest.raises(FlgError, match="clip 1: video .*v1.mp4 is not in the manifest"):
        read_suite(f"cache:{out}", image_conditioned=True)
    (tmp_path / "manifest.csv").unlink()
    with pytest.raises(FlgError, match="manifest not found"):
        read_suite(f"cache:{out}", image_conditioned=True)
    with pytest.raises(FlgError, match="images='16-9' is only for a VBench JSON suite"):
        read_suite(f"cache:{out}", True, images="16-9")


def test_load_image_first_frames_crop_and_size(tmp_path):
    im = np.zeros((32, 96, 3), np.uint8)
    im[:, :32, 0] = 255; im[:, 32:64, 1] = 255; im[:, 64:, 2] = 255  # red | green | blue
    Image.fromarray(im).save(tmp_path / "wide.png")
    out = load_image(SuiteItem(0, "p", tmp_path / "wide.png"), 24, 24)
    assert out.mode == "RGB" and out.size == (24, 24)
    assert np.asarray(out)[:, 4:20, 1].min() > 200  # centre-cropped to the square: the green third, not squeezed
    frames = [Image.new("RGB", (20, 10), c) for c in [(10, 200, 10), (200, 10, 10)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(SuiteItem(0, "p", tmp_path / "anim.gif"), 10, 20).getpixel((5, 5))[1] > 150  # the first frame
    with pytest.raises(FlgError, match="item 3: no image"):
        load_image(SuiteItem(3, "p", None), 8, 8)
    (tmp_path / "broken.png").write_bytes(b"no image")
    with pytest.raises(FlgError, match="cannot read .*broken.png"):
        load_image(SuiteItem(0, "p", tmp_path / "broken.png"), 8, 8)
