"""UNetMotionModel: a Stable Diffusion UNet with AnimateDiff's motion modules, over ``[B, C, F, H, W]``.

The model is *assembled* from a :class:`UNet2DConditionModel` and the motion modules of a
:class:`MotionAdapter`: each of its blocks (:class:`MotionBlock`) registers the 2-D block's own
``resnets`` / ``attentions`` / ``downsamplers`` / ``upsamplers`` objects and the adapter's
``motion_modules`` object, and runs the 2-D block's forward with the motion modules as its per-layer
hook. Nothing is copied: :meth:`UNetMotionModel.from_unet2d` costs no memory beyond the adapter, the
2-D UNet keeps working unchanged for image pipelines, and the state-dict keys are the reference's
``UNetMotionModel`` keys, so ``save_pretrained`` writes the reference's format.

Built from a config (``from_pretrained`` of a saved motion UNet), it assembles a fresh 2-D UNet and
fresh motion modules the same way. Because the parts are shared, changing them in place (attention
processors, ``requires_grad``, dtype) changes them for every model and pipeline holding them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.attention import AttentionHostMixin
from ..nn.context_windows import ContextWindows, remove_splits, split_batches
from ..nn.memory import MemorySwitchesMixin
from ..adapters.lora_model import LoraModelMixin
from .freeu import FreeUMixin
from ..nn.transformer_2d import mask_to_bias
from .conditioning import check_text_time
from .modeling import ModelMixin
from .motion import MotionAdapter, MotionModules, motion_stacks, per_block
from .outputs import ModelOutput
from .unet_2d_blocks import UNetMidBlock2DCrossAttn
from .unet_2d_condition import UNet2DConditionModel
from .unet_body import unet_body

logger = logging.getLogger(__name__)


@dataclass
class UNetMotionOutput(ModelOutput):
    """``sample``: the prediction, ``[batch, out_channels, frames, height, width]``."""

    sample: torch.Tensor


# Motion block type -> the 2-D block type it is built around.
_SPATIAL_BLOCKS = {
    "CrossAttnDownBlockMotion": "CrossAttnDownBlock2D",
    "DownBlockMotion": "DownBlock2D",
    "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D",
    "UpBlockMotion": "UpBlock2D",
}
# What a 2-D UNet's config must say for the motion UNet's config to describe it (keys the reference's
# UNetMotionModel fixes rather than reads); absent keys take the listed value.
_FIXED_2D = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "num_class_embeds": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "only_cross_attention": False,
    "encoder_hid_dim_type": None,
}


class MotionBlock(nn.Module):
    """A UNet block with a motion module after each of its layers.

    Registers the 2-D block's children under their own names (so the keys are the 2-D block's) and
    ``motion_modules`` (None for the mid block of adapters without one); ``forward`` is the 2-D block's
    forward plus ``num_frames``.
    """

    def __init__(self, spatial: nn.Module, motion: MotionModules | None):
        super().__init__()
        object.__setattr__(self, "_spatial", spatial)  # not a submodule: its children are ours
        for name, child in spatial.named_children():
            self.add_module(name, child)
        for name in ("downsamplers", "upsamplers"):
            if hasattr(spatial, name) and name not in self._modules:
                setattr(self, name, None)
        self.has_cross_attention = getattr(spatial, "has_cross_attention", False)
        self.resolution_idx = getattr(spatial, "resolution_idx", None)
        self.motion_modules = None
        if motion is not None:
            # a mid block's layers are its (transformer, resnet) pairs after the first resnet
            layers = len(spatial.attentions) if isinstance(spatial, UNetMidBlock2DCrossAttn) else len(spatial.resnets)
            if len(motion.motion_modules) != layers:
                raise ValueError(
                    f"the motion adapter has {len(motion.motion_modules)} motion modules for a "
                    f"{type(spatial).__name__} with {layers} layers"
                )
            self.motion_modules = motion.motion_modules

    def forward(self, *args, num_frames: int = 1, after_layer=None, **kwargs):
        modules = self.motion_modules
        if modules is None:
            return self._spatial(*args, after_layer=after_layer, **kwargs)

        def motion_then(i, h):  # each layer's motion module, then the caller's hook (DeepCache's)
            h = modules[i](h, num_frames)
            return h if after_layer is None else after_layer(i, h)

        return self._spatial(*args, after_layer=motion_then, **kwargs)


class UNetMotionModel(ModelMixin, AttentionHostMixin, MemorySwitchesMixin, FreeUMixin, LoraModelMixin):
    """Denoiser for videos: ``sample`` ``[batch, channels, frames, height, width]``, text states per frame.

    Takes the reference's config keys. Build one from an image UNet with :meth:`from_unet2d` (shares
    its parameters) or load a saved one with ``from_pretrained``.
    """

    # what compile_repeated_blocks() / pipe.compile() compile one by one
    _repeated_blocks = ("ResnetBlock2D", "Transformer2DModel", "AnimateDiffTransformer3D")

    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlockMotion",
            "CrossAttnDownBlockMotion",
            "CrossAttnDownBlockMotion",
            "DownBlockMotion",
        ),
        up_block_types: Sequence[str] = (
            "UpBlockMotion",
            "CrossAttnUpBlockMotion",
            "CrossAttnUpBlockMotion",
            "CrossAttnUpBlockMotion",
        ),
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int | Sequence[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | Sequence = 1,
        reverse_transformer_layers_per_block: int | Sequence | None = None,
        temporal_transformer_layers_per_block: int | Sequence = 1,
        reverse_temporal_transformer_layers_per_block: int | Sequence | None = None,
        transformer_layers_per_mid_block: int | Sequence[int] | None = None,
        temporal_transformer_layers_per_mid_block: int | Sequence[int] | None = 1,
        use_linear_projection: bool = False,
        num_attention_heads: int | Sequence[int] = 8,
        motion_max_seq_length: int = 32,
        motion_num_attention_heads: int | Sequence[int] = 8,
        reverse_motion_num_attention_heads: int | Sequence | None = None,
        use_motion_mid_block: bool = True,
        mid_block_layers: int = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        n = len(down_block_types)
        if len(up_block_types) != n or len(block_out_channels) != n:
            raise ConfigError(
                f"UNetMotionModel: {n} down_block_types, {len(up_block_types)} up_block_types and "
                f"{len(block_out_channels)} block_out_channels; they must match"
            )
        bad = [t for t in (*down_block_types, *up_block_types) if t not in _SPATIAL_BLOCKS]
        if bad:
            raise ConfigError(f"UNetMotionModel: unknown block type(s) {bad}; expected {sorted(_SPATIAL_BLOCKS)}")
        layers = per_block("layers_per_block", layers_per_block, n)
        spatial_layers = (
            [transformer_layers_per_block] * n
            if isinstance(transformer_layers_per_block, int)
            else list(transformer_layers_per_block)
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=[_SPATIAL_BLOCKS[t] for t in down_block_types],
            up_block_types=[_SPATIAL_BLOCKS[t] for t in up_block_types],
            mid_block_type=None,
            block_out_channels=block_out_channels,
            layers_per_block=layers,
            downsample_padding=downsample_padding,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=spatial_layers,
            reverse_transformer_layers_per_block=reverse_transformer_layers_per_block,
            use_linear_projection=use_linear_projection,
            attention_head_dim=num_attention_heads,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type,
            addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            time_cond_proj_dim=time_cond_proj_dim,
        )
        if transformer_layers_per_mid_block is None:  # the reference's default
            transformer_layers_per_mid_block = spatial_layers[-1] if isinstance(spatial_layers[-1], int) else 1
        heads = per_block("num_attention_heads", num_attention_heads, n)
        cross = cross_attention_dim if isinstance(cross_attention_dim, int) else list(cross_attention_dim)[-1]
        unet.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=block_out_channels[0] * 4,
            num_layers=mid_block_layers,
            transformer_layers_per_block=transformer_layers_per_mid_block,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            output_scale_factor=mid_block_scale_factor,
            num_attention_heads=heads[-1],
            cross_attention_dim=cross,
            use_linear_projection=use_linear_projection,
        )
        temporal = (
            [temporal_transformer_layers_per_block] * n
            if isinstance(temporal_transformer_layers_per_block, int)
            else list(temporal_transformer_layers_per_block)
        )
        if reverse_temporal_transformer_layers_per_block is None:
            up_temporal = temporal[::-1]
        else:
            up_temporal = per_block(
                "reverse_temporal_transformer_layers_per_block", reverse_temporal_transformer_layers_per_block, n
            )
        down, mid, up = motion_stacks(
            block_out_channels,
            layers,
            temporal,
            up_temporal,
            per_block("motion_num_attention_heads", motion_num_attention_heads, n),
            norm_num_groups,
            motion_max_seq_length,
            (mid_block_layers, temporal_transformer_layers_per_mid_block) if use_motion_mid_block else None,
        )
        self._assemble(unet, down, mid, up)

    def _assemble(
        self,
        unet: UNet2DConditionModel,
        down: Sequence[MotionModules | None],
        mid: MotionModules | None,
        up: Sequence[MotionModules | None],
    ) -> None:
        """Register ``unet``'s modules and the motion modules as this model's (shared, not copied)."""
        object.__setattr__(self, "_unet2d", unet)
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.encoder_hid_proj = unet.encoder_hid_proj
        for name in ("add_time_proj", "add_embedding"):
            if hasattr(unet, name):
                setattr(self, name, getattr(unet, name))
        self.down_blocks = nn.ModuleList(MotionBlock(b, m) for b, m in zip(unet.down_blocks, down))
        self.up_blocks = nn.ModuleList(MotionBlock(b, m) for b, m in zip(unet.up_blocks, up))
        self.mid_block = MotionBlock(unet.mid_block, mid)
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out
        self.num_upsamplers = unet.num_upsamplers

    # ------------------------------------------------------------------ from a 2-D UNet
    @classmethod
    def from_unet2d(
        cls, unet: UNet2DConditionModel, motion_adapter: MotionAdapter | None = None, load_weights: bool = True
    ) -> "UNetMotionModel":
        """A motion UNet around ``unet``'s own parameters and ``motion_adapter``'s motion modules.

        Unlike the reference, nothing is copied: the result holds the same parameter objects as
        ``unet`` and ``motion_adapter`` (the adapter is moved to the UNet's device and dtype, in place,
        if it is elsewhere). Without an adapter the motion modules are new and randomly initialised;
        ``load_weights=False`` gives a model with new random weights throughout.
        """
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"UNetMotionModel.from_unet2d needs a UNet2DConditionModel, got {type(unet).__name__}")
        if motion_adapter is not None and not isinstance(motion_adapter, MotionAdapter):
            raise TypeError(f"motion_adapter must be a MotionAdapter, got {type(motion_adapter).__name__}")
        _check_unet2d(unet)
        if motion_adapter is not None:
            check_adapter_fits(unet.config, motion_adapter)
        config = _motion_config(unet.config, motion_adapter.config if motion_adapter is not None else None)
        if not load_weights:
            return cls.from_config(config)
        with torch.device("meta"):
            model = cls.from_config(config)
        if motion_adapter is None:
            motion_adapter = MotionAdapter(**_adapter_config(model.config))
        _follow(motion_adapter, unet)
        model._assemble(unet, motion_adapter.down_blocks, motion_adapter.mid_block, motion_adapter.up_blocks)
        return model

    @property
    def unet2d(self) -> UNet2DConditionModel:
        """The image UNet whose parameters this model runs (shared, not a copy)."""
        return self._unet2d

    def load_motion_modules(self, motion_adapter: MotionAdapter) -> None:
        """Run ``motion_adapter``'s motion modules from now on (shared with the adapter, not copied)."""
        check_adapter_fits(self.config, motion_adapter, exact=True)
        _follow(motion_adapter, self._unet2d)
        self._assemble(self._unet2d, motion_adapter.down_blocks, motion_adapter.mid_block, motion_adapter.up_blocks)
        self.set_context_windows(self.context_windows)

    # ------------------------------------------------------------------ FreeNoise
    @property
    def context_windows(self) -> ContextWindows | None:
        """The FreeNoise windows the motion modules attend in (None: all frames at once)."""
        return self.__dict__.get("_context_windows")

    def _motion_transformers(self):
        for block in self._blocks():
            for module in block.motion_modules or ():
                yield module

    def set_context_windows(self, windows: ContextWindows | None) -> None:
        """Temporal attention within ``windows`` (longer videos than the modules were trained on), or
        over all frames again (None). The motion modules are shared: every holder of them sees it."""
        self.__dict__["_context_windows"] = windows
        for module in self._motion_transformers():
            for block in module.transformer_blocks:
                block.context_windows = windows

    def set_split_inference(self, spatial_split_size: int | None, temporal_split_size: int | None = None) -> None:
        """Bound activation memory on long videos: motion modules over ``spatial_split_size`` pixels at a
        time, the 2-D layers over ``temporal_split_size`` frames at a time; ``None`` for both undoes it."""
        remove_splits(self)
        if spatial_split_size is None and temporal_split_size is None:
            return
        split_batches(
            [m for t in self._motion_transformers() for m in (t.proj_in, *t.transformer_blocks, t.proj_out)],
            spatial_split_size,
        )
        layers = ("resnets", "attentions", "downsamplers", "upsamplers")
        split_batches(
            [m for block in self._blocks() for name in layers for m in (getattr(block, name, None) or ())],
            temporal_split_size,
        )

    def _blocks(self):
        return [*self.down_blocks, self.mid_block, *self.up_blocks]

    def save_motion_modules(self, save_directory, **kwargs) -> None:
        """Save the motion modules as a :class:`MotionAdapter` folder (the tensors are not copied)."""
        state = {k: v for k, v in self.state_dict().items() if ".motion_modules." in k}
        with torch.device("meta"):
            adapter = MotionAdapter(**_adapter_config(self.config))
        adapter.load_state_dict(state, assign=True)
        adapter.save_pretrained(save_directory, **kwargs)

    def freeze_unet2d_params(self) -> None:
        """Train only the motion modules: ``requires_grad`` off for the rest (of the shared 2-D UNet too)."""
        for p in self.parameters():
            p.requires_grad_(False)
        for name, p in self.named_parameters():
            if ".motion_modules." in name:
                p.requires_grad_(True)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, sample, encoder_hidden_states) -> tuple[int, int]:
        cfg = self.config
        if not torch.is_tensor(sample) or sample.ndim != 5 or sample.shape[1] != cfg.in_channels:
            found = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(
                f"UNetMotionModel expects `sample` of shape [batch, {cfg.in_channels}, frames, height, width]; "
                f"got {found}"
            )
        batch, frames = sample.shape[0], sample.shape[2]
        windows = self.context_windows
        if (frames if windows is None else min(frames, windows.length)) > cfg.motion_max_seq_length:
            raise ValueError(
                f"UNetMotionModel: {'windows of ' if windows else ''}{frames if windows is None else windows.length}"
                f" frames, but its motion modules take at most motion_max_seq_length={cfg.motion_max_seq_length}"
                + ("; enable FreeNoise (pipe.enable_free_noise()) for longer videos" if windows is None else "")
            )
        widths = {cfg.cross_attention_dim} if isinstance(cfg.cross_attention_dim, int) else set(cfg.cross_attention_dim)
        if cfg.encoder_hid_dim is not None:
            widths = {cfg.encoder_hid_dim}
        if (
            not torch.is_tensor(encoder_hidden_states)
            or encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] not in (batch, batch * frames)
            or encoder_hidden_states.shape[2] not in widths
        ):
            found = tuple(encoder_hidden_states.shape) if torch.is_tensor(encoder_hidden_states) else None
            raise ValueError(
                f"UNetMotionModel expects `encoder_hidden_states` of shape [batch or batch * frames ({batch} or "
                f"{batch * frames}), sequence, {' or '.join(map(str, sorted(widths)))}]; got {found}"
            )
        return batch, frames

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNetMotionOutput | tuple[torch.Tensor]:
        """Predict from ``sample`` ``[B, C, F, H, W]``. ``encoder_hidden_states`` is ``[B * F, L, D]``
        (each video's states repeated per frame, as the reference's pipelines pass them) or ``[B, L, D]``.
        ``timestep``, ``timestep_cond`` and ``added_cond_kwargs`` are per video."""
        batch, frames = self._check_inputs(sample, encoder_hidden_states)
        unet = self._unet2d
        if self.config.addition_embed_type == "text_time":
            check_text_time("UNetMotionModel", self.config, added_cond_kwargs, batch)
        emb = unet._embed(sample[:, :, 0], timestep, timestep_cond, None, added_cond_kwargs)
        emb = emb.repeat_interleave(frames, dim=0)
        if encoder_hidden_states.shape[0] != batch * frames:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(frames, dim=0)
        encoder_hidden_states = unet._project_encoder_states(encoder_hidden_states, added_cond_kwargs)
        if isinstance(encoder_hidden_states, tuple):  # IP-Adapter image tokens, per video -> per frame
            text, image_tokens = encoder_hidden_states
            encoder_hidden_states = (text, [t.repeat_interleave(frames, dim=0) for t in image_tokens])
        attn_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=mask_to_bias(attention_mask, sample.dtype),
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=None,
        )
        flat = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, sample.shape[1], *sample.shape[3:])
        out = unet_body(
            self,
            flat,
            emb,
            attn_kwargs,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            block_kwargs={"num_frames": frames},
        )
        out = out.reshape(batch, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (out,)
        return UNetMotionOutput(sample=out)


# ---------------------------------------------------------------------------------------- helpers
def _check_unet2d(unet: UNet2DConditionModel) -> None:
    """Refuse 2-D UNets whose config the motion UNet's (the reference's format) cannot describe."""
    cfg = unet.config
    if cfg.get("encoder_hid_dim_type") == "ip_image_proj":
        raise ValueError(
            "AnimateDiff's motion UNet cannot be built around a UNet with an IP-Adapter loaded: call "
            "unload_ip_adapter() first, build the AnimateDiff pipeline, then load the IP-Adapter on it again"
        )
    spatial = set(_SPATIAL_BLOCKS.values())
    blocks = [t.removeprefix("UNetRes") for t in (*cfg.down_block_types, *cfg.up_block_types)]
    odd = {k: cfg.get(k, v) for k, v in _FIXED_2D.items() if _norm(cfg.get(k, v)) != v}
    odd.update({f"block type {t!r}": t for t in blocks if t not in spatial})
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        odd["addition_embed_type"] = cfg.addition_embed_type
    if odd:
        raise ValueError(
            "AnimateDiff's motion UNet cannot be built around this UNet2DConditionModel: its config has "
            f"{odd}, which UNetMotionModel's format cannot hold (it supports the SD 1.x / 2.x / XL layout)"
        )


def check_adapter_fits(unet_config, adapter: MotionAdapter, *, exact: bool = False) -> None:
    """The adapter's channels, blocks and layers must be the UNet's (``exact``: its motion settings too)."""
    if not isinstance(adapter, MotionAdapter):
        raise TypeError(f"motion_adapter must be a MotionAdapter, got {type(adapter).__name__}")
    cfg, a = unet_config, adapter.config
    n = len(cfg.block_out_channels)
    mismatches = []
    if list(a.block_out_channels) != list(cfg.block_out_channels):
        mismatches.append(
            f"block_out_channels {list(a.block_out_channels)} vs the UNet's {list(cfg.block_out_channels)}"
        )
    elif per_block("", a.motion_layers_per_block, n) != per_block("", cfg.layers_per_block, n):
        mismatches.append(
            f"motion_layers_per_block {a.motion_layers_per_block} vs the UNet's layers_per_block {cfg.layers_per_block}"
        )
    if a.motion_norm_num_groups != cfg.norm_num_groups:
        mismatches.append(
            f"motion_norm_num_groups {a.motion_norm_num_groups} vs the UNet's norm_num_groups {cfg.norm_num_groups}"
        )
    if a.use_motion_mid_block and a.motion_mid_block_layers_per_block != cfg.get("mid_block_layers", 1):
        mismatches.append(
            f"motion_mid_block_layers_per_block {a.motion_mid_block_layers_per_block} vs the "
            f"UNet's {cfg.get('mid_block_layers', 1)} mid-block layer(s)"
        )
    if a.conv_in_channels:
        raise NotImplementedError("motion adapters with conv_in_channels (PIA) are not supported by diffpipe")
    if exact:
        mine = _canonical_adapter_config(_adapter_config(cfg))
        theirs = _canonical_adapter_config({k: a[k] for k in mine})
        mismatches += [f"{k} {a[k]!r} vs the model's {cfg_v!r}" for k, cfg_v in mine.items() if theirs[k] != cfg_v]
    if mismatches:
        raise ValueError("the motion adapter does not fit the UNet: " + "; ".join(dict.fromkeys(mismatches)))


def _norm(value):
    """Lists for tuples; a per-block flag that is the same for every block as that one value."""
    if isinstance(value, (list, tuple)):
        value = [_norm(v) for v in value]
        if value and all(isinstance(v, bool) and v == value[0] for v in value):
            return value[0]
    return value


def _canonical_adapter_config(config: dict) -> dict:
    """An adapter config with per-block and per-layer settings spelled out as lists, for comparing."""
    n = len(config["block_out_channels"])
    out = {k: _norm(v) for k, v in config.items()}
    for key in ("motion_layers_per_block", "motion_transformer_layers_per_block", "motion_num_attention_heads"):
        out[key] = _norm(per_block(key, config[key], n))
    mid_layers = config["motion_mid_block_layers_per_block"]
    out["motion_transformer_layers_per_mid_block"] = _norm(
        per_block(
            "motion_transformer_layers_per_mid_block", config["motion_transformer_layers_per_mid_block"], mid_layers
        )
    )
    return out


# UNetMotionModel config key -> the MotionAdapter key that says the same of the motion modules.
_ADAPTER_KEYS = {
    "block_out_channels": "block_out_channels",
    "layers_per_block": "motion_layers_per_block",
    "temporal_transformer_layers_per_block": "motion_transformer_layers_per_block",
    "mid_block_layers": "motion_mid_block_layers_per_block",
    "temporal_transformer_layers_per_mid_block": "motion_transformer_layers_per_mid_block",
    "motion_num_attention_heads": "motion_num_attention_heads",
    "norm_num_groups": "motion_norm_num_groups",
    "motion_max_seq_length": "motion_max_seq_length",
    "use_motion_mid_block": "use_motion_mid_block",
}
# The ones the reference's from_unet2d takes from the adapter (the others must already agree).
_TAKEN_FROM_ADAPTER = (
    "layers_per_block",
    "temporal_transformer_layers_per_block",
    "temporal_transformer_layers_per_mid_block",
    "motion_num_attention_heads",
    "motion_max_seq_length",
    "use_motion_mid_block",
)


def _motion_config(unet_config, adapter_config) -> dict:
    """The reference's ``UNetMotionModel.from_unet2d`` config: the UNet's keys, motion block types,
    and the adapter's motion settings."""
    keys = UNetMotionModel.init_keys()
    config = {k: v for k, v in unet_config.items() if k in keys}
    config["down_block_types"] = [
        "CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion" for t in unet_config.down_block_types
    ]
    config["up_block_types"] = [
        "CrossAttnUpBlockMotion" if "CrossAttn" in t else "UpBlockMotion" for t in unet_config.up_block_types
    ]
    if not config.get("num_attention_heads"):  # SD configs give the head count as attention_head_dim
        config["num_attention_heads"] = unet_config.attention_head_dim
    if adapter_config is not None:
        config.update({k: adapter_config[_ADAPTER_KEYS[k]] for k in _TAKEN_FROM_ADAPTER})
    return config


def _adapter_config(config) -> dict:
    """The MotionAdapter config that describes a motion UNet's motion modules."""
    return {adapter_key: _norm(config[key]) for key, adapter_key in _ADAPTER_KEYS.items()}


def _follow(adapter: MotionAdapter, unet: UNet2DConditionModel) -> None:
    """Put the adapter on the UNet's device and dtype (in place: its modules run inside the UNet)."""
    if adapter.device != unet.device or adapter.dtype != unet.dtype:
        logger.info("moving the motion adapter to the UNet's %s / %s", unet.device, unet.dtype)
        adapter.to(device=unet.device, dtype=unet.dtype)
