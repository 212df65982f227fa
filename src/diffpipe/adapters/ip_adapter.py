"""IP-Adapter: an image prompt next to the text prompt (Ye et al. 2023, arXiv:2308.06721).

A CLIP vision encoder embeds the image; an *image projection* turns that embedding into a few
tokens of the UNet's cross-attention width; every cross-attention layer of the UNet then attends to
those tokens with its own key/value projections (``to_k_ip``, ``to_v_ip``) and adds the result,
times a scale, to its text attention.

The published checkpoints (``h94/IP-Adapter``) hold ``{"image_proj": {...}, "ip_adapter": {...}}``
(a ``.bin`` pickle, read with ``weights_only=True``) or the same flattened with those prefixes (a
``.safetensors`` file). Which projection a file holds is read from its keys:

- plain (``proj.weight``): a linear map to N tokens and a LayerNorm;
- plus (``latents``, ``layers.*``): a perceiver resampler over the encoder's penultimate hidden states;
- full-face (``proj.0`` .. ``proj.3``): an MLP over every hidden-state token.

Loaded, the UNet holds the projections as ``encoder_hid_proj`` (a :class:`MultiIPAdapterImageProjection`,
``config.encoder_hid_dim_type == "ip_image_proj"``) and :class:`IPAdapterAttnProcessor` modules in its
cross-attention layers; module and parameter names are the reference's, so ``unet.state_dict()``
reads the same. The UNet's forward projects ``added_cond_kwargs["image_embeds"]`` and hands the
processors ``(text states, [image tokens per adapter])``.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, StateDictMismatchError, summarize
from ..nn.attention import Attention
from ..runtime.hooks import ModuleHook, add_hook, get_hook, remove_hook
from .ip_attention import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0  # noqa: F401  (re-exported)
from .ip_projection import (
    ImageProjection,
    IPAdapterFullImageProjection,
    MultiIPAdapterImageProjection,
    build_image_projection,
    load_strict,
)

logger = logging.getLogger(__name__)

IP_PROJECTION = "ip_image_proj"  # the UNet config's encoder_hid_dim_type while an IP-Adapter is loaded
_HOOK = "ip_adapter"  # on the UNet (a motion UNet's image UNet): the processors the adapter replaced
# UNets whose IP-Adapter was unloaded, for a clearer error later; kept beside the modules, not on them,
# so that unloading leaves a UNet exactly as it was before loading
_UNLOADED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


# ----------------------------------------------------------------------------------- checkpoint format
def split_flat_ip_state(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj.x": t, "ip_adapter.y": t}`` (the safetensors layout) -> the nested layout."""
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    other = []
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part in nested and rest:
            nested[part][rest] = value
        else:
            other.append(key)
    if other:
        logger.warning(
            "%s: ignoring %d key(s) outside image_proj./ip_adapter.: %s", where, len(other), summarize(other)
        )
    return nested


def check_ip_state(state: Any, where: str) -> dict[str, dict[str, torch.Tensor]]:
    """The published layout, or a clear error saying what the file holds instead."""
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in ("image_proj", "ip_adapter")):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise StateDictMismatchError(
            f"{where}: not an IP-Adapter checkpoint: expected the keys 'image_proj' and 'ip_adapter' (each a dict "
            f"of tensors), found {found}"
        )
    for part in ("image_proj", "ip_adapter"):
        bad = [k for k, v in state[part].items() if not torch.is_tensor(v)]
        if bad or not state[part]:
            raise StateDictMismatchError(f"{where}: '{part}' must be a non-empty dict of tensors (bad: {bad[:5]})")
    return state


# ----------------------------------------------------------------------------------- attaching to a UNet
def ip_host(unet: nn.Module) -> nn.Module:
    """The model that owns the cross-attention layers and the projection: a motion UNet's image UNet."""
    return getattr(unet, "unet2d", unet)


def cross_attention_layers(host: nn.Module) -> list[tuple[str, Attention]]:
    """(processor name, layer) of every cross-attention layer, in ``attn_processors`` order (the order
    the published checkpoints number their ``to_k_ip`` weights in: 1, 3, 5, ...)."""
    return [
        (f"{name}.processor", module)
        for name, module in host.named_modules()
        if isinstance(module, Attention) and not name.endswith("attn1") and "motion_modules" not in name
    ]


