"""bf16/fp16 on CPUs without instructions for them: heavy kernels run on the fp32 upcast.

What must hold: the upcast kernel equals PyTorch's fp32 kernel on the same (exactly upcast) inputs,
rounded once; fp32 work and mixed-dtype calls are untouched; the switch works both ways; models and
pipelines enter the mode only for low-precision CPU weights; and a bf16 pipeline stays within the
reference's own bf16 result.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffpipe
from diffpipe.runtime import cpu_kernels
from diffpipe.runtime.cpu_kernels import Float32Kernels, float32_kernels_for, upcast_wanted
from sd_factory import save_reference_pipeline


@pytest.fixture
def always(monkeypatch):
    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "1")


def _modes():
    return [m for m in torch.overrides._get_current_function_mode_stack() if isinstance(m, Float32Kernels)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_compute_on_the_exact_upcast_and_round_once(always, dtype):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((2, 8, 9, 9), (6, 8, 3, 3), (6,)))
    h, lw = torch.randn(3, 5, 8, generator=g).to(dtype), torch.randn(7, 8, generator=g).to(dtype)
    expected = {
        "conv2d": F.conv2d(x.float(), w.float(), b.float(), padding=1).to(dtype),
        "linear": F.linear(h.float(), lw.float()).to(dtype),
        "bmm": torch.bmm(h.float(), h.float().transpose(1, 2)).to(dtype),
        "matmul": (h.float() @ lw.float().T).to(dtype),
        "baddbmm": torch.baddbmm(torch.zeros(3, 5, 5), h.float(), h.float().transpose(1, 2), beta=0).to(dtype),
        "einsum": torch.einsum("bid,jd->bij", h.float(), lw.float()).to(dtype),
    }
    with Float32Kernels():
        got = {
            "conv2d": F.conv2d(x, w, b, padding=1),
            "linear": F.linear(h, lw),
            "bmm": torch.bmm(h, h.transpose(1, 2)),
            "matmul": h @ lw.T,
            "baddbmm": torch.baddbmm(torch.zeros(3, 5, 5, dtype=dtype), h, h.transpose(1, 2), beta=0),
            "einsum": torch.einsum("bid,jd->bij", h, lw),
        }
    for name in expected:
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], expected[name]), name


def test_fp32_and_mixed_dtype_calls_are_left_to_pytorch(always):
    a = torch.randn(4, 4)
    with Float32Kernels():
        assert torch.equal(a @ a, torch.mm(a, a))  # fp32 as it was
        with pytest.raises(RuntimeError):  # PyTorch's own error for a dtype mix, not a silent fix
            F.linear(a, a.bfloat16())


def test_the_switch(monkeypatch):
    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "0")
    assert not upcast_wanted(torch.bfloat16)
    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "1")
    assert upcast_wanted(torch.bfloat16) and upcast_wanted(torch.float16)
    assert not upcast_wanted(torch.float32)
    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "auto")
    native = cpu_kernels._cpu_has_native(torch.bfloat16)
    assert upcast_wanted(torch.bfloat16) is (not native)


def test_the_mode_is_entered_only_for_low_precision_cpu_weights(always):
    fp32, bf16 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).bfloat16()
    with float32_kernels_for(fp32):
        assert not _modes()
    with float32_kernels_for(fp32, bf16):
        assert len(_modes()) == 1
        with float32_kernels_for(bf16):  # nested: not entered twice
            assert len(_modes()) == 1
    assert not _modes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("bf16") / "sd", safety_checker=False, seed=5)


def _run(pipe, seen=None):
    def look(p, step, t, kwargs):
        if seen is not None:
            seen.append(len(_modes()))
        return kwargs

    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of a cat",
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=look,
    ).images.astype(np.float64)


def test_a_bf16_pipeline_upcasts_and_matches_the_references_bf16(folder, monkeypatch):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    reference = ref(
        "a photo of a cat",
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images.astype(np.float64)

    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "0")  # PyTorch's bf16 kernels, as the reference
    seen: list[int] = []
    native = _run(ours, seen)
    assert seen and set(seen) == {0}
    assert np.abs(native - reference).max() <= 2 / 255

    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "1")
    seen.clear()
    upcast = _run(ours, seen)
    assert seen and set(seen) == {1}
    assert not _modes()  # left when the call returns
    # Summation order differs from PyTorch's bf16 kernels, and bf16 keeps 8 bits: pixels may differ by
    # a few bf16 steps. The bar: as close to the fp32 image as the reference's bf16 is, and close to it.
    full = _run(diffpipe.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32))
    err_upcast, err_reference = (float(np.sqrt(np.mean((im - full) ** 2))) for im in (upcast, reference))
    print(f"RMS error against fp32: upcast kernels {err_upcast:.5f}, reference bf16 {err_reference:.5f}")
    assert err_upcast <= 1.25 * err_reference
    assert psnr(upcast, reference) >= 40


def psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-20)))


def test_model_calls_and_vae_decode_use_the_mode(folder, always):
    unet = diffpipe.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.bfloat16)
    vae = diffpipe.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.bfloat16)
    seen = []
    unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(("unet", len(_modes()))))
    vae.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(("vae", len(_modes()))))
    x = torch.randn(1, unet.config.in_channels, 8, 8, dtype=torch.bfloat16)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        out = unet(x, 10, encoder_hidden_states=context).sample
        image = vae.decode(torch.randn(1, vae.config.latent_channels, 8, 8, dtype=torch.bfloat16)).sample
    assert seen == [("unet", 1), ("vae", 1)]
    assert out.dtype == image.dtype == torch.bfloat16
    assert not _modes()


def test_scratch_is_reused_and_large_operands_are_not_kept(always, monkeypatch):
    h, w = torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    mode = Float32Kernels()
    with mode:
        first = F.linear(h, w)
        kept = [t.data_ptr() for t in mode._scratch]
        second = F.linear(h, w)
    assert len(kept) == 2 and [t.data_ptr() for t in mode._scratch] == kept  # the same memory again
    assert torch.equal(first, second) and torch.equal(first, F.linear(h.float(), w.float()).bfloat16())

    monkeypatch.setattr(cpu_kernels, "_SCRATCH_MAX_ELEMENTS", 16)  # the 32-element weight is "large"
    mode = Float32Kernels()
    with mode:
        out = F.linear(h, w)
    assert [t.numel() for t in mode._scratch] == [16]  # only the 16-element input was kept
    assert torch.equal(out, first)


def test_models_offloaded_to_an_accelerator_need_no_mode(always, folder):
    from diffpipe.pipelines.offload import OffloadGroup, attach, attach_sequential
    from diffpipe.runtime.hooks import OFFLOAD, get_hook, remove_hook

    waiting = torch.nn.Linear(4, 4).bfloat16()  # bf16 on the CPU, but it will run on the accelerator
    attach(OffloadGroup(torch.device("cuda")), "unet", waiting)
    assert get_hook(waiting, OFFLOAD).device == torch.device("cuda")
    with float32_kernels_for(waiting):
        assert not _modes()
    remove_hook(waiting, OFFLOAD)
    with float32_kernels_for(waiting):  # back to a plain CPU model
        assert len(_modes()) == 1
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 4)).bfloat16()
    attach_sequential(sequential, torch.device("cuda"), torch.device("cpu"))
    with float32_kernels_for(sequential):
        assert not _modes()

    # offload whose "accelerator" is the CPU itself still computes through the mode
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe.enable_model_cpu_offload(device="cpu")
    seen: list[int] = []
    _run(pipe, seen)
    assert seen and set(seen) == {1}
