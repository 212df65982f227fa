"""diffpipe.image_processor against the reference's diffusers.image_processor, called at test time as the oracle.

Every comparison runs the same call on both libraries with the same inputs: tensors and arrays must match in
shape, dtype and value (within 1e-6 for floats), PIL images in size, mode and pixels; calls the reference
refuses must be refused here too, with an ImageInputError (a ValueError and a TypeError) that says what was
expected. Warnings are compared by category where the reference warns.
"""

from __future__ import annotations

import itertools
import warnings

import diffusers  # noqa: F401  (the oracle: its absence is a failure, never a skip)
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor as RefMaskProcessor
from diffusers.image_processor import VaeImageProcessor as RefProcessor
from diffusers.image_processor import is_valid_image as ref_is_valid_image
from diffusers.image_processor import is_valid_image_imagelist as ref_is_valid_image_imagelist

from diffpipe.errors import DiffpipeError
from diffpipe.image_processor import (
    ImageInputError,
    IPAdapterMaskProcessor,
    PipelineImageInput,
    VaeImageProcessor,
    is_valid_image,
    is_valid_image_imagelist,
)

TOL = 1e-6


# ---------------------------------------------------------------------- helpers
def rng(seed: int = 0) -> np.random.Generator:
    """A seeded generator, so every input is the same on every run."""
    return np.random.default_rng(seed)


def pil(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """A random image of the given size and mode."""
    pixels = (rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels).convert(mode)


def mask_image(width: int, height: int, box, value: int = 255, mode: str = "L") -> PIL.Image.Image:
    """A black mask with the box ``(x1, y1, x2, y2)`` set to ``value``."""
    pixels = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = value
    return PIL.Image.fromarray(pixels).convert(mode)


def arr(*shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """A random numpy array in [0, 1)."""
    return rng(seed).random(shape).astype(dtype)


def ten(*shape, seed: int = 0) -> torch.Tensor:
    """A random float32 tensor in [0, 1)."""
    return torch.from_numpy(arr(*shape, seed=seed))


def copy_input(value):
    """A deep copy of an input, so that neither library sees what the other did to it."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, PIL.Image.Image):
        return value.copy()
    if isinstance(value, list):
        return [copy_input(v) for v in value]
    if isinstance(value, tuple):
        return tuple(copy_input(v) for v in value)
    return value


def assert_same(ours, ref, path: str = "result") -> None:
    """Recursive equality: kind, shape, dtype and values (floats within TOL); PIL as mode, size and pixels."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{path}: expected a tensor, got {type(ours).__name__}"
        assert ours.shape == ref.shape, f"{path}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        assert ours.dtype == ref.dtype, f"{path}: dtype {ours.dtype} != {ref.dtype}"
        assert ours.requires_grad == ref.requires_grad, f"{path}: requires_grad differs"
        if ref.dtype.is_floating_point:
            torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=TOL, equal_nan=True)
        else:
            assert torch.equal(ours, ref), f"{path}: values differ"
    elif isinstance(ref, np.ndarray):
        assert isinstance(ours, np.ndarray), f"{path}: expected an array, got {type(ours).__name__}"
        assert ours.shape == ref.shape, f"{path}: shape {ours.shape} != {ref.shape}"
        assert ours.dtype == ref.dtype, f"{path}: dtype {ours.dtype} != {ref.dtype}"
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL, err_msg=path)
        else:
            np.testing.assert_array_equal(ours, ref, err_msg=path)
    elif isinstance(ref, PIL.Image.Image):
        assert isinstance(ours, PIL.Image.Image), f"{path}: expected a PIL image, got {type(ours).__name__}"
        assert (ours.mode, ours.size) == (ref.mode, ref.size), (
            f"{path}: {ours.mode} {ours.size} != {ref.mode} {ref.size}"
        )
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref), err_msg=path)
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, type(ref)), f"{path}: expected a {type(ref).__name__}, got {type(ours).__name__}"
        assert len(ours) == len(ref), f"{path}: length {len(ours)} != {len(ref)}"
        for i, (o, r) in enumerate(zip(ours, ref)):
            assert_same(o, r, f"{path}[{i}]")
    else:
        assert type(ours) is type(ref) and ours == ref, f"{path}: {ours!r} != {ref!r}"