def attach(unet: nn.Module, states: list[dict[str, dict[str, torch.Tensor]]], where: str) -> None:
    """Put the adapters in ``states`` into ``unet`` (replacing any loaded before), checking every shape."""
    host = ip_host(unet)
    layers = cross_attention_layers(host)
    projections, tokens = [], []
    for i, state in enumerate(states):
        label = where if len(states) == 1 else f"{where} (adapter {i})"
        projection, n = build_image_projection(state["image_proj"], label)
        projections.append(projection)
        tokens.append(n)
        expected = {f"{2 * j + 1}.{w}.weight" for j in range(len(layers)) for w in ("to_k_ip", "to_v_ip")}
        found = {k for k in state["ip_adapter"] if k.endswith(("to_k_ip.weight", "to_v_ip.weight"))}
        if found != expected:
            lora = [k for k in state["ip_adapter"] if "_lora." in k]
            if lora:
                raise NotImplementedError(
                    f"{label}: IP-Adapter FaceID LoRA weights ({lora[0]}, ...) are not implemented in diffpipe"
                )
            raise StateDictMismatchError(
                f"{label}: the IP-Adapter has key/value weights for {len(found) // 2} cross-attention layers "
                f"({summarize(sorted(found, key=_layer_number))}), this UNet has {len(layers)} (expected "
                f"{summarize(sorted(expected, key=_layer_number))}); the adapter was made for another UNet"
            )
    width = _projection_width(projections[0])
    processors = {}
    for j, (name, layer) in enumerate(layers):
        if layer.cross_attention_dim != width:
            raise StateDictMismatchError(
                f"{where}: the image projection makes tokens of width {width} but {name} attends to width "
                f"{layer.cross_attention_dim}; the adapter was made for another UNet"
            )
        proc = IPAdapterAttnProcessor(
            hidden_size=layer.to_k.out_features, cross_attention_dim=width, num_tokens=tokens, scale=1.0
        )
        weights = {}
        for i, state in enumerate(states):
            for w in ("to_k_ip", "to_v_ip"):
                weights[f"{w}.{i}.weight"] = state["ip_adapter"][f"{2 * j + 1}.{w}.weight"]
        load_strict(proc, weights, f"{where}: ip_adapter layer {2 * j + 1} ({name})")
        processors[name] = proc
    ref = next(host.parameters())
    multi = MultiIPAdapterImageProjection(projections).to(device=ref.device, dtype=ref.dtype)
    hook = get_hook(host, _HOOK)
    if hook is None:
        hook = add_hook(host, _HOOK, IPAdapterHook({name: layer.processor for name, layer in layers}, unet))
    for name, layer in layers:
        layer.set_processor(processors[name].to(device=ref.device, dtype=ref.dtype))
    if host.encoder_hid_proj is not None and host.config.get("encoder_hid_dim_type") == "text_proj":
        host.text_encoder_hid_proj = host.encoder_hid_proj  # a text projection (Kolors) keeps working
    _set_projection(unet, multi, IP_PROJECTION)
    _UNLOADED.discard(host)


class IPAdapterHook(ModuleHook):
    """On the UNet while an IP-Adapter is loaded: the attention processors it replaced, put back (with
    the projection taken out) when the hook is removed."""

    def __init__(self, previous: dict, unet: nn.Module):
        self.previous = previous
        self.unet = unet

    def on_remove(self, host: nn.Module) -> None:
        for name, layer in cross_attention_layers(host):
            if isinstance(layer.processor, IPAdapterAttnProcessor):
                previous = self.previous.get(name)
                if previous is None or isinstance(previous, IPAdapterAttnProcessor):
                    previous = _default_processor()
                layer.set_processor(previous)
        text_proj = host.__dict__.get("_modules", {}).get("text_encoder_hid_proj")
        if text_proj is not None:
            del host._modules["text_encoder_hid_proj"]
            _set_projection(self.unet, text_proj, "text_proj")
            return
        _set_projection(self.unet, None, None)
        for model in {id(m): m for m in (self.unet, host)}.values():
            # no projection before: a plain attribute again, not an empty module slot
            if model._modules.get("encoder_hid_proj", 0) is None:
                del model._modules["encoder_hid_proj"]
                object.__setattr__(model, "encoder_hid_proj", None)


