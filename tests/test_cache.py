"""Stage 0 (`flg cache`) on an offline tiny Wan pipeline of the real classes, on generated mp4 files."""
import json

import pytest
import torch

from flgcore import synth
from flgcore.cache import CacheConfig, open_encoder, read_clip, run_cache
from tiny_pipelines import FRAMES, write_tiny_pipeline, write_videos
from flgcore.data import LatentCache
from flgcore.config import FlgError

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_videos(root)
    return root, write_tiny_pipeline(root / "pipe")


def _cfg(root, pipe, **kw):
    base = dict(pipeline=str(pipe), manifest=str(root / "manifest.csv"), out=str(root / "out"), frames=FRAMES,
                height=32, width=32, shard_size=3, max_sequence_length=8)
    return CacheConfig(**{**base, **kw})


def test_cache_writes_shards_skips_broken_videos_and_matches_the_pipeline(world):
    from diffusers import DiffusionPipeline
    root, pipe_dir = world
    info = run_cache(_cfg(root, pipe_dir))
    assert info["clips"] == 5 and info["shards"] == 3 and info["skipped"] == 2
    skipped = [json.loads(l) for l in (root / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {s["video"].rsplit("/", 1)[1] for s in skipped} == {"broken.mp4", "short.mp4"}
    assert any("too short" in s["error"] for s in skipped)

    cache = LatentCache(root / "out")
    assert len(cache) == 5
    x0, cond = cache.items([0, 3])
    assert x0.shape == (2, 4, 3, 4, 4) and cond.image.shape == x0.shape and cond.text.shape == (2, 8, 16)

    # The cached tensors are what the Wan I2V pipeline itself computes for the same clip and caption.
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    x = read_clip(str(root / "v0.mp4"), FRAMES, 1, 32, 32)
    z = pipe.vae.encode(x[None]).latent_dist.mode()
    mean, std = (torch.tensor(pipe.vae.config[k]).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(x0[:1], (z - mean) / std)
    _, condition = pipe.prepare_latents(x[:, 0][None], 1, 4, 32, 32, FRAMES, torch.float32, "cpu")
    torch.testing.assert_close(cond.image[:1], condition[:, pipe.vae_scale_factor_temporal:])
    text = pipe.encode_prompt(synth.clip_spec(10).caption, do_classifier_free_guidance=False, max_sequence_length=8)[0]
    torch.testing.assert_close(cond.text[:1], text)
    assert cache.null["prompt_embeds"].shape == (8, 16)


def test_cache_resumes_without_redoing_finished_shards(world):
    root, pipe_dir = world
    out = root / "out2"
    run_cache(_cfg(root, pipe_dir, out=str(out)))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    (out / "shard_00001.safetensors").unlink()  # as if the run died while writing shard 1
    run_cache(_cfg(root, pipe_dir, out=str(out)))
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    assert set(after) == set(stamps)
    assert after["shard_00000.safetensors"] == stamps["shard_00000.safetensors"]
    assert after["shard_00002.safetensors"] == stamps["shard_00002.safetensors"]


def _train_from_cache(pipe_dir, data, tmp_path):
    """One Stage-II step and two Stage-III iterations reading the cache: the shapes fit every model call."""
    from flgcore.stage2 import Stage2Config, run_stage2
    from flgcore.stage3 import Stage3Config, run_stage3
    run_stage2(Stage2Config(model=str(pipe_dir), data=str(data), out=str(tmp_path / "s2"), drop=[1],
                            steps=1, batch_size=2, warmup=1))
    m = run_stage3(Stage3Config(model=str(tmp_path / "s2" / "model"), data=str(data), out=str(tmp_path / "s3"),
                                steps=2, batch_size=2, fake_updates=2, lora_rank=2, beta1=2.0))
    assert m["steps"] == 2 and (tmp_path / "s3" / "student" / "transformer" / "config.json").is_file()


def test_stage3_trains_from_the_cache(world, tmp_path):
    root, pipe_dir = world
    if not (root / "out").exists():
        run_cache(_cfg(root, pipe_dir))
    _train_from_cache(pipe_dir, root / "out", tmp_path)


def test_the_vae_stays_fp32_when_the_encoders_run_in_bf16(world, tmp_path):
    """dtype=bfloat16 reaches the text encoder; the VAE keeps vae_dtype=float32 (as diffusers loads Wan's), so
    the latents, Stages I-III's targets, are the fp32 VAE's."""
    root, pipe_dir = world
    caches = {}
    for dtype in ("float32", "bfloat16"):
        run_cache(_cfg(root, pipe_dir, out=str(tmp_path / dtype), dtype=dtype))
        caches[dtype] = LatentCache(tmp_path / dtype).items([0, 4])
    (x32, c32), (x16, c16) = caches["float32"], caches["bfloat16"]
    torch.testing.assert_close(x16, x32)
    torch.testing.assert_close(c16.image, c32.image)
    assert not torch.equal(c16.text, c32.text)  # the text encoder did run in bf16
    torch.testing.assert_close(c16.text, c32.text, rtol=0.05, atol=0.05)
    assert open_encoder(_cfg(root, pipe_dir, vae_tiling=True)).pipe.vae.use_tiling
    assert not open_encoder(_cfg(root, pipe_dir)).pipe.vae.use_tiling
    with pytest.raises(FlgError, match="vae_dtype='float17' is not a torch dtype"):
        run_cache(_cfg(root, pipe_dir, out=str(tmp_path / "bad"), vae_dtype="float17"))


def test_cache_refuses_bad_input_by_name(world, tmp_path):
    root, pipe_dir = world
    with pytest.raises(FlgError, match="manifest.* must be an existing file"):
        run_cache(_cfg(root, pipe_dir, manifest=str(tmp_path / "none.csv")))
    with pytest.raises(FlgError, match="model_index.json"):
        run_cache(_cfg(root, tmp_path))
    with pytest.raises(FlgError, match="frames=8"):
        run_cache(CacheConfig(pipeline=str(pipe_dir), manifest=str(root / "manifest.csv"), out=str(tmp_path / "o"),
                              frames=8, height=32, width=32))
    (tmp_path / "m.csv").write_text("path,text\nx.mp4,hi\n")
    with pytest.raises(FlgError, match="missing column"):
        run_cache(_cfg(root, pipe_dir, manifest=str(tmp_path / "m.csv")))


@pytest.mark.parametrize("i2v", [False, True], ids=["hunyuan-t2v", "hunyuan-i2v"])
def test_hunyuanvideo_cache_matches_its_pipeline_and_trains(tmp_path, i2v):
    from diffusers import DiffusionPipeline
    from PIL import Image
    write_videos(tmp_path)
    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", image_conditioned=i2v, family="hunyuan")
    info = run_cache(_cfg(tmp_path, pipe_dir, max_sequence_length=16))
    assert info["clips"] == 5 and info["skipped"] == 2
    cache = LatentCache(tmp_path / "out")
    x0, cond = cache.items([0])
    assert x0.shape == (1, 4, 3, 4, 4) and cond.text_mask.shape == cond.text.shape[:2] and cond.pooled.shape == (1, 8)

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    x = read_clip(str(tmp_path / "v0.mp4"), FRAMES, 1, 32, 32)
    sf = pipe.vae.config.scaling_factor
    torch.testing.assert_close(x0, pipe.vae.encode(x[None]).latent_dist.mode() * sf)
    caption, image = synth.clip_spec(10).caption, Image.fromarray(((x[:, 0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    kw = dict(image=image) if i2v else {}
    e, pooled, mask = pipe.encode_prompt(prompt=[caption], max_sequence_length=16, device="cpu", **kw)
    torch.testing.assert_close(cond.text, e)
    torch.testing.assert_close(cond.text_mask, mask.float())
    torch.testing.assert_close(cond.pooled, pooled)
    null = pipe.encode_prompt(prompt=[""], max_sequence_length=16, device="cpu",
                              **(dict(image=Image.new("RGB", (32, 32), 0)) if i2v else {}))[0]
    torch.testing.assert_close(cache.null["prompt_embeds"][None], null)
    if i2v:  # the pipeline's latent_concat condition: the image latent at frame 0, zeros after
        _, image_latents = pipe.prepare_latents(pipe.video_processor.preprocess(image, 32, 32), 1, 4, 32, 32, FRAMES,
                                                torch.float32, "cpu")
        image_latents[:, :, 1:] = 0
        torch.testing.assert_close(cond.image, image_latents)
    else:
        assert cond.image is None

    _train_from_cache(pipe_dir, tmp_path / "out", tmp_path)


def _wan_latents_both_ways(pipe, pipe_dir, x, cond, cache, noise, cfg=2.5, steps=3):
    """From the same noise: our latents (Euler + CFG through `models.velocity`, on the cached condition of clip x)
    and the Wan pipeline's own, given x's first frame and caption."""
    from flgcore.cache import _first_frame_image
    from flgcore.flow import euler_sample
    from flgcore.models import load_transformer, velocity_cfg
    ref = pipe(image=_first_frame_image(x), prompt=synth.clip_spec(10).caption, negative_prompt="", height=32,
               width=32, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=cfg, latents=noise.clone(),
               max_sequence_length=8, output_type="latent").frames
    model = load_transformer(pipe_dir)
    pipe.scheduler.set_timesteps(steps)
    ours = euler_sample(lambda z, s: velocity_cfg(model, z, s, cond, cache.null_like(cond), cfg), noise,
                        pipe.scheduler.sigmas)
    return ours, ref


def test_wan22_ti2v_cache_and_sampling_match_the_pipeline(tmp_path):
    """Wan 2.2 TI2V (`expand_timesteps`): the cache holds the pipeline's first-frame condition, and our Euler
    sampler with CFG, calling the transformer through `models.velocity`, lands on the pipeline's own latents."""
    from diffusers import WanImageToVideoPipeline
    write_videos(tmp_path)
    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", ti2v=True)
    assert run_cache(_cfg(tmp_path, pipe_dir))["clips"] == 5
    cache = LatentCache(tmp_path / "out")
    x0, cond = cache.items([0])
    assert cond.image.shape == x0.shape and not cond.image[:, :, 1:].any()

    pipe = WanImageToVideoPipeline.from_pretrained(pipe_dir)
    x = read_clip(str(tmp_path / "v0.mp4"), FRAMES, 1, 32, 32)
    _, condition, _ = pipe.prepare_latents(x[:, 0][None], 1, 4, 32, 32, FRAMES, torch.float32, "cpu")
    torch.testing.assert_close(cond.image[:, :, :1], condition)
    # The causal VAE gives the first frame alone the clip's own first latent, so frame 0's losses vanish.
    torch.testing.assert_close(cond.image[:, :, :1], x0[:, :, :1], atol=1e-5, rtol=1e-5)

    ours, ref = _wan_latents_both_ways(pipe, pipe_dir, x, cond, cache,
                                       torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[:, :, :1], cond.image[:, :, :1], atol=1e-5, rtol=1e-5)

    _train_from_cache(pipe_dir, tmp_path / "out", tmp_path)


def test_wan21_i2v_cache_and_sampling_match_the_pipeline(tmp_path):
    """Wan 2.1 I2V: the cache holds the pipeline's condition latents (VAE of [first frame, zeros]) and CLIP image
    tokens, and our Euler sampler with CFG, which builds the 4-channel first-frame mask and concatenates
    [latents, mask, condition] in `models.velocity`, lands on the pipeline's own latents."""
    from diffusers import WanImageToVideoPipeline
    write_videos(tmp_path)
    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", clip=True)
    assert run_cache(_cfg(tmp_path, pipe_dir))["clips"] == 5
    cache = LatentCache(tmp_path / "out")
    x0, cond = cache.items([0])
    assert cond.image_embeds.shape == (1, 17, 8)

    pipe = WanImageToVideoPipeline.from_pretrained(pipe_dir)
    x = read_clip(str(tmp_path / "v0.mp4"), FRAMES, 1, 32, 32)
    _, condition = pipe.prepare_latents(x[:, 0][None], 1, 4, 32, 32, FRAMES, torch.float32, "cpu")
    torch.testing.assert_close(cond.image, condition[:, 4:])  # [mask (4 channels), condition latents]
    ours, ref = _wan_latents_both_ways(pipe, pipe_dir, x, cond, cache,
                                       torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    _train_from_cache(pipe_dir, tmp_path / "out", tmp_path)


def test_hunyuanvideo_token_replace_cache_and_sampling_match_the_pipeline(tmp_path):
    """HunyuanVideo-I2V `token_replace`: the cache holds the pipeline's prompt (every 4th LLaVA image token) and
    first-frame latent, and our Euler sampler through `models.velocity` lands on the pipeline's own latents."""
    from diffusers import HunyuanVideoImageToVideoPipeline
    from PIL import Image
    from flgcore.flow import euler_sample
    from flgcore.models import load_transformer, velocity
    write_videos(tmp_path)
    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", family="hunyuan", token_replace=True)
    assert run_cache(_cfg(tmp_path, pipe_dir, max_sequence_length=16))["clips"] == 5
    cache = LatentCache(tmp_path / "out")
    x0, cond = cache.items([0])

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(pipe_dir)
    x = read_clip(str(tmp_path / "v0.mp4"), FRAMES, 1, 32, 32)
    image = Image.fromarray(((x[:, 0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    caption = synth.clip_spec(10).caption
    e, pooled, mask = pipe.encode_prompt(prompt=[caption], image=image, image_embed_interleave=4,
                                         max_sequence_length=16, device="cpu")
    torch.testing.assert_close(cond.text, e)
    torch.testing.assert_close(cond.pooled, pooled)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    ref = pipe(image=image, prompt=caption, height=32, width=32, num_frames=FRAMES, num_inference_steps=3,
               guidance_scale=cond.guidance, latents=noise.clone(), max_sequence_length=16, output_type="latent").frames
    torch.testing.assert_close(cond.image[:, :, :1], ref[:, :, :1])  # the pipeline keeps frame 0 = its image latent
    assert not cond.image[:, :, 1:].any()
    # The pipeline starts from noise with 0.1 % of the image latent mixed into every frame; so do we here.
    start = 0.999 * noise + 0.001 * cond.image[:, :, :1]
    model = load_transformer(pipe_dir)
    ours = euler_sample(lambda z, s: velocity(model, z, s, cond), start, pipe.scheduler.sigmas)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    _train_from_cache(pipe_dir, tmp_path / "out", tmp_path)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_latent_decoder_undoes_the_cache_normalisation_as_the_pipeline_decodes(tmp_path, family):
    from diffusers import DiffusionPipeline
    from flgcore.cache import latent_decoder
    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", image_conditioned=False, family=family)
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    kw = dict(prompt="a red square moves left", height=32, width=32, num_frames=FRAMES, num_inference_steps=2,
              **({"guidance_scale": 1.0} if family == "wan" else {}))
    latents = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    video = pipe(**kw, output_type="pt", generator=torch.Generator().manual_seed(0)).frames  # [B, F, 3, H, W] in [0, 1]
    ours = latent_decoder(pipe_dir)(latents)  # [B, 3, F, H, W] in [-1, 1]
    torch.testing.assert_close((ours.permute(0, 2, 1, 3, 4) + 1) / 2, video.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.notebooks
def test_every_notebook_runs_on_a_real_checkpoint_from_its_latent_cache(world, tmp_path):
    """The five notebooks on a tiny Wan 2.1 I2V pipeline: Stage II/III from the family's recipe (configs/real/), every
    student scored through the stock pipeline on the cache's own clips (weight-free scores, labelled), the paper's
    numbers beside ours."""
    import pandas as pd
    import yaml
    from flgcore import report
    from flgcore.notebooks import run_label, run_notebooks
    root, pipe_dir = world
    if not (root / "out").exists():
        run_cache(_cfg(root, pipe_dir))
    params = dict(model=str(pipe_dir), data=str(root / "out"), n=2, batch_size=2, sigmas=[0.5], skip=[1],
                  clip_seeds=[0, 1], clip_steps=2, clip_cfg=2.0, eval_n=2, val_n=2, bench_n=1)
    status = run_notebooks("quick", params=params, out=tmp_path)
    assert set(status.values()) == {"ok"}, status
    runs = tmp_path / "quick-pipe"  # its own folder, never the shipped teacher's
    assert run_label("full", str(pipe_dir)) == "full-pipe" and run_label("full", "synth-tiny") == "full"
    nb01 = runs / "01_block_importance"
    assert (nb01 / "figures" / "block_importance.png").is_file() and (nb01 / "skip_explorer.png").is_file()
    assert json.loads((nb01 / "stage1" / "metrics.json").read_text())["blocks"] == 4

    assert report.eval_fields(str(pipe_dir), str(root / "out"), n=None)["n"] == 5  # the whole suite: the cache's clips
    recipe = yaml.safe_load(open(report.recipe_dir(str(pipe_dir)) / "stage2.yaml"))
    assert report.recipe_dir(str(pipe_dir)).name == "wan2.1-i2v-14b"
    s2 = yaml.safe_load((runs / "02_stage2_ablations" / "alpha_1.0" / "config.yaml").read_text())
    assert s2["lr"] == recipe["lr"] and s2["warmup"] == recipe["warmup"] and s2["data"] == str(root / "out")
    assert not s2["zero"] and s2["precision"] == "fp32" and s2["steps"] == 4  # a CPU; the quick profile's length
    alpha = pd.read_csv(runs / "02_stage2_ablations" / "alpha.csv", index_col=0)
    assert list(alpha.index) == ["skip, untrained", "0.0", "1.0"] and alpha.scored_by.str.startswith("weight-free").all()
    assert alpha.average.between(0, 1).all() and "text_alignment" not in alpha
    beside = report.beside_paper(alpha, "table4")
    assert beside.loc["Table 4, WanX-TI2V"].loc["1.0", "vbench_dynamic_degree"] == 0.268
    assert beside.loc["ours"].average.tolist() == alpha.average.tolist()
    ev = runs / "02_stage2_ablations" / "alpha_1.0" / "eval"
    assert len(list((ev / "videos").glob("*.mp4"))) == 2 and (ev / "contact_sheet.png").is_file()
    diagnosis = pd.read_csv(runs / "02_stage2_ablations" / "diagnosis.csv", index_col=0)
    assert diagnosis.loc["frozen, alpha 1", "minus_baseline"] == 0 and diagnosis.ci95_low.notna().all()

    teacher = pd.read_csv(runs / "03_stage3_ablations" / "teacher_and_stage3.csv", index_col=0)
    assert len(teacher) == 3 and teacher.loc["Stage III, pruned teacher", "nfe"] == 4  # the recipe's 4-step student
    s3 = yaml.safe_load((runs / "03_stage3_ablations" / "beta1_2.0" / "config.yaml").read_text())
    recipe3 = yaml.safe_load(open(report.recipe_dir(str(pipe_dir)) / "stage3.yaml"))
    assert s3["fake"] == "lora" and s3["student_steps"] == 4 and s3["lr"] == recipe3["lr"]  # not the testbed's lr
    grid = pd.read_csv(runs / "04_steps_vs_retention" / "grid.csv")
    assert sorted(zip(grid.steps, grid.retention)) == [(1, 0.7), (1, 1.0), (2, 0.7), (2, 1.0)]
    assert (runs / "04_steps_vs_retention" / "figures" / "steps_vs_retention.png").is_file()
    methods = pd.read_csv(runs / "05_method_comparison" / "methods.csv", index_col=0)
    assert list(methods.index) == ["Euler teacher", "DMD2 (steps only)", "pruning only", "FastLightGen"]
    assert (methods.sec_per_clip > 0).all() and methods.loc["FastLightGen", "theoretical_speedup"] > 1

    with pytest.raises(FlgError, match="give -p data=<its latent cache>"):
        run_notebooks("quick", only=["02_stage2_ablations"], params=dict(model=str(pipe_dir)), out=tmp_path)


def test_the_encoder_never_loads_the_transformer(world, tmp_path):
    root, pipe_dir = world
    enc = open_encoder(_cfg(root, pipe_dir, out=str(tmp_path / "o")))
    assert enc.pipe.transformer is None  # a real transformer is tens of GB: the cache needs only its config
