"""diffpipe.utils and diffpipe.schedulers.AysSchedules under the names the reference's docs import."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest


def images(n: int, size=(6, 4)):
    rng = np.random.default_rng(n)
    return [PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("rows, cols, resize", [(2, 3, None), (1, 4, None), (3, 2, 5)])
def test_make_image_grid_is_the_reference_s(rows, cols, resize):
    from diffusers.utils import make_image_grid as reference

    from diffpipe.utils import make_image_grid

    pictures = images(rows * cols)
    expected = reference(pictures, rows=rows, cols=cols, resize=resize)
    got = make_image_grid(pictures, rows=rows, cols=cols, resize=resize)
    assert got.size == expected.size and got.mode == expected.mode
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_make_image_grid_says_when_the_images_do_not_fill_it():
    from diffpipe import make_image_grid

    with pytest.raises(ValueError, match="5 images do not fill 2 rows x 3 columns"):
        make_image_grid(images(5), rows=2, cols=3)


def test_utils_names_and_ays_schedules():
    import diffusers.schedulers
    import diffusers.utils

    import diffpipe.schedulers
    import diffpipe.utils

    for name in ("load_image", "export_to_gif", "export_to_video", "make_image_grid"):
        assert callable(getattr(diffpipe.utils, name)) and hasattr(diffusers.utils, name)
    assert diffpipe.schedulers.AysSchedules == diffusers.schedulers.AysSchedules