def detach(unet: nn.Module) -> None:
    """Take the IP-Adapter out of ``unet``: previous processors back, projection gone."""
    host = ip_host(unet)
    remove_hook(host, _HOOK)
    _UNLOADED.add(host)


def _default_processor():
    from ..nn.attention import AttnProcessor

    return AttnProcessor()


def _set_projection(unet: nn.Module, module: nn.Module | None, kind: str | None) -> None:
    for model in {id(m): m for m in (unet, ip_host(unet))}.values():
        model.encoder_hid_proj = module
        model.register_to_config(encoder_hid_dim_type=kind)


def _projection_width(projection: nn.Module) -> int:
    if isinstance(projection, ImageProjection):
        return projection.norm.normalized_shape[0]
    if isinstance(projection, IPAdapterFullImageProjection):
        return projection.norm.normalized_shape[0]
    return projection.norm_out.normalized_shape[0]


def _layer_number(key: str) -> tuple[int, str]:
    head = key.split(".", 1)[0]
    return (int(head), key) if head.isdigit() else (1 << 30, key)


def loaded_projection(unet: nn.Module) -> MultiIPAdapterImageProjection | None:
    host = ip_host(unet)
    proj = getattr(host, "encoder_hid_proj", None)
    return proj if isinstance(proj, MultiIPAdapterImageProjection) else None


def require_loaded(unet: nn.Module, what: str) -> MultiIPAdapterImageProjection:
    """The loaded projection, or an error that says why there is none (never loaded, or unloaded)."""
    proj = loaded_projection(unet)
    if proj is not None:
        return proj
    if ip_host(unet) in _UNLOADED:
        raise ValueError(
            f"{what} needs an IP-Adapter, but the IP-Adapter of this pipeline's UNet was unloaded "
            "(unload_ip_adapter() was called on this pipeline or on another pipeline sharing the UNet, e.g. one "
            "made with from_pipe). Load it again with load_ip_adapter(...)."
        )
    raise ValueError(
        f"{what} needs an IP-Adapter, and none is loaded: call pipe.load_ip_adapter(repo, "
        "subfolder=..., weight_name=...) first"
    )


# ----------------------------------------------------------------------------------- scales
def layer_scales(unet: nn.Module, config, *, default: float, what: str) -> float | dict[str, float]:
    """A scale config -> a number, or ``{attention block prefix: scale}`` for every attention block.

    ``config`` is a number, or a dict with ``"down"``, ``"mid"``, ``"up"`` entries, each a number (all
    blocks), or for down/up a dict ``{"block_<i>": number or [one per transformer]}``. Blocks the
    dict leaves out get ``default``. Prefixes are ``down_blocks.<i>.attentions.<j>`` and
    ``mid_block.attentions.0``.
    """
    if isinstance(config, bool) or not isinstance(config, (int, float, dict)):
        raise TypeError(f"{what}: a scale is a number or a dict with 'down'/'mid'/'up' entries, got {config!r}")
    if not isinstance(config, dict):
        return float(config)
    unknown = sorted(set(config) - {"down", "mid", "up"})
    if unknown:
        raise ValueError(f"{what}: scale dict keys must be 'down', 'mid' and 'up'; got {unknown}")
    host = ip_host(unet)
    out: dict[str, float] = {}
    for side, blocks in (("down", host.down_blocks), ("up", host.up_blocks)):
        with_attention = {i: len(b.attentions) for i, b in enumerate(blocks) if getattr(b, "attentions", None)}
        value = config.get(side, default)
        if not isinstance(value, dict):
            value = {f"block_{i}": value for i in with_attention}
        bad = sorted(
            k for k in value if not (k.startswith("block_") and k[6:].isdigit() and int(k[6:]) in with_attention)
        )
        if bad:
            raise ValueError(
                f"{what}: {side} has no attention block(s) {bad}; the {side} blocks with attention "
                f"are {[f'block_{i}' for i in with_attention]}"
            )
        for i, n in with_attention.items():
            per = value.get(f"block_{i}", default)
            per = list(per) if isinstance(per, (list, tuple)) else [per] * n
            if len(per) == 1:
                per = per * n
            if len(per) != n:
                raise ValueError(f"{what}: {side}.block_{i} has {n} transformers; got {len(per)} scales")
            for j, s in enumerate(per):
                out[f"{side}_blocks.{i}.attentions.{j}"] = _number(s, what)
    mid = config.get("mid", default)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise ValueError(f"{what}: mid takes one scale, got {len(mid)}")
        mid = mid[0]
    if getattr(getattr(host, "mid_block", None), "attentions", None):
        out["mid_block.attentions.0"] = _number(mid, what)
    return out


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: scales must be numbers, got {value!r}")
    return float(value)