def call(fn, args, kwargs):
    """(result or exception, warning categories) of ``fn(*args, **kwargs)`` on copies of the inputs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(*copy_input(args), **copy_input(kwargs))
        except Exception as e:  # the reference's refusals come in many types
            result = e
    return result, {w.category for w in caught if issubclass(w.category, (FutureWarning, UserWarning))}


def compare(ours_fn, ref_fn, *args, check_warnings: bool = True, **kwargs):
    """Run both calls; the same result, or a refusal on both sides (ours an ImageInputError). Returns ours."""
    ref, ref_warnings = call(ref_fn, args, kwargs)
    ours, our_warnings = call(ours_fn, args, kwargs)
    if isinstance(ref, Exception):
        assert isinstance(ours, ImageInputError), f"the reference refuses ({ref!r}); ours gave {ours!r}"
        return ours
    if isinstance(ours, Exception):
        raise AssertionError(f"ours raised {ours!r}; the reference gave a result") from ours
    assert_same(ours, ref)
    if check_warnings:
        # the reference's FutureWarnings (deprecations) and UserWarnings must be ours too
        assert ref_warnings <= our_warnings, f"warnings {our_warnings} do not include the reference's {ref_warnings}"
    return ours


def processors(config=None, ours_cls=VaeImageProcessor, ref_cls=RefProcessor):
    """The same processor from both libraries."""
    config = config or {}
    return ours_cls(**config), ref_cls(**config)


def compare_method(name: str, config, *args, **kwargs):
    """``compare`` for one method of processors built with ``config``."""
    ours, ref = processors(config)
    return compare(getattr(ours, name), getattr(ref, name), *args, **kwargs)


# ---------------------------------------------------------------------- config and public names
CONFIGS = [
    {},
    {"vae_scale_factor": 16, "do_normalize": False},
    {"do_resize": False, "resample": "bilinear", "reducing_gap": 2.0},
    {"do_binarize": True, "do_convert_grayscale": True, "vae_latent_channels": 16},
    {"do_convert_rgb": True, "resample": "nearest"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_config_matches_the_reference(config):
    ours, ref = processors(config)
    assert set(ours.config) == set(ref.config)
    for key, value in ref.config.items():
        if key == "_use_default_values":
            assert set(ours.config[key]) == set(value)
        else:
            assert ours.config[key] == value, key
    assert VaeImageProcessor.config_name == RefProcessor.config_name == "config.json"


@pytest.mark.parametrize("config", [{}, {"do_binarize": False, "vae_scale_factor": 4}], ids=str)
def test_mask_processor_config_matches_the_reference(config):
    ours, ref = IPAdapterMaskProcessor(**config), RefMaskProcessor(**config)
    assert set(ours.config) == set(ref.config)
    for key, value in ref.config.items():
        if key == "_use_default_values":
            assert set(ours.config[key]) == set(value)
        else:
            assert ours.config[key] == value, key
    assert isinstance(ours, VaeImageProcessor)


def test_positional_arguments_and_from_config():
    ours, ref = VaeImageProcessor(False, 16), RefProcessor(False, 16)
    assert {k: v for k, v in ours.config.items() if k != "_use_default_values"} == {
        k: v for k, v in ref.config.items() if k != "_use_default_values"
    }
    rebuilt = VaeImageProcessor.from_config(RefProcessor(vae_scale_factor=4).config)
    assert rebuilt.config.vae_scale_factor == 4
    # a mask processor's config carries its mask settings into a plain processor, as in the reference
    from_mask, ref_from_mask = (
        VaeImageProcessor.from_config(IPAdapterMaskProcessor().config),
        RefProcessor.from_config(RefMaskProcessor().config),
    )
    for key in ("do_normalize", "do_binarize", "do_convert_grayscale", "do_convert_rgb", "vae_latent_channels"):
        assert from_mask.config[key] == ref_from_mask.config[key], key


def test_rgb_and_grayscale_together_are_refused():
    with pytest.raises(ValueError):
        RefProcessor(do_convert_rgb=True, do_convert_grayscale=True)
    with pytest.raises(ImageInputError, match="do_convert_rgb and do_convert_grayscale"):
        VaeImageProcessor(do_convert_rgb=True, do_convert_grayscale=True)


def test_error_type_is_value_and_type_error():
    assert issubclass(ImageInputError, ValueError)
    assert issubclass(ImageInputError, TypeError)
    assert issubclass(ImageInputError, DiffpipeError)


def test_public_names_like_the_reference():
    from diffusers.image_processor import PipelineImageInput as RefInput

    assert set(PipelineImageInput.__args__) == set(RefInput.__args__)
    for name in ("preprocess", "postprocess", "resize", "binarize", "get_default_height_width", "apply_overlay"):
        assert callable(getattr(VaeImageProcessor(), name))
    for name in ("numpy_to_pil", "pil_to_numpy", "numpy_to_pt", "pt_to_numpy", "normalize", "denormalize"):
        assert isinstance(VaeImageProcessor.__dict__[name], staticmethod), name
    for name in ("convert_to_rgb", "convert_to_grayscale", "blur", "get_crop_region"):
        assert isinstance(VaeImageProcessor.__dict__[name], staticmethod), name
    assert isinstance(IPAdapterMaskProcessor.__dict__["downsample"], staticmethod)


VALIDITY_INPUTS = [
    pil(4, 3),
    np.zeros((2, 2)),
    np.zeros((2, 2, 3)),
    np.zeros((1, 2, 2, 3)),
    np.zeros(3),
    np.zeros((1, 1, 2, 2, 3)),
    torch.zeros(2, 2),
    torch.zeros(1, 3, 2, 2),
    [np.zeros((2, 2))],
    [np.zeros((1, 2, 2, 3))],
    [],
    "image.png",
    None,
    (np.zeros((2, 2)),),
    [pil(4, 3), np.zeros((2, 2))],
]


@pytest.mark.parametrize("value", VALIDITY_INPUTS, ids=lambda v: type(v).__name__)
def test_is_valid_image_and_imagelist(value):
    assert is_valid_image(value) == ref_is_valid_image(value)
    assert is_valid_image_imagelist(value) == ref_is_valid_image_imagelist(value)


# ---------------------------------------------------------------------- conversions
@pytest.mark.parametrize(
    "images",
    [
        arr(2, 5, 7, 3),
        arr(5, 7, 3),
        arr(2, 5, 7, 1),
        arr(1, 5, 7, 2),
        arr(1, 5, 7, 4),
        arr(1, 5, 7, 3, dtype=np.float64),
        np.array([[[[1.5, -0.2, 0.5]]]]),  # out of range: wraps like the reference
        (arr(1, 4, 4, 3) * 255).astype(np.uint8),
    ],
    ids=lambda a: f"{a.shape}-{a.dtype}",
)
def test_numpy_to_pil(images):
    compare(VaeImageProcessor.numpy_to_pil, RefProcessor.numpy_to_pil, images)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "1", "I", "P", "CMYK"])
def test_pil_to_numpy(mode):
    compare(VaeImageProcessor.pil_to_numpy, RefProcessor.pil_to_numpy, pil(7, 5, mode))
    compare(VaeImageProcessor.pil_to_numpy, RefProcessor.pil_to_numpy, [pil(7, 5, mode), pil(7, 5, mode, seed=1)])


def test_pil_to_numpy_takes_a_tuple_like_a_list():
    images = (pil(7, 5), pil(7, 5, seed=1))
    np.testing.assert_array_equal(VaeImageProcessor.pil_to_numpy(images), RefProcessor.pil_to_numpy(list(images)))


@pytest.mark.parametrize(
    "images",
    [arr(2, 5, 7, 3), arr(2, 5, 7), arr(1, 5, 7, 1, dtype=np.float64), (arr(1, 5, 7, 3) * 255).astype(np.uint8)],
    ids=lambda a: f"{a.shape}-{a.dtype}",
)
def test_numpy_to_pt(images):
    compare(VaeImageProcessor.numpy_to_pt, RefProcessor.numpy_to_pt, images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_pt_to_numpy(dtype):
    images = (ten(2, 3, 5, 7) * (10 if dtype == torch.int32 else 1)).to(dtype)
    compare(VaeImageProcessor.pt_to_numpy, RefProcessor.pt_to_numpy, images)


@pytest.mark.parametrize(
    "images", [arr(2, 5, 7, 3), ten(2, 3, 5, 7), np.array([0, 1, 255], np.uint8), torch.tensor([0, 1])], ids=str
)
def test_normalize(images):
    compare(VaeImageProcessor.normalize, RefProcessor.normalize, images)


@pytest.mark.parametrize("images", [ten(2, 3, 5, 7) * 4 - 2, torch.tensor([-3.0, 0.0, 3.0]).half()], ids=str)
def test_denormalize_tensor(images):
    compare(VaeImageProcessor.denormalize, RefProcessor.denormalize, images)


def test_denormalize_numpy_matches_the_reference_on_tensors():
    # the reference documents numpy input but fails on it; ours clips like its tensor version
    images = arr(2, 5, 7, 3) * 4 - 2
    expected = RefProcessor.denormalize(torch.from_numpy(images)).numpy()
    assert_same(VaeImageProcessor.denormalize(images), expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "1", "CMYK"])
def test_convert_to_rgb_and_grayscale(mode):
    image = pil(9, 6, mode)
    compare(VaeImageProcessor.convert_to_rgb, RefProcessor.convert_to_rgb, image)
    compare(VaeImageProcessor.convert_to_grayscale, RefProcessor.convert_to_grayscale, image)


@pytest.mark.parametrize("blur_factor", [None, 0, 1, 2.5, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_blur(blur_factor, mode):
    args = (pil(20, 14, mode),) if blur_factor is None else (pil(20, 14, mode), blur_factor)
    compare(VaeImageProcessor.blur, RefProcessor.blur, *args)


# ---------------------------------------------------------------------- binarize, sizes, crop regions
@pytest.mark.parametrize(
    "image",
    [
        np.array([0.2, 0.5, 0.7, -1.0]),
        torch.tensor([0.2, 0.5, 0.7, -1.0, float("nan")]),
        ten(2, 1, 5, 7),
        torch.tensor([0, 1, 2]),
    ],
    ids=str,
)
def test_binarize(image):
    compare_method("binarize", {}, image)


def test_binarize_leaves_its_input_alone():
    image = torch.tensor([0.2, 0.7])
    VaeImageProcessor().binarize(image)
    assert torch.equal(image, torch.tensor([0.2, 0.7]))


SIZE_IMAGES = [
    pil(37, 29),
    np.zeros((2, 29, 37, 3)),
    np.zeros((2, 29, 37)),
    np.zeros((1, 29, 37, 5)),
    torch.zeros(2, 3, 29, 37),
]


@pytest.mark.parametrize("image", SIZE_IMAGES, ids=lambda i: type(i).__name__)
@pytest.mark.parametrize("hw", [(None, None), (20, None), (None, 30), (21, 35), (0, 0), (-5, 3), (20.5, 30.7)])
@pytest.mark.parametrize("config", [{}, {"vae_scale_factor": 3}, {"do_resize": False}], ids=str)
def test_get_default_height_width(image, hw, config):
    compare_method("get_default_height_width", config, image, *hw)


def get_crop_region_cases():
    """Fixed cases, then seeded random masks, sizes and pads (integers, floats, negatives, empty masks)."""
    cases = [
        ((64, 64, (10, 20, 20, 30)), 64, 64, 0),
        ((64, 64, (10, 20, 20, 30)), 512, 256, 0),
        ((64, 64, (10, 20, 20, 30)), 512, 512, 4),
        ((64, 64, (10, 20, 20, 30)), 512, 512, 100),
        ((64, 48, (0, 0, 64, 48)), 512, 512, 0),
        ((64, 48, (0, 0, 0, 0)), 512, 512, 0),
        ((64, 48, (0, 0, 0, 0)), 512, 512, 5),
        ((64, 48, (60, 40, 64, 48)), 64, 48, 3),
        ((64, 48, (30, 1, 32, 47)), 10, 30, 0),
        ((64, 48, (0, 20, 64, 22)), 30, 300, 0),
        ((64, 48, (0, 0, 63, 47)), 3, 100, 0),
        ((64, 64, (10, 20, 20, 30)), 64, 64, 2.5),
        ((64, 64, (10, 20, 20, 30)), 64, 64, -2),
    ]
    generator = rng(7)
    for _ in range(60):
        w, h = (int(v) for v in generator.integers(8, 80, 2))
        x1, y1 = int(generator.integers(0, w)), int(generator.integers(0, h))
        box = (x1, y1, int(generator.integers(x1, w + 1)), int(generator.integers(y1, h + 1)))
        pad = [0, 3, 17, 1.5, -1][int(generator.integers(0, 5))]
        cases.append(((w, h, box), int(generator.integers(16, 1024)), int(generator.integers(16, 1024)), pad))
    return cases


@pytest.mark.parametrize("case", get_crop_region_cases(), ids=str)
def test_get_crop_region(case):
    (w, h, box), width, height, pad = case
    compare(VaeImageProcessor.get_crop_region, RefProcessor.get_crop_region, mask_image(w, h, box), width, height, pad)


@pytest.mark.parametrize("value, mode", [(1, "L"), (255, "RGB"), (200, "1")])
def test_get_crop_region_reads_any_nonzero_pixel(value, mode):
    mask = mask_image(64, 64, (10, 20, 20, 30), value=value, mode=mode)
    compare(VaeImageProcessor.get_crop_region, RefProcessor.get_crop_region, mask, 128, 64, pad=2)


# ---------------------------------------------------------------------- resize
@pytest.mark.parametrize("resample", ["nearest", "linear", "bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("reducing_gap", [None, 2.0])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_resize_pil_default(resample, reducing_gap, mode):
    config = {"resample": resample, "reducing_gap": reducing_gap}
    compare_method("resize", config, pil(123, 77, mode), 16, 24)
    compare_method("resize", config, pil(11, 9, mode), 40, 24)


def fill_crop_cases():
    """Seeded random image sizes, target sizes, modes and filters for the ``fill`` and ``crop`` modes."""
    generator = rng(3)
    cases = [
        ((4, 3), (12, 6), "RGB", "nearest"),
        ((4, 3), (6, 12), "RGB", "nearest"),
        ((20, 10), (8, 4), "L", "lanczos"),
    ]
    for _ in range(40):
        image_size = tuple(int(v) for v in generator.integers(1, 48, 2))
        target = tuple(int(v) for v in generator.integers(1, 48, 2))
        mode = ["RGB", "L", "RGBA", "P", "1"][int(generator.integers(0, 5))]
        cases.append((image_size, target, mode, ["nearest", "lanczos", "bicubic"][int(generator.integers(0, 3))]))
    return cases


@pytest.mark.parametrize("resize_mode", ["fill", "crop"])
@pytest.mark.parametrize("case", fill_crop_cases(), ids=str)
def test_resize_fill_and_crop(resize_mode, case):
    (iw, ih), (w, h), mode, resample = case
    compare_method("resize", {"resample": resample, "reducing_gap": 1.5}, pil(iw, ih, mode), h, w, resize_mode)


@pytest.mark.parametrize(
    "image",
    [
        ten(2, 3, 29, 37),
        ten(1, 1, 29, 37).half(),
        (ten(1, 3, 29, 37) * 255).to(torch.uint8),
        arr(2, 29, 37, 3),
        arr(29, 37, 3),
        arr(2, 29, 37),
        arr(1, 29, 37, 4, dtype=np.float64),
        (arr(1, 29, 37, 3) * 255).astype(np.uint8),
    ],
    ids=lambda i: f"{type(i).__name__}{tuple(i.shape)}-{i.dtype}",
)
@pytest.mark.parametrize("hw", [(16, 24), (64, 80)])
def test_resize_arrays_and_tensors(image, hw):
    compare_method("resize", {}, image, *hw)


# ---------------------------------------------------------------------- preprocess
PIL_PREPROCESS = [
    ({}, lambda: pil(37, 29), {}),
    ({}, lambda: [pil(37, 29), pil(37, 29, seed=1)], {}),
    ({}, lambda: [pil(37, 29), pil(50, 40)], {}),
    ({}, lambda: pil(37, 29, "L"), {}),
    ({}, lambda: pil(37, 29, "RGBA"), {}),
    ({"do_convert_rgb": True}, lambda: pil(37, 29, "L"), {}),
    ({"do_convert_rgb": True}, lambda: pil(37, 29, "RGBA"), {"height": 16, "width": 24}),
    ({"do_convert_grayscale": True}, lambda: pil(37, 29), {"height": 16, "width": 24}),
    ({}, lambda: pil(37, 29), {"height": 20, "width": 30}),
    ({"do_resize": False}, lambda: pil(37, 29), {"height": 16, "width": 16}),
    ({"do_normalize": False}, lambda: pil(37, 29), {}),
    ({"do_binarize": True}, lambda: pil(37, 29), {}),
    ({"do_binarize": True, "do_normalize": False}, lambda: pil(37, 29), {}),
    ({"resample": "bicubic", "reducing_gap": 2.0}, lambda: pil(100, 90), {"height": 32, "width": 24}),
    ({"vae_scale_factor": 16}, lambda: pil(100, 90), {}),
    ({}, lambda: pil(37, 29), {"crops_coords": (2, 3, 20, 25)}),
    ({}, lambda: pil(37, 29), {"crops_coords": (2, 3, 20, 25), "height": 16, "width": 16}),
    ({}, lambda: [pil(37, 29), pil(50, 40)], {"crops_coords": (0, 0, 20, 20)}),
    ({}, lambda: pil(37, 29), {"crops_coords": (-5, -5, 50, 50)}),
    ({}, lambda: pil(37, 29), {"height": 16, "width": 24, "resize_mode": "fill"}),
    ({}, lambda: pil(37, 29), {"height": 16, "width": 24, "resize_mode": "crop"}),
    ({"do_convert_grayscale": True}, lambda: pil(37, 29), {"height": 24, "width": 16, "resize_mode": "fill"}),
    ({}, lambda: pil(64, 48), {"crops_coords": (8, 0, 40, 48), "height": 32, "width": 32, "resize_mode": "crop"}),
]


@pytest.mark.parametrize("config, make, kwargs", PIL_PREPROCESS, ids=lambda v: str(v) if not callable(v) else "")
def test_preprocess_pil(config, make, kwargs):
    compare_method("preprocess", config, make(), **kwargs)


NP_A = arr(29, 37, 3)
ARRAY_PREPROCESS = [
    ({}, NP_A, {}),
    ({}, NP_A[None], {}),
    ({}, [NP_A, NP_A], {}),
    ({}, [NP_A[None], NP_A[None]], {}),  # deprecated list of 4-D batches: FutureWarning
    ({}, NP_A[..., 0], {}),
    ({}, [NP_A[..., 0], NP_A[..., 1]], {}),
    ({}, NP_A[..., :1], {}),
    ({}, arr(29, 37, 4), {}),
    ({}, (NP_A * 255).astype(np.uint8), {}),
    ({"do_resize": False}, (NP_A * 255).astype(np.uint8), {}),
    ({"do_resize": False, "do_normalize": False}, (NP_A * 255).astype(np.uint8), {}),
    ({}, NP_A.astype(np.float64), {}),
    ({}, NP_A.astype(np.float16), {}),
    ({}, NP_A * 2 - 1, {}),  # already in [-1, 1]: FutureWarning, not normalized again
    ({}, NP_A, {"height": 20, "width": 30}),
    ({"do_binarize": True}, NP_A, {}),
    ({"do_binarize": True, "do_normalize": False}, NP_A, {}),
    ({"do_convert_grayscale": True}, arr(2, 29, 37), {}),
    ({"do_convert_grayscale": True}, arr(29, 37, 1), {}),
    ({"do_convert_grayscale": True}, arr(29, 37, 3), {"height": 8, "width": 8}),
    ({"do_convert_grayscale": True}, [NP_A[..., 0], NP_A[..., 1]], {}),
    ({"do_convert_rgb": True}, NP_A[..., :1], {}),
    ({}, arr(1, 29, 37, 4), {}),  # numpy batches are never taken as latents
]
PT_X = ten(2, 3, 29, 37)
TENSOR_PREPROCESS = [
    ({}, PT_X, {}),
    ({}, PT_X[0], {}),
    ({}, [PT_X[0], PT_X[1]], {}),
    ({}, [PT_X, PT_X], {}),  # deprecated list of 4-D batches: FutureWarning
    ({}, PT_X[:, :1], {}),
    ({}, PT_X[0, :1], {}),
    ({}, ten(2, 29, 37), {}),
    ({}, PT_X * 2 - 1, {}),
    ({}, PT_X.half(), {}),
    ({}, PT_X.double(), {}),
    ({}, (PT_X * 255).to(torch.uint8), {}),
    ({}, PT_X, {"height": 20, "width": 30}),
    ({"do_resize": False}, PT_X, {}),
    ({"do_binarize": True, "do_resize": False}, PT_X, {}),
    ({}, ten(2, 4, 29, 37) * 2 - 1, {"height": 16, "width": 16}),  # latents pass through
    ({}, ten(4, 29, 37), {}),
    ({}, [ten(4, 29, 37), ten(4, 29, 37, seed=1)], {}),
    ({}, [ten(1, 4, 29, 37), ten(1, 4, 29, 37, seed=1)], {}),
    ({"vae_latent_channels": 16}, ten(1, 16, 29, 37), {}),
    ({"vae_latent_channels": 3}, PT_X, {}),
    ({"do_convert_grayscale": True}, PT_X, {}),
    ({"do_convert_grayscale": True}, PT_X[0], {}),
    ({"do_convert_grayscale": True}, PT_X[0, 0], {}),
    ({"do_convert_grayscale": True}, [PT_X[0, 0], PT_X[1, 0]], {}),
    ({"do_convert_grayscale": True}, [PT_X[0], PT_X[1]], {}),
    ({"do_convert_grayscale": True}, ten(29, 37, 1), {"height": 8, "width": 8}),
    ({}, torch.full((1, 3, 8, 8), float("nan")), {}),
    ({}, ten(1, 3, 16, 16).requires_grad_(), {}),
    ({}, ten(1, 16, 16, 3).permute(0, 3, 1, 2), {}),
]


@pytest.mark.parametrize(
    "config, image, kwargs", ARRAY_PREPROCESS + TENSOR_PREPROCESS, ids=lambda v: "" if hasattr(v, "shape") else str(v)
)
def test_preprocess_arrays_and_tensors(config, image, kwargs):
    compare_method("preprocess", config, image, **kwargs)


@pytest.mark.parametrize("image", [NP_A, PT_X], ids=["numpy", "torch"])
def test_preprocess_ignores_pil_only_options_for_arrays_with_a_warning(image):
    for kwargs in ({"crops_coords": (2, 3, 20, 25)}, {"height": 16, "width": 24, "resize_mode": "fill"}):
        compare_method("preprocess", {}, image, **kwargs)
        with pytest.warns(UserWarning, match="PIL images only"):
            VaeImageProcessor().preprocess(image, **kwargs)


def test_preprocess_leaves_its_input_alone():
    image = ten(1, 3, 16, 16)
    before = image.clone()
    VaeImageProcessor(do_binarize=True, do_normalize=False, do_resize=False).preprocess(image)
    assert torch.equal(image, before)


# ---------------------------------------------------------------------- postprocess
DECODED = ten(2, 3, 8, 8, seed=5) * 2.4 - 1.2


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent", "unknown", None])
@pytest.mark.parametrize("config", [{}, {"do_normalize": False}], ids=str)
@pytest.mark.parametrize("do_denormalize", [None, [True, False], (False, True), [False, False, True]], ids=str)
def test_postprocess(output_type, config, do_denormalize):
    compare_method("postprocess", config, DECODED, output_type=output_type, do_denormalize=do_denormalize)


@pytest.mark.parametrize(
    "image, output_type",
    [
        (DECODED[:, :1], "pil"),
        (ten(1, 4, 8, 8), "pil"),
        (ten(1, 2, 8, 8), "pil"),
        (ten(1, 4, 8, 8), "np"),
        (DECODED.half(), "np"),
        (DECODED.half(), "pt"),
        (DECODED.bfloat16(), "np"),
        (DECODED[0], "pt"),
        (DECODED[None], "pt"),
        (torch.ones(1, 3, 4, 4, dtype=torch.int64), "pil"),
        (torch.ones(1, 3, 4, 4, dtype=torch.int64), "pt"),
        (torch.rand(0, 3, 4, 4), "pt"),
        (DECODED.clone().requires_grad_(), "pt"),
    ],
    ids=lambda v: str(tuple(v.shape)) + str(v.dtype) if hasattr(v, "shape") else v,
)
def test_postprocess_shapes_and_dtypes(image, output_type):
    compare_method("postprocess", {}, image, output_type=output_type)


def test_postprocess_latent_and_unnormalized_return_the_tensor_itself():
    assert VaeImageProcessor().postprocess(DECODED, output_type="latent") is DECODED
    assert VaeImageProcessor(do_normalize=False).postprocess(DECODED, output_type="pt") is DECODED


def test_postprocess_unknown_output_type_warns():
    with pytest.warns(FutureWarning, match="output_type"):
        VaeImageProcessor().postprocess(DECODED, output_type="PIL")


def test_preprocess_then_postprocess_round_trip():
    image = pil(64, 48)
    ours, ref = processors()
    assert_same(ours.postprocess(ours.preprocess(image)), ref.postprocess(ref.preprocess(image)))
    np.testing.assert_array_equal(np.asarray(ours.postprocess(ours.preprocess(image))[0]), np.asarray(image))


# ---------------------------------------------------------------------- apply_overlay
def overlay_cases():
    """Seeded masks (binary and gray), images of several modes, with and without crop boxes."""
    generator = rng(11)
    cases = []
    for trial in range(24):
        w, h = (int(v) for v in generator.integers(4, 40, 2))
        mask_pixels = generator.random((h, w)) * 255 if trial % 2 else (generator.random((h, w)) > 0.5) * 255
        init_mode, image_mode = ["RGB", "RGBA", "L"][trial % 3], ["RGB", "L", "RGBA"][(trial // 3) % 3]
        crop = None
        image_size = (w, h)
        if trial % 4 == 0:
            x1, y1 = int(generator.integers(0, w // 2)), int(generator.integers(0, h // 2))
            crop = (x1, y1, int(generator.integers(x1 + 1, w + 1)), int(generator.integers(y1 + 1, h + 1)))
            image_size = tuple(int(v) for v in generator.integers(2, 30, 2))
        cases.append((mask_pixels.astype(np.uint8), (w, h, init_mode), (*image_size, image_mode), crop, trial))
    return cases


@pytest.mark.parametrize("mask_pixels, init_spec, image_spec, crop, seed", overlay_cases(), ids=lambda v: "")
@pytest.mark.parametrize("config", [{}, {"resample": "nearest"}], ids=str)
def test_apply_overlay(mask_pixels, init_spec, image_spec, crop, seed, config):
    mask = PIL.Image.fromarray(mask_pixels)
    init_image, image = pil(*init_spec, seed=seed), pil(*image_spec, seed=seed + 100)
    compare_method("apply_overlay", config, mask, init_image, image, crop_coords=crop)


def test_apply_overlay_with_get_crop_region():
    init_image, inpainted = pil(96, 64), pil(32, 32, seed=1)
    mask = mask_image(96, 64, (40, 10, 60, 30))
    ours, ref = processors()
    box = ours.get_crop_region(mask, 32, 32, pad=4)
    assert box == ref.get_crop_region(mask, 32, 32, pad=4)
    assert_same(
        ours.apply_overlay(mask, init_image, inpainted, box), ref.apply_overlay(mask, init_image, inpainted, box)
    )


# ---------------------------------------------------------------------- IPAdapterMaskProcessor
MASK = PIL.Image.fromarray(((rng(2).random((64, 48)) > 0.5) * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "image, kwargs",
    [
        (MASK, {}),
        (MASK.convert("RGB"), {}),
        ([MASK, MASK.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)], {}),
        (MASK, {"height": 32, "width": 24}),
        (ten(2, 64, 48), {}),
        (ten(64, 48), {}),
        (arr(64, 48), {}),
        (arr(2, 64, 48), {"height": 16, "width": 16}),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, dict) else str(v),
)
@pytest.mark.parametrize("config", [{}, {"do_binarize": False}, {"vae_scale_factor": 16}], ids=str)
def test_mask_processor_preprocess(image, kwargs, config):
    ours, ref = IPAdapterMaskProcessor(**config), RefMaskProcessor(**config)
    compare(ours.preprocess, ref.preprocess, image, **kwargs)


def downsample_cases():
    """Fixed shapes, then seeded random mask sizes and query counts (some leave queries unmasked)."""
    cases = [((2, 64, 48), 1, 12, 8), ((2, 64, 48), 3, 13, 3), ((1, 64, 48), 3, 12, 3), ((2, 64, 48), 2, 7, 2)]
    cases += [((2, 64, 48), 1, 3072, 4), ((2, 64, 48), 5, 100, 4), ((2, 64, 48), 1, 1, 1), ((1, 64, 64), 4, 4096, 2)]
    generator = rng(5)
    for _ in range(30):
        n, h, w = int(generator.integers(1, 3)), int(generator.integers(8, 128)), int(generator.integers(8, 128))
        cases.append(((n, h, w), int(generator.integers(1, 4)), int(generator.integers(1, 5000)), 2))
    return cases


@pytest.mark.parametrize("case", downsample_cases(), ids=str)
def test_mask_downsample(case):
    shape, batch_size, num_queries, dim = case
    mask = ten(*shape, seed=num_queries)
    compare(IPAdapterMaskProcessor.downsample, RefMaskProcessor.downsample, mask, batch_size, num_queries, dim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_mask_downsample_dtypes(dtype):
    mask = ten(2, 16, 12).to(dtype)
    compare(IPAdapterMaskProcessor.downsample, RefMaskProcessor.downsample, mask, 2, 12, 3)


def test_mask_downsample_of_preprocessed_masks():
    masks = IPAdapterMaskProcessor().preprocess([MASK, MASK.rotate(180)], height=64, width=48)
    ref_masks = RefMaskProcessor().preprocess([MASK, MASK.rotate(180)], height=64, width=48)
    assert_same(masks, ref_masks)
    assert_same(
        IPAdapterMaskProcessor.downsample(masks[:, 0], 2, 48, 4), RefMaskProcessor.downsample(ref_masks[:, 0], 2, 48, 4)
    )


# ---------------------------------------------------------------------- refusals
REFUSED = [
    ("numpy_to_pil", {}, (np.random.rand(1, 1, 4, 5, 3),), {}),
    ("numpy_to_pil", {}, ([np.zeros((4, 5, 3))],), {}),
    ("numpy_to_pil", {}, (torch.rand(1, 4, 5, 3),), {}),
    ("numpy_to_pil", {}, (np.zeros((1, 4, 5, 5)),), {}),
    ("pil_to_numpy", {}, ([pil(7, 5), pil(5, 7)],), {}),
    ("pil_to_numpy", {}, ([],), {}),
    ("numpy_to_pt", {}, (np.zeros((4, 5)),), {}),
    ("numpy_to_pt", {}, (np.zeros((1, 2, 3, 4, 5)),), {}),
    ("pt_to_numpy", {}, (torch.zeros(3, 4, 5),), {}),
    ("pt_to_numpy", {}, (torch.zeros(1, 3, 4, 5, requires_grad=True),), {}),
    ("normalize", {}, ([1.0],), {}),
    ("denormalize", {}, ([1.0],), {}),
    ("convert_to_rgb", {}, (np.zeros((3, 3, 3)),), {}),
    ("convert_to_grayscale", {}, (np.zeros((3, 3, 3)),), {}),
    ("blur", {}, (np.zeros((3, 3, 3)),), {}),
    ("binarize", {}, (pil(4, 4),), {}),
    ("get_crop_region", {}, (np.zeros((8, 8), np.uint8), 8, 8), {}),
    ("get_crop_region", {}, (mask_image(64, 64, (10, 20, 20, 21)), 8, 8), {"pad": -0.5}),
    ("get_default_height_width", {}, (np.zeros((29, 37)),), {}),
    ("get_default_height_width", {}, (torch.zeros(3, 29, 37),), {}),
    ("get_default_height_width", {}, ([pil(8, 8)],), {}),
    ("resize", {}, (pil(8, 8), 4, 4), {"resize_mode": "stretch"}),
    ("resize", {}, (np.zeros((1, 8, 8, 3)), 4, 4), {"resize_mode": "fill"}),
    ("resize", {}, (torch.zeros(1, 3, 8, 8), 4, 4), {"resize_mode": "crop"}),
    ("resize", {}, (pil(8, 8), 0, 4), {}),
    ("resize", {}, (torch.zeros(1, 3, 8, 8), 0, 4), {}),
    ("resize", {}, (pil(8, 8), 4.0, 4), {}),
    ("resize", {}, (torch.zeros(3, 8, 8), 4, 4), {}),
    ("resize", {"resample": "box"}, (pil(8, 8), 4, 4), {}),
    ("apply_overlay", {}, (np.zeros((8, 8)), pil(8, 8), pil(8, 8)), {}),
    ("apply_overlay", {}, (pil(4, 4, "L"), pil(8, 8), pil(8, 8)), {}),
    ("preprocess", {}, ((pil(8, 8), pil(8, 8)),), {}),
    ("preprocess", {}, ("image.png",), {}),
    ("preprocess", {}, (None,), {}),
    ("preprocess", {}, ([],), {}),
    ("preprocess", {}, ([[pil(8, 8)]],), {}),
    ("preprocess", {}, ([pil(16, 16), np.zeros((16, 16, 3))],), {}),
    ("preprocess", {}, ([np.zeros((16, 16, 3)), np.zeros((1, 16, 16, 3))],), {}),
    ("preprocess", {}, ([np.zeros((16, 16, 3)), np.zeros((8, 16, 3))],), {}),
    ("preprocess", {}, ([np.zeros((1, 16, 16, 3)), np.zeros((1, 8, 16, 3))],), {}),
    ("preprocess", {}, ([torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 16)],), {}),
    ("preprocess", {}, (np.zeros((1, 1, 16, 16, 3)),), {}),
    ("preprocess", {}, (torch.zeros(16, 16),), {}),
    ("preprocess", {}, ([torch.zeros(16, 16), torch.zeros(16, 16)],), {}),
    ("preprocess", {}, (torch.zeros(0, 3, 16, 16),), {}),
    ("preprocess", {}, (pil(8, 8), 16, 16), {"resize_mode": "stretch"}),
    ("preprocess", {}, (pil(37, 29),), {"crops_coords": [(0, 0, 20, 20)]}),
    ("preprocess", {}, (pil(37, 29),), {"crops_coords": (10, 10, 5, 5)}),
    ("preprocess", {}, (pil(5, 5),), {}),
    ("preprocess", {}, (torch.zeros(1, 3, 5, 5),), {}),
    ("preprocess", {"do_resize": False}, ([pil(16, 16), pil(24, 16)],), {}),
    ("postprocess", {}, (np.zeros((1, 3, 8, 8)),), {}),
    ("postprocess", {}, ([torch.zeros(3, 8, 8)],), {}),
    ("postprocess", {}, (torch.zeros(3, 8, 8),), {}),
    ("postprocess", {}, (torch.zeros(1, 3, 8, 8, requires_grad=True),), {"output_type": "np"}),
    ("postprocess", {}, (torch.zeros(2, 3, 8, 8),), {"output_type": "pt", "do_denormalize": [True]}),
    ("postprocess", {}, (torch.zeros(2, 3, 8, 8),), {"output_type": "pt", "do_denormalize": True}),
    ("postprocess", {}, (torch.zeros(1, 5, 8, 8),), {"output_type": "pil"}),
]


@pytest.mark.parametrize("name, config, args, kwargs", REFUSED, ids=lambda v: v if isinstance(v, str) else "")
def test_refused_inputs_give_clear_errors(name, config, args, kwargs):
    ours, ref = processors(config)
    with pytest.raises(Exception):
        getattr(ref, name)(*copy_input(args), **copy_input(kwargs))
    with pytest.raises(ImageInputError) as raised:
        getattr(ours, name)(*copy_input(args), **copy_input(kwargs))
    message = str(raised.value)
    assert any(word in message for word in ("expect", "must", "need", "cannot", "works on", "empty")), message


@pytest.mark.parametrize(
    "mask, num_queries",
    [
        (torch.zeros(2, 1, 64, 48), 12),
        (np.zeros((1, 8, 8)), 12),
        (torch.rand(1, 8, 800), 12),
        (torch.rand(1, 800, 8), 12),
    ],
    ids=["4d", "numpy", "wide", "tall"],
)
def test_mask_downsample_refusals(mask, num_queries):
    with pytest.raises(Exception):
        RefMaskProcessor.downsample(mask, 1, num_queries, 8)
    with pytest.raises(ImageInputError, match="downsample"):
        IPAdapterMaskProcessor.downsample(mask, 1, num_queries, 8)


def test_refusal_messages_name_what_was_found():
    with pytest.raises(ImageInputError, match=r"expects .*PIL image.*got str"):
        VaeImageProcessor().preprocess("image.png")
    with pytest.raises(ImageInputError, match=r"got a list of PIL image .*, ndarray of shape \(16, 16, 3\)"):
        VaeImageProcessor().preprocess([pil(16, 16), np.zeros((16, 16, 3))])
    with pytest.raises(ImageInputError, match="resize_mode must be one of default, fill, crop, got 'stretch'"):
        VaeImageProcessor().resize(pil(8, 8), 4, 4, resize_mode="stretch")
    with pytest.raises(ImageInputError, match="resample must be one of"):
        VaeImageProcessor(resample="box").resize(pil(8, 8), 4, 4)


def test_every_combination_of_small_array_shapes():
    """Arrays and tensors of many layouts, single and in lists, with and without grayscale: same result or both
    refuse (no resize or normalize, so the layout rules are what is compared)."""
    shapes = [(6, 7), (6, 7, 1), (6, 7, 3), (2, 6, 7), (1, 6, 7), (3, 6, 7), (1, 6, 7, 3), (2, 1, 6, 7), (2, 3, 6, 7)]
    for gray, kind, shape, wrap in itertools.product([False, True], ["np", "pt"], shapes, ["single", "one", "two"]):
        image = arr(*shape) if kind == "np" else ten(*shape)
        value = image if wrap == "single" else [image] if wrap == "one" else [image, image * 0.5]
        config = {"do_convert_grayscale": gray, "do_resize": False, "do_normalize": False}
        compare_method("preprocess", config, value, check_warnings=False)


def test_pil_images_of_different_classes_mix_in_a_list(tmp_path):
    pil(16, 16).save(tmp_path / "a.png")
    with PIL.Image.open(tmp_path / "a.png") as loaded:
        compare_method("preprocess", {}, [loaded, pil(16, 16, seed=1)])


def test_configs_saved_by_either_library_load_in_the_other(tmp_path):
    VaeImageProcessor(vae_scale_factor=16, do_binarize=True).save_config(tmp_path / "ours")
    ref = RefProcessor.from_config(RefProcessor.load_config(tmp_path / "ours"))
    assert (ref.config.vae_scale_factor, ref.config.do_binarize) == (16, True)
    RefMaskProcessor(do_binarize=False).save_config(tmp_path / "ref")
    ours = IPAdapterMaskProcessor.from_config(IPAdapterMaskProcessor.load_config(tmp_path / "ref"))
    assert (ours.config.do_binarize, ours.config.do_convert_grayscale) == (False, True)


# ---------------------------------------------------------------------- deliberate differences
def test_deliberate_differences_from_the_reference():
    """Where the reference silently does something unhelpful, ours refuses clearly or does the documented thing."""
    ours, ref = processors()
    # an unknown resize_mode is ignored by the reference for arrays and tensors; ours refuses it for every input
    assert ref.preprocess(PT_X, resize_mode="stretch").shape == (2, 3, 24, 32)
    with pytest.raises(ImageInputError, match="resize_mode must be one of"):
        ours.preprocess(PT_X, resize_mode="stretch")
    # a 2-D array: the reference makes one 1-pixel-high image per row; ours asks for (H, W, C)
    assert len(RefProcessor.numpy_to_pil(arr(4, 5))) == 4
    with pytest.raises(ImageInputError, match=r"\(H, W, C\)"):
        VaeImageProcessor.numpy_to_pil(arr(4, 5))
    # resize of a list: the reference hands the list back untouched; ours refuses it
    assert isinstance(ref.resize([pil(8, 8)], 4, 4), list)
    with pytest.raises(ImageInputError, match="resize expects"):
        ours.resize([pil(8, 8)], 4, 4)
    # fill/crop to a size of 0 (a size under vae_scale_factor): the reference returns an empty image
    plain, ref_plain = processors({"do_normalize": False})
    assert ref_plain.preprocess(pil(37, 29), height=38, width=7, resize_mode="crop").shape == (1, 3, 32, 0)
    with pytest.raises(ImageInputError, match="above 0"):
        plain.preprocess(pil(37, 29), height=38, width=7, resize_mode="crop")
    # a (4, W) tensor passes the reference as a 3-D "latent"; ours asks for the channel dimension
    assert ref.preprocess(ten(4, 45)).shape == (1, 4, 45)
    with pytest.raises(ImageInputError, match="channel dimension"):
        ours.preprocess(ten(4, 45))
