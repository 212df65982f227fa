"""pipe.image_processor / mask_processor / numpy_to_pil as the reference's pipelines have them, and
inpainting's padding_mask_crop against the reference."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from adapter_factory import images, load_both
from sd_factory import save_reference_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("processors")
    return {
        "sd": save_reference_pipeline(root / "sd", safety_checker=False, seed=81),
        "inpaint": save_reference_pipeline(
            root / "inpaint", task="StableDiffusionInpaintPipeline", in_channels=9, safety_checker=False, seed=82
        ),
    }


def test_processors_are_the_reference_s(folders):
    ref, ours = load_both(folders["sd"], "StableDiffusionInpaintPipeline")
    for name in ("image_processor", "mask_processor"):
        theirs, mine = getattr(ref, name), getattr(ours, name)
        assert type(mine).__name__ == "VaeImageProcessor"
        assert {k: v for k, v in mine.config.items() if not k.startswith("_")} == {
            k: v for k, v in theirs.config.items() if not k.startswith("_")
        }
    decoded = torch.rand(2, 3, 8, 8) * 2 - 1
    for output_type in ("np", "pt"):
        expected = ref.image_processor.postprocess(decoded, output_type=output_type)
        got = ours.image_processor.postprocess(decoded, output_type=output_type)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
    array = np.random.default_rng(0).random((2, 8, 8, 3))
    assert [np.asarray(i).tolist() for i in ours.numpy_to_pil(array)] == [
        np.asarray(i).tolist() for i in ref.numpy_to_pil(array)
    ]


def scene():
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8))
    mask = np.zeros((96, 80), dtype=np.uint8)
    mask[40:60, 30:50] = 255
    return image, PIL.Image.fromarray(mask)


@pytest.mark.parametrize("folder", ["inpaint", "sd"])
def test_padding_mask_crop_is_the_reference_s(folders, folder):
    ref, ours = load_both(folders[folder], "StableDiffusionInpaintPipeline")
    image, mask = scene()
    args = dict(
        prompt="a cat",
        image=image,
        mask_image=mask,
        padding_mask_crop=4,
        height=32,
        width=32,
        num_inference_steps=3,
        output_type="pil",
    )
    expected, got = images(ref, args), images(ours, args)
    assert [i.size for i in got] == [i.size for i in expected] == [image.size]
    diff = np.abs(np.asarray(got[0], dtype=np.float32) - np.asarray(expected[0], dtype=np.float32)).max()
    assert diff <= 2, f"max difference {diff} (of 255)"
    outside = np.asarray(mask) == 0  # the image is kept where the mask is black
    assert (np.asarray(got[0])[outside] == np.asarray(image)[outside]).mean() > 0.9


def test_padding_mask_crop_needs_pil_images_and_pil_output(folders):
    _, ours = load_both(folders["inpaint"], "StableDiffusionInpaintPipeline")
    image, mask = scene()
    with pytest.raises(ValueError, match='use output_type="pil"'):
        ours(prompt="a", image=image, mask_image=mask, padding_mask_crop=4, output_type="np", num_inference_steps=1)
    with pytest.raises(ValueError, match="as PIL images"):
        ours(prompt="a", image=np.asarray(image), mask_image=mask, padding_mask_crop=4, num_inference_steps=1)