def scale_for(layer_name: str, scales: float | dict[str, float], default: float) -> float:
    if not isinstance(scales, dict):
        return scales
    for prefix, value in scales.items():
        if layer_name.startswith(prefix + "."):
            return value
    return default


def set_scales(unet: nn.Module, scale, what: str = "set_ip_adapter_scale") -> None:
    """``scale`` (one config, or a list with one per adapter) onto every IP-Adapter processor."""
    configs = list(scale) if isinstance(scale, list) else [scale]
    host = ip_host(unet)
    expanded = [_adapter_scale(host, c, what) for c in configs]
    for name, layer in cross_attention_layers(host):
        proc = layer.processor
        if not isinstance(proc, IPAdapterAttnProcessor):
            continue
        if len(expanded) == 1:
            expanded = expanded * len(proc.scale)
        if len(expanded) != len(proc.scale):
            raise ValueError(
                f"{what}: {len(expanded)} scale configs for {len(proc.scale)} loaded IP-Adapters; pass "
                "one, or one per adapter"
            )
        proc.scale = [list(s) if isinstance(s, list) else scale_for(name, s, 0.0) for s in expanded]


def _adapter_scale(host: nn.Module, config, what: str):
    """One adapter's scale config: a list of numbers is one scale per image (for every layer; it needs
    ``ip_adapter_masks``), anything else goes through :func:`layer_scales`."""
    if isinstance(config, (list, tuple)) and config:
        return [_number(v, what) for v in config]
    return layer_scales(host, config, default=0.0, what=what)


