"""SynthBench's validation: real clips score ~1, noise scores low, and each damage lowers its own dimension."""
import numpy as np
import pytest
from scipy import ndimage

from flgcore import synth
from flgcore import synthbench as sb

SEEDS = synth.heldout_seeds(24)
SPECS = [synth.clip_spec(s) for s in SEEDS]
REAL = np.stack([synth.render(s) for s in SPECS])
MARGIN, CLOSE = 0.3, 0.15  # a damage lowers its dimension by > MARGIN; the others move by < CLOSE


@pytest.fixture(scope="module")
def real_scores():
    return sb.evaluate(REAL, SPECS)[0]


def test_real_clips_score_near_one(real_scores):
    for k in (*sb.DIMENSIONS, "average"):
        assert real_scores[k] >= 0.9, k
    assert real_scores["frechet_distance"] < 1e-6


def test_noise_scores_low():
    noise = np.random.default_rng(0).standard_normal(REAL.shape).clip(-1, 1)
    agg = sb.evaluate(noise, SPECS)[0]
    for k in (*sb.DIMENSIONS, "average"):
        assert agg[k] < 0.2, k
    assert agg["frechet_distance"] > 10


def _other(options, value):
    return [o for o in options if o != value][0]


def _half(a, b):
    out = a.copy()
    out[:, 4:] = b[:, 4:]
    return out


def _reversible(spec):
    vx, vy = spec.velocity
    ex, ey = spec.x0 - 7 * vx, spec.y0 - 7 * vy
    return spec.radius <= ex <= 31 - spec.radius and spec.radius <= ey <= 31 - spec.radius


