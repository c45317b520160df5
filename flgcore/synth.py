"""SynthMotion: a procedural text+image-to-video world in which the whole pipeline runs on a CPU.

Each clip is a pure function of its seed: one coloured shape (square, circle or triangle) moving in
a straight line at constant speed over a flat background, 8 frames of 32x32 RGB in [-1, 1], with a
caption such as "a red square moves left quickly". Positions are whole pixels and edges are hard,
so SynthBench can analyse a clip exactly. For training, words of the caption are dropped at random
(so the conditional distribution is not a single video and text guidance matters); the first frame
is the image condition (TI2V, as in the paper). The text encoder is a fixed table of word vectors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import Cond
from .config import FlgError

COLORS = {  # RGB in [0, 1]
    "red": (0.90, 0.15, 0.15), "green": (0.20, 0.80, 0.25), "blue": (0.25, 0.40, 0.95),
    "yellow": (0.95, 0.85, 0.20), "magenta": (0.85, 0.25, 0.85), "cyan": (0.20, 0.85, 0.85),
}
BACKGROUNDS = [(0.08, 0.08, 0.10), (0.30, 0.27, 0.24), (0.10, 0.18, 0.26)]
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
SPEEDS = {"slowly": 1, "quickly": 2}  # pixels per frame
FRAMES, SIZE = 8, 32
TRAIN_SEEDS = (0, 1_000_000_000)                 # [lo, hi): training clips
HELDOUT_SEEDS = (2_000_000_000, 2_001_000_000)   # never overlaps TRAIN_SEEDS: evaluation clips
WORD_DROP = 0.25  # probability of dropping each content word of a training caption


@dataclass(frozen=True)
class ClipSpec:
    """Everything the renderer decided for one clip: SynthBench's ground truth."""
    seed: int
    color: str
    shape: str
    direction: str
    speed: str
    background: int
    radius: int
    x0: int
    y0: int
    caption: str        # the full caption
    train_caption: str  # with words dropped (what the training loop sees)

    @property
    def velocity(self) -> tuple[int, int]:
        dx, dy = DIRECTIONS[self.direction]
        return dx * SPEEDS[self.speed], dy * SPEEDS[self.speed]


def clip_spec(seed: int, frames: int = FRAMES, size: int = SIZE) -> ClipSpec:
    """Draw a clip's parameters from its seed (the shape never leaves the frame)."""
    rng = np.random.default_rng(seed)
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    speed = str(rng.choice(list(SPEEDS)))
    background = int(rng.integers(len(BACKGROUNDS)))
    radius = int(rng.integers(3, 6))
    travel = SPEEDS[speed] * (frames - 1)
    dx, dy = DIRECTIONS[direction]

    def start(d):  # keep [start, start + d * travel] inside [radius, size - 1 - radius]
        lo, hi = radius + (travel if d < 0 else 0), size - 1 - radius - (travel if d > 0 else 0)
        return int(rng.integers(lo, hi + 1))
    x0, y0 = start(dx), start(dy)
    words = ["a", color, shape, "moves", direction, speed]
    drop = rng.random(4) < WORD_DROP  # color, shape, direction, speed
    kept = [w for w, d in zip(words, [False, *drop[:2], False, *drop[2:]]) if not d]
    return ClipSpec(seed, color, shape, direction, speed, background, radius, x0, y0,
                    " ".join(words), " ".join(kept))


