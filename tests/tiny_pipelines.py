"""Tiny random-init pipelines of the real diffusers classes, written offline: the tests' real checkpoints."""
from pathlib import Path

import numpy as np
import torch

from flgcore import synth
from flgcore.cache import _word_tokenizer
from flgcore.models import tiny_model


FRAMES = 9  # 4k+1 for the Wan VAE


def write_videos(root: Path) -> Path:
    """Five SynthMotion clips as mp4, a broken file and a too-short one, and their manifest (root/manifest.csv)."""
    import imageio.v2 as imageio
    rows = []
    for i, seed in enumerate([10, 11, 12, 13, 14]):
        spec = synth.clip_spec(seed)
        clip = synth.render(spec, frames=FRAMES)  # [3, F, 32, 32] in [-1, 1]
        frames = ((clip.transpose(1, 2, 3, 0) + 1) * 127.5).round().astype(np.uint8)
        imageio.mimwrite(root / f"v{i}.mp4", list(frames), fps=8, macro_block_size=1)
        rows.append((f"v{i}.mp4", spec.caption))
    (root / "broken.mp4").write_bytes(b"not a video at all")
    imageio.mimwrite(root / "short.mp4", list(frames[:3]), fps=8, macro_block_size=1)
    rows[2:2] = [("broken.mp4", "a red square moves left"), ("short.mp4", "a blue circle moves up")]
    (root / "manifest.csv").write_text("video,caption\n" + "".join(f"{v},{c}\n" for v, c in rows))
    return root / "manifest.csv"


def write_tiny_world(root: Path) -> tuple[Path, Path]:
    """A tiny Wan 2.1 I2V pipeline and a latent cache of five 9-frame 32 x 32 clips made with it: (pipeline, cache)."""
    from flgcore.cache import CacheConfig, run_cache
    root.mkdir(parents=True, exist_ok=True)
    manifest = write_videos(root)
    pipe = write_tiny_pipeline(root / "pipe")
    run_cache(CacheConfig(pipeline=str(pipe), manifest=str(manifest), out=str(root / "cache"), frames=FRAMES, height=32,
                          width=32, shard_size=3, max_sequence_length=8))
    return pipe, root / "cache"


def write_tiny_pipeline(out: str | Path, image_conditioned: bool = True, seed: int = 0, family: str = "wan",
                        ti2v: bool = False, token_replace: bool = False, clip: bool = False) -> Path:
    """Save a tiny random-init pipeline of the real classes, for tests and dry runs. Wan: AutoencoderKLWan, a
    UMT5 encoder (and with `clip`, Wan 2.1 I2V's CLIP image encoder, whose tokens the transformer's
    cross-attention also reads); HunyuanVideo: AutoencoderKLHunyuanVideo, a Llama (T2V) or LLaVA (I2V, seeing 576 image
    tokens as the real one) encoder and a CLIP text encoder; word-level tokenizers built offline, the
    transformer from `models.TINY`, the flow-matching scheduler."""
    if family == "hunyuan":
        return _write_tiny_hunyuan(out, image_conditioned, seed, token_replace)
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    tokenizer, vocab = _word_tokenizer(set(synth.VOCAB), ["<pad>", "<unk>", "</s>"])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.2, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 1.0]).eval()
    extra = dict(expand_timesteps=True) if ti2v else {}
    if clip:  # 32 px in 8-px patches: 17 tokens of width 8
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
        extra.update(image_encoder=CLIPVisionModel(CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)).eval(), image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    transformer = tiny_model("wan-ti2v" if ti2v else "wan-i2v" if image_conditioned else "wan-t2v", seed,
                             **(dict(image_dim=8, added_kv_proj_dim=24) if clip else {}))
    cls = WanImageToVideoPipeline if image_conditioned or ti2v else WanPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **extra)
    pipe.save_pretrained(out)
    return Path(out)


def _write_tiny_hunyuan(out: str | Path, image_conditioned: bool, seed: int, token_replace: bool = False) -> Path:
    import re
    import diffusers
    from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video as t2v, pipeline_hunyuan_video_image2video as i2v
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, LlamaConfig,
                              LlamaModel, LlavaConfig, LlavaForConditionalGeneration)
    torch.manual_seed(seed)
    special = ["<pad>", "<unk>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<image>"]
    words = set(synth.VOCAB)
    for m in (t2v, i2v):  # the pipelines' prompt templates, so that their crops land where they expect
        words |= set(re.findall(r"\w+|[^\w\s]+|\n+", m.DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", " ")))
    tokenizer, vocab = _word_tokenizer(words, special, bos="<|begin_of_text|>")
    llama = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    if image_conditioned:  # CLIP-L/14 at 336 px: 576 image tokens, as the template's image_emb_len says
        text_encoder = LlavaForConditionalGeneration(LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=336, patch_size=14, projection_dim=8),
            text_config=llama, image_token_index=vocab["<image>"], pad_token_id=0)).eval()
        extra = dict(image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}))
    else:
        text_encoder, extra = LlamaModel(llama).eval(), {}
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0,
                                        bos_token_id=vocab["<|begin_of_text|>"], eos_token_id=vocab["<|eot_id|>"])).eval()
    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                              norm_num_groups=4).eval()
    cls = diffusers.HunyuanVideoImageToVideoPipeline if image_conditioned else diffusers.HunyuanVideoPipeline
    pipe = cls(text_encoder=text_encoder, tokenizer=tokenizer, transformer=tiny_model(
                   "hunyuan-i2v-tr" if token_replace else "hunyuan-i2v" if image_conditioned else "hunyuan", seed),
               vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
               tokenizer_2=tokenizer, **extra)
    pipe.save_pretrained(out)
    return Path(out)
