"""The hook registry: the one way behaviour is attached to modules (LoRA, IP-Adapter, offload, SAG's
capture), and taking it all off again leaves every module exactly as it was."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import torch

import diffpipe
from adapter_factory import ip_adapter_state, lora_pairs, peft_lora, tiny_image_encoder, write_ip_repo
from diffpipe.runtime.hooks import ModuleHook, add_hook, get_hook, hooks_named, remove_all_hooks, remove_hook
from sd_factory import save_reference_pipeline


class Double(ModuleHook):
    def __init__(self):
        self.removed = 0

    def post_forward(self, module, args, kwargs, output):
        return output * 2

    def on_remove(self, module):
        self.removed += 1


class AddOne(ModuleHook):
    def pre_forward(self, module, args, kwargs):
        return (args[0] + 1,), kwargs


class StateOnly(ModuleHook):
    pass


def fingerprint(module: torch.nn.Module) -> dict:
    """What must be the same before attaching and after removing: attributes, torch hooks, weights."""
    out = {}
    for path, m in module.named_modules():
        out[path] = (
            sorted(m.__dict__),
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._forward_hooks_with_kwargs),
            len(m._forward_pre_hooks_with_kwargs),
            sorted(m._modules),
            type(getattr(m, "processor", None)).__name__,
        )
    out["state"] = {k: v.clone() for k, v in module.state_dict().items()}
    return out


def assert_same(before: dict, after: dict) -> None:
    assert sorted(before) == sorted(after)
    for key in before:
        if key == "state":
            assert sorted(before[key]) == sorted(after[key])
            assert all(torch.equal(before[key][k], after[key][k]) for k in before[key])
        else:
            assert before[key] == after[key], key


def test_hooks_run_in_order_and_removing_them_restores_the_module():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain, before = layer(x), fingerprint(layer)
    double = add_hook(layer, "double", Double())
    add_hook(layer, "add_one", AddOne())
    add_hook(layer, "state", StateOnly())
    assert torch.allclose(layer(x), layer.forward(x + 1) * 2)
    assert len(layer._forward_pre_hooks) == 1 and len(layer._forward_hooks) == 1  # one pair, whatever the count
    assert [n for n, _, _ in hooks_named(layer, "double")] == [""]
    add_hook(layer, "double", Double())  # same name: the first is removed
    assert double.removed == 1
    remove_hook(layer, "add_one")
    remove_hook(layer, "nothing")  # absent: no error
    assert torch.allclose(layer(x), plain * 2)
    remove_all_hooks(layer)
    assert get_hook(layer, "double") is None
    assert torch.equal(layer(x), plain)
    assert_same(before, fingerprint(layer))


def test_a_state_only_hook_adds_no_torch_hook():
    layer = torch.nn.Linear(2, 2)
    add_hook(layer, "state", StateOnly())
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    remove_hook(layer, "state")
    assert "_diffpipe_hooks" not in layer.__dict__


def test_every_adapter_and_offload_come_off_without_a_trace(tmp_path):
    """LoRA, IP-Adapter, model offload and a SAG call on one UNet; unload_lora_weights,
    unload_ip_adapter and remove_all_hooks leave the UNet (and the text encoder) bit-identical, and the
    images return to what they were."""
    import diffusers

    folder = save_reference_pipeline(tmp_path / "sd", safety_checker=False, seed=21)
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="np")

    def image(p, **extra):
        return p(generator=torch.Generator().manual_seed(0), **args, **extra).images

    plain = image(pipe)
    before = {name: fingerprint(getattr(pipe, name)) for name in ("unet", "text_encoder", "vae")}

    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    pairs = lora_pairs(ref_unet, ("to_q", "to_v", "conv1"), 2, torch.Generator().manual_seed(1), conv_too=True)
    pipe.load_lora_weights(peft_lora({"unet": pairs})[0], adapter_name="a")
    repo = write_ip_repo(tmp_path / "ip", {"ip.bin": ip_adapter_state(ref_unet)}, encoder=tiny_image_encoder())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_ip_adapter(str(repo), subfolder="models", weight_name="ip.bin")
    pipe.enable_model_cpu_offload(device="cpu")
    face = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    adapted = image(pipe, ip_adapter_image=face)
    sag = diffpipe.StableDiffusionSAGPipeline.from_pipe(pipe)
    sag.scheduler = diffpipe.DDIMScheduler.from_config(pipe.scheduler.config)
    sag.set_progress_bar_config(disable=True)
    image(sag, ip_adapter_image=face)
    assert np.abs(adapted - plain).max() > 0.01

    pipe.unload_lora_weights()
    pipe.unload_ip_adapter()
    pipe.remove_all_hooks()
    for name, fp in before.items():
        assert_same(fp, fingerprint(getattr(pipe, name)))
    np.testing.assert_array_equal(image(pipe), plain)