def shape_mask(shape: str, cx: float, cy: float, radius: int, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred on pixel (cx, cy)."""
    yy, xx = np.mgrid[0:size, 0:size]
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= radius ** 2 + 0.5
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise FlgError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def render(spec: ClipSpec, frames: int = FRAMES, size: int = SIZE, velocity: tuple[int, int] | None = None,
           color: str | None = None, shape: str | None = None, offsets=None) -> np.ndarray:
    """Render a clip as float32 [3, frames, size, size] in [-1, 1].

    The overrides (velocity, colour, shape, per-frame pixel offsets) exist to damage clips in SynthBench's tests.
    """
    vx, vy = velocity if velocity is not None else spec.velocity
    bg = np.array(BACKGROUNDS[spec.background], np.float32)
    fg = np.array(COLORS[color or spec.color], np.float32)
    clip = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        ox, oy = offsets[f] if offsets is not None else (0, 0)
        m = shape_mask(shape or spec.shape, spec.x0 + vx * f + ox, spec.y0 + vy * f + oy, spec.radius, size)
        clip[f] = np.where(m[..., None], fg, bg)
    return clip.transpose(3, 0, 1, 2) * 2 - 1


def clips(seeds, frames: int = FRAMES, size: int = SIZE) -> tuple[torch.Tensor, list[ClipSpec]]:
    """A batch of clips [B, 3, F, H, W] and their specs."""
    specs = [clip_spec(int(s), frames, size) for s in seeds]
    return torch.from_numpy(np.stack([render(sp, frames, size) for sp in specs])), specs


def image_condition(x0: torch.Tensor) -> torch.Tensor:
    """The I2V condition video: the first frame, then zeros (what the model sees beside the mask)."""
    c = torch.zeros_like(x0)
    c[:, :, 0] = x0[:, :, 0]
    return c


# ----------------------------------------------------------------------------- text encoder

VOCAB = ["a", "moves", *COLORS, *SHAPES, *DIRECTIONS, *SPEEDS]


class TextEncoder:
    """Deterministic caption encoder: each word maps to a fixed random vector; padding is zeros.

    The empty caption encodes to all zeros: the null condition for classifier-free guidance.
    """

    def __init__(self, table: torch.Tensor, vocab: list[str], max_len: int = 8):
        self.table, self.vocab, self.max_len = table, list(vocab), max_len
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def create(cls, dim: int = 32, max_len: int = 8, seed: int = 1234) -> TextEncoder:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(len(VOCAB), dim, generator=g), VOCAB, max_len)

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def encode(self, captions: list[str]) -> torch.Tensor:
        """[B, max_len, dim] prompt embeddings."""
        out = torch.zeros(len(captions), self.max_len, self.dim)
        for b, cap in enumerate(captions):
            words = cap.split()
            if len(words) > self.max_len:
                raise FlgError(f"caption {cap!r} has {len(words)} words; at most {self.max_len}")
            for j, w in enumerate(words):
                if w not in self.index:
                    raise FlgError(f"unknown word {w!r} in caption {cap!r}; vocabulary: {' '.join(self.vocab)}")
                out[b, j] = self.table[self.index[w]]
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"table": self.table.contiguous()}, str(path / "embeddings.safetensors"))
        (path / "vocab.json").write_text(json.dumps({"vocab": self.vocab, "max_len": self.max_len}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TextEncoder:
        from safetensors.torch import load_file
        path = Path(path)
        meta = json.loads((path / "vocab.json").read_text())
        return cls(load_file(str(path / "embeddings.safetensors"))["table"], meta["vocab"], meta["max_len"])


def make_cond(encoder: TextEncoder, x0: torch.Tensor, captions: list[str]) -> Cond:
    """The TI2V condition of a batch: caption embeddings + first-frame image condition."""
    return Cond(text=encoder.encode(captions), image=image_condition(x0))


def null_cond(encoder: TextEncoder, cond: Cond) -> Cond:
    """Same image condition, empty caption: the unconditional branch of CFG."""
    return cond.with_text(Cond(text=encoder.encode([""] * cond.text.shape[0])))


def train_batch(encoder: TextEncoder, rng: np.random.Generator, gen: torch.Generator, batch_size: int,
                cond_dropout: float = 0.1) -> tuple[torch.Tensor, Cond]:
    """A training batch (x0 [B, 3, F, H, W], cond): captions with dropped words; `cond_dropout` of the
    samples get the empty caption, so the model keeps the null branch CFG needs."""
    x0, specs = clips(train_seeds(rng, batch_size))
    cond = make_cond(encoder, x0, [s.train_caption for s in specs])
    drop = torch.rand(batch_size, generator=gen) < cond_dropout
    cond.text[drop] = 0.0  # the empty caption encodes to zeros
    return x0, cond


def train_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(*TRAIN_SEEDS, size=n)


def heldout_seeds(n: int, offset: int = 0) -> list[int]:
    if n + offset > HELDOUT_SEEDS[1] - HELDOUT_SEEDS[0]:
        raise FlgError(f"at most {HELDOUT_SEEDS[1] - HELDOUT_SEEDS[0]} held-out seeds")
    return list(range(HELDOUT_SEEDS[0] + offset, HELDOUT_SEEDS[0] + offset + n))
