import numpy as np
import pytest
from PIL import Image

from engine.data.shapes import ALL_PAIRS, HELD_OUT, render_object
from engine.eval.prompt_accuracy import evaluate_prompts, fit_label, save_prompt_grid


class _FakeClassifier:
    def predict(self, images):
        return [im.info.get("shape", "circle") for im in images]


def _renderer(wrong_colour_for_heldout: bool):
    def generate(prompts, cfg_scale):
        out = []
        for p in prompts:
            _, colour, shape = p.split()
            if wrong_colour_for_heldout and (colour, shape) in HELD_OUT:
                colour = "purple" if colour != "purple" else "red"
            img = render_object(colour, shape, 32, rng=np.random.default_rng(0))
            img.info["shape"] = shape
            out.append(img)
        return out
    return generate


def test_perfect_generator_scores_one(tmp_path):
    r = evaluate_prompts(_renderer(False), _FakeClassifier(), cfg_scales=(1.0, 3.0),
                         samples_per_pair=1, grid_dir=tmp_path)
    for key in ("cfg_1", "cfg_3"):
        assert r[key]["colour"] == 1.0 and r[key]["colour_shape_heldout"] == 1.0
    assert (tmp_path / "grid_cfg3.png").exists()


def test_heldout_failures_show_up_only_in_heldout_scores():
    r = evaluate_prompts(_renderer(True), _FakeClassifier(), cfg_scales=(2.0,),
                         samples_per_pair=2)["cfg_2"]
    assert r["colour_heldout"] == 0.0 and r["colour_shape_heldout"] == 0.0
    assert r["colour"] == pytest.approx(1 - len(HELD_OUT) / len(ALL_PAIRS), abs=1e-3)


def test_grid_is_a_readable_png(tmp_path):
    imgs = [render_object("red", "circle", 32, "center", "big")] * 3
    path = save_prompt_grid(imgs, ["a red circle"] * 3, tmp_path / "g.png", columns=2)
    grid = Image.open(path)
    assert grid.width >= 2 * 128 and grid.height >= 2 * 128
    with pytest.raises(ValueError):
        save_prompt_grid(imgs, ["x"], tmp_path / "bad.png")


@pytest.mark.parametrize("label", ["cfg 3", "a small blue square at the bottom (data)",
                                   "a big yellow square in the bottom right of the picture (data)",
                                   "averyveryverylongwordthatfitsnowhere and more", "two\nlines"])
def test_grid_labels_fit_their_tile(label):
    width_of = lambda t: 6 * len(t)
    lines = fit_label(label, width_of, 146).split("\n")
    assert 1 <= len(lines) <= 2 and all(width_of(line) <= 146 for line in lines)
    if width_of(label) <= 146 and "\n" not in label:
        assert lines == [label]
    words = " ".join(lines).replace("…", "").split()
    assert words and label.split()[0].startswith(words[0])