def weight_file_state(path: Path, where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Read an IP-Adapter file (``.safetensors`` flat, anything else a ``weights_only`` pickle)."""
    from ..io.state_dict import load_pickle, load_safetensors

    if path.name.endswith(".safetensors"):
        return check_ip_state(split_flat_ip_state(load_safetensors(path), where), where)
    return check_ip_state(load_pickle(path, nested=True), where)


def check_config_free(unet: nn.Module, where: str) -> None:
    """Refuse UNets whose own encoder projection is of a kind an IP-Adapter cannot sit beside."""
    kind = ip_host(unet).config.get("encoder_hid_dim_type")
    if kind not in (None, "text_proj", IP_PROJECTION):
        raise ConfigError(
            f"{where}: the UNet has encoder_hid_dim_type={kind!r}; an IP-Adapter needs None or 'text_proj'"
        )


# ----------------------------------------------------------------------------------- pipeline methods
class IPAdapterMixin:
    """``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` and the image-embedding
    stage for pipelines with a ``unet`` (and ``image_encoder`` / ``feature_extractor`` components)."""

    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict,
        subfolder,
        weight_name,
        image_encoder_folder: str | None = "image_encoder",
        *,
        cache_dir=None,
        local_files_only: bool | None = None,
        token=None,
        revision: str | None = None,
        **kwargs,
    ) -> None:
        """Load one IP-Adapter, or several (lists of equal length), into the UNet, replacing any loaded.

        ``pretrained_model_name_or_path_or_dict``: a Hub repo id or local folder (the weights are
        ``subfolder/weight_name``, a ``.bin`` or ``.safetensors`` file), or a state dict
        ``{"image_proj": ..., "ip_adapter": ...}``. If the pipeline has no ``image_encoder`` yet, the
        ``CLIPVisionModelWithProjection`` in ``image_encoder_folder`` (inside ``subfolder`` unless it
        contains a ``/``) is loaded and registered; ``None`` skips it (then pass
        ``ip_adapter_image_embeds=`` when calling). A missing ``feature_extractor`` is created.
        Everything is checked before the pipeline changes.
        """
        from .source import check_kwargs, fetch_files, load_image_encoder

        check_kwargs(kwargs, "load_ip_adapter")
        sources, subfolders, names = _as_lists(pretrained_model_name_or_path_or_dict, subfolder, weight_name)
        if getattr(self, "unet", None) is None:
            raise ValueError(f"{type(self).__name__} has no unet to load an IP-Adapter into")
        check_config_free(self.unet, "load_ip_adapter")
        wants_encoder = "image_encoder" in type(self).component_names() and getattr(self, "image_encoder", None) is None
        encoder, states = None, []
        for source, sub, name in zip(sources, subfolders, names):
            if isinstance(source, dict):
                where = "load_ip_adapter(state dict)"
                states.append(check_ip_state(source, where))
                if wants_encoder and encoder is None and image_encoder_folder is not None:
                    raise ValueError(
                        "load_ip_adapter: the image encoder cannot be loaded from a state dict; pass "
                        "image_encoder_folder=None (and ip_adapter_image_embeds= when calling), or give the pipeline "
                        "an image_encoder first"
                    )
                continue
            encoder_folder = None
            if wants_encoder and encoder is None and image_encoder_folder is not None:
                encoder_folder = (
                    image_encoder_folder
                    if "/" in image_encoder_folder
                    else f"{sub}/{image_encoder_folder}"
                    if sub
                    else image_encoder_folder
                )
            root, weight_path, where = fetch_files(
                source,
                sub,
                name,
                encoder_folder,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
                revision=revision,
            )
            states.append(weight_file_state(weight_path, where))
            if encoder_folder is not None:
                encoder = load_image_encoder(root, encoder_folder, dtype=self.dtype, device=self.device, where=where)
        attach(self.unet, states, f"load_ip_adapter({_describe(sources, subfolders, names)})")
        if wants_encoder and encoder is None and image_encoder_folder is None:
            logger.warning(
                "load_ip_adapter: no image encoder loaded (image_encoder_folder=None), so calls need "
                "ip_adapter_image_embeds= instead of ip_adapter_image="
            )
        if encoder is not None:
            self.register_modules(image_encoder=encoder)
        if "feature_extractor" in type(self).component_names() and getattr(self, "feature_extractor", None) is None:
            from transformers import CLIPImageProcessor

            image_encoder = getattr(self, "image_encoder", None)
            size = image_encoder.config.image_size if image_encoder is not None else 224
            self.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))

    def set_ip_adapter_scale(self, scale) -> None:
        """How strongly the image prompt counts: a number for every layer, a dict per block
        (``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}``, blocks left out get
        0), or a list with one such config per loaded adapter."""
        require_loaded(self.unet, "set_ip_adapter_scale")
        set_scales(self.unet, scale)

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapter from the UNet (and so from every pipeline sharing it) and this pipeline's
        image encoder; the feature extractor stays when a safety checker uses it."""
        require_loaded(self.unet, "unload_ip_adapter")
        detach(self.unet)
        if getattr(self, "image_encoder", None) is not None:
            self.register_modules(image_encoder=None)
        keeps_extractor = "safety_checker" in type(self).component_names()
        if not keeps_extractor and getattr(self, "feature_extractor", None) is not None:
            self.register_modules(feature_extractor=None)

    # ------------------------------------------------------------------ image embeddings
    def encode_image(self, image, device, num_images_per_prompt: int, output_hidden_states: bool | None = None):
        """(image embeddings, unconditional ones) from the image encoder: its projected embedding and
        zeros, or (``output_hidden_states``) its penultimate hidden states for the image and for a black
        image; each repeated ``num_images_per_prompt`` times."""
        encoder = self.image_encoder
        dtype = next(encoder.parameters()).dtype
        if not torch.is_tensor(image):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=dtype)
        if output_hidden_states:
            states = encoder(image, output_hidden_states=True).hidden_states[-2]
            blank = encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
            return (
                states.repeat_interleave(num_images_per_prompt, dim=0),
                blank.repeat_interleave(num_images_per_prompt, dim=0),
            )
        embeds = encoder(image).image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, torch.zeros_like(embeds)

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image,
        ip_adapter_image_embeds,
        device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ):
        """One tensor per adapter, ``[images, n, ...]`` repeated for ``num_images_per_prompt`` (the
        whole batch), with the unconditional embeddings first under classifier-free guidance.
        ``ip_adapter_image_embeds``, if given, are in that layout already (negative half first under
        guidance) and are only repeated."""
        positives, negatives = [], []
        if ip_adapter_image_embeds is None:
            images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
            projections = require_loaded(self.unet, "ip_adapter_image").image_projection_layers
            if len(images) != len(projections):
                raise ValueError(
                    f"ip_adapter_image has {len(images)} entries but {len(projections)} IP-Adapters are "
                    "loaded; pass one image (or one list of images) per adapter"
                )
            for image, projection in zip(images, projections):
                pos, neg = self.encode_image(image, device, 1, not isinstance(projection, ImageProjection))
                positives.append(pos[None])
                negatives.append(neg[None])
        else:
            for embeds in ip_adapter_image_embeds:
                if do_classifier_free_guidance:
                    neg, embeds = embeds.chunk(2)
                    negatives.append(neg)
                positives.append(embeds)
        out = []
        for i, pos in enumerate(positives):
            pos = torch.cat([pos] * num_images_per_prompt)
            if do_classifier_free_guidance:
                pos = torch.cat([torch.cat([negatives[i]] * num_images_per_prompt), pos])
            out.append(pos.to(device=device))
        return out

    def _check_image_prompt(self, ip_adapter_image, ip_adapter_image_embeds, cfg: bool) -> None:
        """The image-prompt arguments of a call against the loaded IP-Adapters (``cfg``: the call runs
        classifier-free guidance)."""
        projection = loaded_projection(self.unet)
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            if projection is not None:
                raise ValueError(
                    "this pipeline's UNet has an IP-Adapter loaded: pass ip_adapter_image= (or "
                    "ip_adapter_image_embeds=), or remove it with unload_ip_adapter()"
                )
            return
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("pass either ip_adapter_image= or ip_adapter_image_embeds=, not both")
        projection = require_loaded(
            self.unet, "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
        )
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list) or not all(
                torch.is_tensor(e) and e.ndim in (3, 4) for e in ip_adapter_image_embeds
            ):
                raise ValueError(
                    "ip_adapter_image_embeds must be a list of 3-d or 4-d tensors, one per IP-Adapter "
                    "([batch, images, dim] or [batch, images, tokens, dim]); got "
                    f"{ip_adapter_image_embeds!r:.80}"
                )
            if len(ip_adapter_image_embeds) != projection.num_ip_adapters:
                raise ValueError(
                    f"ip_adapter_image_embeds has {len(ip_adapter_image_embeds)} tensors for "
                    f"{projection.num_ip_adapters} loaded IP-Adapters"
                )
            if cfg and any(e.shape[0] % 2 for e in ip_adapter_image_embeds):
                raise ValueError(
                    "under classifier-free guidance ip_adapter_image_embeds hold the negative half first "
                    "and the positive half second, so their batch must be even"
                )
        elif getattr(self, "image_encoder", None) is None:
            raise ValueError(
                "ip_adapter_image needs an image_encoder (the IP-Adapter was loaded with "
                "image_encoder_folder=None): pass ip_adapter_image_embeds= instead"
            )


def _as_lists(sources, subfolders, names):
    names = list(names) if isinstance(names, (list, tuple)) else [names]
    sources = list(sources) if isinstance(sources, list) else [sources]
    subfolders = list(subfolders) if isinstance(subfolders, (list, tuple)) else [subfolders]
    if len(sources) == 1:
        sources = sources * len(names)
    if len(subfolders) == 1:
        subfolders = subfolders * len(names)
    if not (len(sources) == len(names) == len(subfolders)):
        raise ValueError(
            f"load_ip_adapter: {len(sources)} sources, {len(subfolders)} subfolders and {len(names)} "
            "weight names; pass one of each, or lists of the same length"
        )
    for name, source in zip(names, sources):
        if not isinstance(source, dict) and not isinstance(name, str):
            raise TypeError(f"load_ip_adapter: weight_name must be a file name, got {name!r}")
    return sources, subfolders, names


def _describe(sources, subfolders, names) -> str:
    return ", ".join(
        "state dict" if isinstance(s, dict) else f"{s}/{sub + '/' if sub else ''}{n}"
        for s, sub, n in zip(sources, subfolders, names)
    )
