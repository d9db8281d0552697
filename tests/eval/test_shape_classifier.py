import numpy as np
import pytest

from engine.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, render_object
from engine.eval.shape_classifier import (ShapeClassifier, accuracy_on_fresh_renders,
                                          train_shape_classifier)


@pytest.fixture(scope="module")
def classifier():
    return train_shape_classifier(32, steps=80, seed=0, progress=False)


def test_accuracy_on_fresh_renders(classifier):
    assert accuracy_on_fresh_renders(classifier, n=600) >= 0.99


def test_every_pair_at_every_size_from_the_dataset_renderer(classifier):
    rng = np.random.default_rng(1)
    images, truth = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                images.append(render_object(colour, shape, 32, POSITIONS[rng.integers(9)],
                                            size, rng))
                truth.append(shape)
    preds = classifier.predict(images)
    assert np.mean([p == t for p, t in zip(preds, truth)]) >= 0.98


def test_save_load_and_size_check(classifier, tmp_path):
    path = tmp_path / "cls.safetensors"
    classifier.save(path)
    loaded = ShapeClassifier.load(path)
    img = render_object("red", "star", 32, "center", "big")
    assert loaded.predict([img]) == classifier.predict([img])
    with pytest.raises(ValueError, match="32x32"):
        loaded.predict([img.resize((64, 64))])
