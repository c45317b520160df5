"""Prompt suites for sampling real pipelines: which prompts (and conditioning images) a model is evaluated on.

A suite is read from one of three sources, always into the same list of `SuiteItem`s:

- a CSV with a `prompt` column and, for an image-conditioned model, an `image` column (paths relative to
  the CSV's folder; an image may also be a video, whose first frame is then the image);
- VBench's own info JSON: a list of {prompt_en, dimension[, image_name]} dicts. VBench-I2V's
  `vbench2_beta_i2v/vbench2_i2v_full_info.json` names each image by `image_name`, which its loader reads
  from `vbench2_beta_i2v/data/crop/<ratio>/` (ratios 1-1, 8-5, 7-4, 16-9; 1-1 is its default): so the
  image folder defaults to `data/crop/1-1` beside the JSON, and `images` may name another folder or just a
  ratio ("16-9": pick the one nearest the video's aspect). VBench's T2V `VBench_full_info.json` has no images.
  Every entry is an item (VBench-I2V's 1118 include 763 camera-motion prompts);
- `cache:<folder>`: a latent cache made by `flg cache`: its clips in cache order (shards sorted, rows in
  order), each with its manifest caption and, for an image-conditioned model, the clip's video as the image
  (its first frame). Use a cache of held-out videos that the training cache did not contain, or the scores
  measure memorisation.

VBench names a video `<prompt>-<i>.mp4`, so a prompt may not contain '/' and must fit a file name.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .config import FlgError, read_json_file

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif")
MAX_PROMPT_BYTES = 240  # a file name holds 255 bytes; VBench's "-<i>.mp4" and a margin take the rest
VBENCH_I2V_RATIOS = ("1-1", "8-5", "7-4", "16-9")


@dataclass(frozen=True)
class SuiteItem:
    index: int          # row number in the suite, 0-based: the stable id that pairs two evaluations' videos
    prompt: str
    image: Path | None  # conditioning image (absolute), or a video whose first frame is the image; None for T2V


def _check_prompt(prompt: str, where: str) -> str:
    if not prompt.strip():
        raise FlgError(f"{where}: empty prompt")
    if "/" in prompt:
        raise FlgError(f"{where}: prompt {prompt!r} contains '/' (VBench names files <prompt>-<i>.mp4)")
    if len(prompt.encode()) > MAX_PROMPT_BYTES:
        raise FlgError(f"{where}: prompt is {len(prompt.encode())} bytes, over {MAX_PROMPT_BYTES} "
                       f"(VBench names files <prompt>-<i>.mp4): {prompt[:40]!r}...")
    return prompt


def _check_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise FlgError(f"{where}: image file not found: {path}")
    return path.resolve()


def _read_csv(path: Path, image_conditioned: bool) -> list[SuiteItem]:
    if not path.is_file():
        raise FlgError(f"suite {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # the csv module: strict quoting, no silent index
            rows = list(csv.reader(f, strict=True))
    except (csv.Error, UnicodeDecodeError) as e:
        raise FlgError(f"suite {path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        raise FlgError(f"suite {path}: empty file")
    header, rows = [c.strip() for c in rows[0]], rows[1:]
    for col in header:
        if col not in ("prompt", "image"):
            raise FlgError(f"suite {path}: unknown column {col!r}; a suite CSV has prompt[,image]")
    if "prompt" not in header or len(set(header)) != len(header):
        raise FlgError(f"suite {path}: header {','.join(header)!r}; a suite CSV has prompt[,image]")
    if image_conditioned and "image" not in header:
        raise FlgError(f"suite {path}: the model needs an image per prompt, but the suite has no 'image' column "
                       "(a text-to-video suite for an image-to-video model)")
    if not image_conditioned and "image" in header:
        raise FlgError(f"suite {path}: the model is text-only, but the suite has an 'image' column")
    if not rows:
        raise FlgError(f"suite {path}: no rows")
    items = []
    for i, fields in enumerate(rows):
        where = f"suite {path} row {i}"
        if len(fields) != len(header):
            raise FlgError(f"{where}: {len(fields)} fields, but the header has {len(header)}")
        row = dict(zip(header, fields))
        image = None
        if image_conditioned:
            if not row["image"].strip():
                raise FlgError(f"{where}: empty image")
            image = _check_image(path.parent / row["image"], where)
        items.append(SuiteItem(i, _check_prompt(row["prompt"], where), image))
    return items


def _read_vbench_json(path: Path, image_conditioned: bool, images: str | None) -> list[SuiteItem]:
    info = read_json_file(path, "suite")
    if not isinstance(info, list) or not all(isinstance(d, dict) and "prompt_en" in d for d in info):
        raise FlgError(f"suite {path}: not a VBench info file (a list of {{prompt_en, dimension, ...}} dicts)")
    if not info:
        raise FlgError(f"suite {path}: no rows")
    has_images = all("image_name" in d for d in info)
    if image_conditioned and not has_images:
        raise FlgError(f"suite {path}: the model needs an image per prompt, but the entries have no 'image_name' "
                       "(a text-to-video suite for an image-to-video model)")
    if not image_conditioned and any("image_name" in d for d in info):
        raise FlgError(f"suite {path}: the model is text-only, but the suite names images (VBench-I2V's suite)")
    if not image_conditioned and images is not None:
        raise FlgError(f"suite {path}: images={images!r} given for a text-only model")
    folder = None
    if image_conditioned:  # VBench-I2V reads vbench2_beta_i2v/data/crop/<ratio>/<image_name>, ratio 1-1 by default
        if images is None or images in VBENCH_I2V_RATIOS:
            folder = path.parent / "data" / "crop" / (images or "1-1")
        else:
            folder = Path(images)
        if not folder.is_dir():
            raise FlgError(f"suite {path}: image folder not found: {folder} (VBench-I2V's images are in "
                           f"data/crop/<ratio> beside its JSON; pass images=<folder> or one of {', '.join(VBENCH_I2V_RATIOS)})")
    items = []
    for i, d in enumerate(info):
        where = f"suite {path} entry {i}"
        image = _check_image(folder / d["image_name"], where) if folder is not None else None
        items.append(SuiteItem(i, _check_prompt(str(d["prompt_en"]), where), image))
    return items


def _read_cache(folder: Path, image_conditioned: bool) -> list[SuiteItem]:
    from safetensors import safe_open
    from .cache import read_manifest
    info_path = folder / "cache.json"
    if not info_path.is_file():
        raise FlgError(f"suite cache:{folder}: no cache.json (not a folder made by flg cache)")
    manifest = json.loads(info_path.read_text()).get("manifest")
    if not manifest:
        raise FlgError(f"suite cache:{folder}: cache.json records no manifest")
    captions = {r["video"]: r["caption"] for r in read_manifest(manifest)}
    shards = sorted(p for p in folder.glob("*.safetensors") if p.name != "null.safetensors")  # LatentCache's order
    if not shards:
        raise FlgError(f"suite cache:{folder}: no shards")
    items = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            videos = (f.metadata() or {}).get("videos")
        if videos is None:
            raise FlgError(f"suite cache:{folder}: {shard.name} records no video paths (not written by flg cache)")
        for video in json.loads(videos):
            where = f"suite cache:{folder} clip {len(items)}"
            if video not in captions:
                raise FlgError(f"{where}: video {video} is not in the manifest {manifest}")
            if not Path(video).is_file():
                raise FlgError(f"{where}: video file not found: {video}")
            items.append(SuiteItem(len(items), _check_prompt(captions[video], where),
                                   Path(video) if image_conditioned else None))
    return items


def read_suite(spec: str, image_conditioned: bool, images: str | None = None) -> list[SuiteItem]:
    """The items of a suite: `spec` is a CSV (prompt[,image]), a VBench info JSON (with `images`, VBench-I2V's
    image folder or crop ratio) or `cache:<folder>` (see the module docstring). Every bad input is one FlgError."""
    if spec.startswith("cache:"):
        if images is not None:
            raise FlgError(f"suite {spec}: images={images!r} is only for a VBench JSON suite")
        folder = Path(spec[len("cache:"):])
        if not folder.is_dir():
            raise FlgError(f"suite {spec}: no such folder")
        return _read_cache(folder, image_conditioned)
    path = Path(spec)
    if path.suffix.lower() == ".json":
        return _read_vbench_json(path, image_conditioned, images)
    if images is not None:
        raise FlgError(f"suite {spec}: images={images!r} is only for a VBench JSON suite (a CSV names its images)")
    if path.suffix.lower() != ".csv":
        raise FlgError(f"suite {spec}: expected a .csv, a VBench .json or cache:<folder>")
    return _read_csv(path, image_conditioned)


def load_image(item: SuiteItem, height: int, width: int):
    """The conditioning image of `item` as an RGB PIL image of size (width, height): for a video file its first
    frame. Centre-cropped to the target aspect (as `flg cache` crops clips), then resized with Lanczos, the
    resampling of the pipelines' `video_processor`, which then leaves it unchanged (it is already the size)."""
    from PIL import Image
    if item.image is None:
        raise FlgError(f"suite item {item.index}: no image (a text-to-video item)")
    if height < 1 or width < 1:
        raise FlgError(f"load_image: bad size {height}x{width}")
    path = Path(item.image)
    try:
        if path.suffix.lower() in VIDEO_SUFFIXES[:3]:
            import imageio.v2 as imageio
            with imageio.get_reader(path, "ffmpeg") as reader:
                im = Image.fromarray(reader.get_data(0))
        else:
            im = Image.open(path)
            im.seek(0)  # a GIF's first frame
            im.load()
    except Exception as e:  # PIL/imageio raise many types for a broken file
        raise FlgError(f"suite item {item.index}: cannot read {path} ({type(e).__name__})") from None
    im = im.convert("RGB")
    w, h = im.size
    scale = min(w / width, h / height)
    cw, ch = round(width * scale), round(height * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch)).resize((width, height), Image.LANCZOS)

