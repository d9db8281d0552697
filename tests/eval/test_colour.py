import numpy as np
import pytest
from PIL import Image, ImageFilter

from engine.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, render_object
from engine.eval.colour import dominant_colour


@pytest.mark.parametrize("colour", list(COLOURS))
def test_dominant_colour_of_every_rendered_shape(colour):
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for size in SIZES:
            img = render_object(colour, shape, 32, position=POSITIONS[rng.integers(9)],
                                size=size, rng=rng)
            assert dominant_colour(img) == colour, (shape, size)
            # Soft edges (a blurry reconstruction) still read as the same colour.
            assert dominant_colour(img.filter(ImageFilter.GaussianBlur(1))) == colour


def test_blank_image_has_no_colour():
    assert dominant_colour(Image.new("RGB", (32, 32), (255, 255, 255))) is None
    nearly = np.full((32, 32, 3), 255, np.uint8)
    nearly[3, 3] = COLOURS["red"]
    assert dominant_colour(Image.fromarray(nearly)) is None


def test_majority_wins_between_two_colours():
    arr = np.full((32, 32, 3), 255, np.uint8)
    arr[:10, :10] = COLOURS["green"]
    arr[20:24, 20:24] = COLOURS["orange"]
    assert dominant_colour(Image.fromarray(arr)) == "green"