rng = np.random.default_rng(1)
DAMAGES = {  # name -> (dimension it must lower, other dimensions it may also lower by definition, damage)
    "blur": ("imaging_quality", (), lambda sp, c: ndimage.gaussian_filter(c, sigma=(0, 0, 1, 1))),
    "frozen": ("dynamic_degree", ("text_alignment",), lambda sp, c: np.repeat(c[:, :1], c.shape[1], axis=1)),
    "jitter": ("motion_smoothness", (), lambda sp, c: synth.render(
        sp, offsets=[(0, 0)] + [tuple(rng.choice([-1, 1], 2)) for _ in range(7)])),
    "colour change": ("subject_consistency", (), lambda sp, c: _half(c, synth.render(sp, color=_other(synth.COLORS, sp.color)))),
    "shape change": ("subject_consistency", (), lambda sp, c: _half(c, synth.render(sp, shape=_other(synth.SHAPES, sp.shape)))),
    "reversed direction": ("text_alignment", (), lambda sp, c: synth.render(sp, velocity=tuple(-v for v in sp.velocity))),
    "flicker": ("temporal_flickering", (), lambda sp, c: np.clip(c + 0.08 * (np.arange(c.shape[1]) % 2)[None, :, None, None], -1, 1)),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_each_damage_lowers_its_own_dimension(name):
    dim, also, damage = DAMAGES[name]
    specs = [s for s in SPECS if _reversible(s)] if name == "reversed direction" else SPECS
    real = np.stack([synth.render(s) for s in specs])
    base = sb.evaluate(real, specs)[0]
    hurt = sb.evaluate(np.stack([damage(s, c) for s, c in zip(specs, real)]), specs)[0]
    assert base[dim] - hurt[dim] > MARGIN, (dim, base[dim], hurt[dim])
    for k in sb.DIMENSIONS:
        if k != dim and k not in also:
            assert abs(base[k] - hurt[k]) < CLOSE, (name, k, base[k], hurt[k])


def test_wrong_first_frame_lowers_i2v_subject(real_scores):
    wrong = [synth.render(synth.clip_spec(s + 7), frames=1)[:, 0] for s in SEEDS]
    hurt = sb.evaluate(REAL, SPECS, cond_images=wrong)[0]
    assert real_scores["i2v_subject"] - hurt["i2v_subject"] > MARGIN
    for k in sb.DIMENSIONS:
        if k != "i2v_subject":
            assert abs(real_scores[k] - hurt[k]) < CLOSE, k


def test_scores_are_in_unit_interval():
    clips = np.concatenate([REAL[:4], np.random.default_rng(2).uniform(-1, 1, REAL[:4].shape)])
    _, rows = sb.evaluate(clips, SPECS[:8])
    for r in rows:
        for k in (*sb.DIMENSIONS, "average"):
            assert 0.0 <= r[k] <= 1.0


def test_synthmotion_is_a_pure_function_of_the_seed():
    a, b = synth.clip_spec(123), synth.clip_spec(123)
    assert a == b and np.array_equal(synth.render(a), synth.render(b))
    assert synth.TRAIN_SEEDS[1] <= synth.HELDOUT_SEEDS[0]
    assert all(synth.HELDOUT_SEEDS[0] <= s < synth.HELDOUT_SEEDS[1] for s in synth.heldout_seeds(10))
    x = synth.render(a)
    assert x.shape == (3, 8, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_captions_and_text_encoder():
    specs = [synth.clip_spec(s) for s in range(400)]
    assert all(s.caption == f"a {s.color} {s.shape} moves {s.direction} {s.speed}" for s in specs)
    dropped = sum(s.train_caption != s.caption for s in specs) / len(specs)
    assert 0.4 < dropped < 0.9  # 1 - 0.75^4 = 0.68 of captions lose a word
    enc = synth.TextEncoder.create()
    e = enc.encode(["a red square moves left quickly", ""])
    assert e.shape == (2, 8, 32) and e[1].abs().sum() == 0 and e[0, :6].abs().sum(-1).min() > 0
    with pytest.raises(synth.FlgError, match="unknown word 'purple'"):
        enc.encode(["a purple square"])


def _clip_table(seeds, rng, shift=0.0):
    import pandas as pd
    df = pd.DataFrame({d: rng.uniform(0.2, 0.8, len(seeds)) for d in sb.DIMENSIONS}, index=seeds)
    df["text_alignment"] += shift
    df["average"] = df[list(sb.DIMENSIONS)].mean(axis=1)
    return df.rename_axis("seed").reset_index()


def test_paired_difference_of_two_evaluations():
    from flgcore.evaluate import paired_difference
    from flgcore.config import FlgError
    rng = np.random.default_rng(0)
    a = _clip_table(range(200), rng)
    b = a.copy()
    b[[*sb.DIMENSIONS, "average"]] += rng.normal(0, 0.05, (200, len(sb.DIMENSIONS) + 1))
    b["text_alignment"] -= 0.1  # b is worse on one dimension only, by 0.1 on every seed
    b["average"] = b[list(sb.DIMENSIONS)].mean(axis=1)
    t = paired_difference(a.sample(frac=1, random_state=1), b, n_boot=2000)  # row order does not matter
    d = (a.set_index("seed") - b.set_index("seed")).mean()
    assert np.allclose(t["a - b"], d[t.index])
    assert (t.ci95_low <= t["a - b"]).all() and (t["a - b"] <= t.ci95_high).all()
    # the paired interval is about +-1.96 sd/sqrt(n) of the per-seed differences (sd 0.05 here), far tighter
    # than the spread of either model's scores (uniform, sd 0.17)
    width = (t.ci95_high - t.ci95_low)["imaging_quality"]
    assert 0.7 * 2 * 1.96 * 0.05 / np.sqrt(200) < width < 1.3 * 2 * 1.96 * 0.05 / np.sqrt(200)
    assert t.loc["text_alignment", "ci95_low"] > 0.08 and t.loc["text_alignment", "share_a_better"] == 1.0
    assert abs(t.loc["imaging_quality", "share_a_better"] - 0.5) < 0.45
    same = paired_difference(a, a, n_boot=100)
    assert (same["a - b"] == 0).all() and (same.ci95_low == 0).all() and (same.ci95_high == 0).all()
    with pytest.raises(FlgError, match="different seeds"):
        paired_difference(a, b.iloc[:100])
