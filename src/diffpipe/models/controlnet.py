"""ControlNetModel: the encoder half of a Stable Diffusion UNet (``conv_in``, the time and added
embeddings, the down blocks and the mid block) steered by a conditioning image, whose features come
out as residuals for the UNet's skips and mid block. Several of them together:
:class:`~diffpipe.models.multicontrolnet.MultiControlNetModel`.

Parameter names, config keys and defaults are the reference's, so published ControlNet folders load
unchanged and a folder saved here loads in the reference. As in the reference, ``attention_head_dim``
is the number of attention *heads* per block unless ``num_attention_heads`` is given, and an
``encoder_hid_proj`` is built (and stored) when ``encoder_hid_dim`` is set but never applied.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..nn.attention import AttentionHostMixin
from ..nn.embeddings import TimestepEmbedding, Timesteps
from ..nn.memory import MemorySwitchesMixin
from ..nn.transformer_2d import mask_to_bias
from .conditioning import check_text_time, text_time_embedding, timestep_batch
from .modeling import ModelMixin
from .outputs import ControlNetOutput
from .unet_2d_condition import UNet2DConditionModel, _per_block
from .unet_block_factory import get_down_block, get_mid_block

_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
# Sub-modules ``from_unet`` copies from the UNet (those it has): the encoder half, without encoder_hid_proj.
_FROM_UNET = ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block")


def _zero(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (the ControlNet's output convolutions start at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNetConditioningEmbedding(nn.Module):
    """The conditioning image -> ``block_out_channels[0]`` features at the latent's resolution.

    ``conv_in`` (3x3), then for each step between ``block_out_channels`` a 3x3 convolution keeping the
    width and a strided 3x3 convolution widening it (each halving the size), SiLU after each, then a
    zero-initialised ``conv_out``. With the default four widths the image is 8x the latent's size.
    """

    def __init__(
        self,
        conditioning_embedding_channels: int,
        conditioning_channels: int = 3,
        block_out_channels: Sequence[int] = (16, 32, 96, 256),
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = _zero(
            nn.Conv2d(block_out_channels[-1], conditioning_embedding_channels, kernel_size=3, padding=1)
        )

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            embedding = F.silu(block(embedding))
        return self.conv_out(embedding)


class ControlNetModel(ModelMixin, AttentionHostMixin, MemorySwitchesMixin):
    """ControlNet: ``forward`` returns the residuals to add to a UNet's down-block skips and mid block."""

    # what compile_repeated_blocks() / pipe.compile() compile one by one
    _repeated_blocks = ("ResnetBlock2D", "Transformer2DModel")

    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | Sequence[int] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: Sequence[int] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        n_blocks = len(down_block_types)

        # ---- config checks (before any layer is built)
        if len(block_out_channels) != n_blocks:
            raise ConfigError(
                f"ControlNetModel: {len(block_out_channels)} block_out_channels {list(block_out_channels)} "
                f"for {n_blocks} down_block_types {list(down_block_types)}; they must match"
            )
        for block_type in down_block_types:
            if block_type not in _DOWN_BLOCK_TYPES:
                raise ConfigError(
                    f"ControlNetModel: down block type {block_type!r} is not supported; expected one of "
                    f"{list(_DOWN_BLOCK_TYPES)}"
                )
        if mid_block_type not in _MID_BLOCK_TYPES:
            raise ConfigError(
                f"ControlNetModel: mid_block_type={mid_block_type!r}; expected one of {list(_MID_BLOCK_TYPES)}"
            )
        if controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ConfigError(
                f"ControlNetModel: controlnet_conditioning_channel_order={controlnet_conditioning_channel_order!r}; "
                "expected 'rgb' or 'bgr'"
            )
        if not conditioning_embedding_out_channels:
            raise ConfigError(
                "ControlNetModel: `conditioning_embedding_out_channels` must list at least one width "
                f"(the reference's default is [16, 32, 96, 256]); got {conditioning_embedding_out_channels!r}"
            )
        if not isinstance(layers_per_block, int):
            raise ConfigError(f"ControlNetModel: `layers_per_block` must be an int; got {layers_per_block!r}")

        heads = _per_block("num_attention_heads", num_attention_heads or attention_head_dim, n_blocks)
        transformer_layers = _per_block("transformer_layers_per_block", transformer_layers_per_block, n_blocks)
        if isinstance(only_cross_attention, bool):
            only_cross = [only_cross_attention] * n_blocks
        else:
            only_cross = _per_block("only_cross_attention", only_cross_attention, n_blocks, scalar_types=(bool,))

        # ---- input
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)

        # ---- time embedding
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        # ---- encoder_hid_proj: built and stored as the reference does, not applied in forward
        if encoder_hid_dim_type is None and encoder_hid_dim is not None:
            encoder_hid_dim_type = "text_proj"
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        if encoder_hid_dim_type is not None and encoder_hid_dim is None:
            raise ConfigError(f"ControlNetModel: encoder_hid_dim_type={encoder_hid_dim_type!r} needs `encoder_hid_dim`")
        if encoder_hid_dim_type == "text_proj":
            self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim)
        elif encoder_hid_dim_type is not None:
            raise NotImplementedError(
                f"ControlNetModel: encoder_hid_dim_type={encoder_hid_dim_type!r} is not implemented in diffpipe"
            )
        else:
            self.encoder_hid_proj = None

        # ---- class embedding (summed with the time embedding)
        self.class_embedding = UNet2DConditionModel._build_class_embedding(
            class_embed_type,
            num_class_embeds,
            projection_class_embeddings_input_dim,
            act_fn,
            time_embed_dim,
            block_out_channels[0],
        )

        # ---- additional embeddings (SDXL: pooled text embeds + size/crop ids)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ConfigError(
                    "ControlNetModel: addition_embed_type='text_time' needs `addition_time_embed_dim` and "
                    "`projection_class_embeddings_input_dim`"
                )
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif addition_embed_type == "text":
            raise NotImplementedError("ControlNetModel: addition_embed_type='text' is not implemented in diffpipe")
        elif addition_embed_type is not None:
            raise ConfigError(
                f"ControlNetModel: addition_embed_type={addition_embed_type!r}; expected None or 'text_time'"
            )

        # ---- the conditioning image's embedding
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            conditioning_embedding_channels=block_out_channels[0],
            conditioning_channels=conditioning_channels,
            block_out_channels=conditioning_embedding_out_channels,
        )

        # ---- down blocks, each residual with its zero 1x1 convolution (built in the reference's order,
        # so a model made under a seed draws the reference's initial weights)
        shared = dict(
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
        )
        down_blocks = []
        controlnet_down_blocks = [self._zero_conv(block_out_channels[0])]
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final = i == n_blocks - 1
            down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=transformer_layers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    add_downsample=not is_final,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads[i],
                    downsample_padding=downsample_padding,
                    only_cross_attention=only_cross[i],
                    **shared,
                )
            )
            for _ in range(layers_per_block + (0 if is_final else 1)):
                controlnet_down_blocks.append(self._zero_conv(output_channel))
        self.down_blocks = nn.ModuleList(down_blocks)
        self.controlnet_down_blocks = nn.ModuleList(controlnet_down_blocks)

        # ---- mid block
        self.controlnet_mid_block = self._zero_conv(block_out_channels[-1])
        self.mid_block = get_mid_block(
            mid_block_type,
            in_channels=block_out_channels[-1],
            output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=transformer_layers[-1],
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_attention_dim,
            **shared,
        )

        self._has_cross_attention = any(
            getattr(b, "has_cross_attention", False) for b in (*down_blocks, self.mid_block)
        )

    @staticmethod
    def _zero_conv(channels: int) -> nn.Conv2d:
        return _zero(nn.Conv2d(channels, channels, kernel_size=1))

    # ====================================================================== from a UNet
    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: Sequence[int] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> "ControlNetModel":
        """A ControlNet with ``unet``'s encoder configuration and (``load_weights_from_unet``) its weights:
        ``conv_in``, the time, class and added embeddings, the down blocks and the mid block. The
        conditioning embedding and the output convolutions are new (the latter zero)."""
        cfg = unet.config
        if cfg.get("time_cond_proj_dim") is not None and load_weights_from_unet:
            raise ValueError(
                f"ControlNetModel.from_unet: the UNet has time_cond_proj_dim={cfg['time_cond_proj_dim']} (a "
                "timestep-conditioned UNet such as LCM's); a ControlNet has no `time_embedding.cond_proj` to take it"
            )
        controlnet = cls(
            encoder_hid_dim=cfg.get("encoder_hid_dim"),
            encoder_hid_dim_type=cfg.get("encoder_hid_dim_type"),
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
            transformer_layers_per_block=cfg.get("transformer_layers_per_block", 1),
            in_channels=cfg["in_channels"],
            flip_sin_to_cos=cfg["flip_sin_to_cos"],
            freq_shift=cfg["freq_shift"],
            down_block_types=cfg["down_block_types"],
            only_cross_attention=cfg["only_cross_attention"],
            block_out_channels=cfg["block_out_channels"],
            layers_per_block=cfg["layers_per_block"],
            downsample_padding=cfg["downsample_padding"],
            mid_block_scale_factor=cfg["mid_block_scale_factor"],
            act_fn=cfg["act_fn"],
            norm_num_groups=cfg["norm_num_groups"],
            norm_eps=cfg["norm_eps"],
            cross_attention_dim=cfg["cross_attention_dim"],
            attention_head_dim=cfg["attention_head_dim"],
            num_attention_heads=cfg.get("num_attention_heads"),
            use_linear_projection=cfg.get("use_linear_projection", False),
            class_embed_type=cfg.get("class_embed_type"),
            num_class_embeds=cfg.get("num_class_embeds"),
            upcast_attention=cfg.get("upcast_attention", False),
            resnet_time_scale_shift=cfg.get("resnet_time_scale_shift", "default"),
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"),
            mid_block_type=cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels,
        )
        if load_weights_from_unet:
            for name in _FROM_UNET:
                ours, theirs = getattr(controlnet, name, None), getattr(unet, name, None)
                if ours is not None and theirs is not None:
                    ours.load_state_dict(theirs.state_dict())
        return controlnet

    # ====================================================================== forward
    def _cond_factor(self) -> int:
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def _check_inputs(self, sample, encoder_hidden_states, controlnet_cond, added_cond_kwargs, class_labels) -> None:
        """Shape checks that fail fast, with what was expected and what was found."""
        cfg = self.config
        if not torch.is_tensor(sample) or sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            found = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(
                f"ControlNetModel expects `sample` of shape [batch, {cfg.in_channels}, height, width] "
                f"(in_channels={cfg.in_channels}); got {found}"
            )
        batch, _, height, width = sample.shape
        factor = self._cond_factor()
        expected = (cfg.conditioning_channels, height * factor, width * factor)
        if not torch.is_tensor(controlnet_cond):
            raise ValueError(
                f"ControlNetModel expects `controlnet_cond` as a tensor of shape [batch, {expected[0]}, "
                f"{expected[1]}, {expected[2]}]; got {type(controlnet_cond).__name__}"
            )
        found = tuple(controlnet_cond.shape)
        if controlnet_cond.ndim != 4 or found[1:] != expected or found[0] not in (1, batch):
            raise ValueError(
                f"ControlNetModel expects `controlnet_cond` of shape [{batch}, {expected[0]}, {expected[1]}, "
                f"{expected[2]}] (conditioning_channels={cfg.conditioning_channels}, and {factor}x the sample's "
                f"{height}x{width} for {len(cfg.conditioning_embedding_out_channels)} "
                f"conditioning_embedding_out_channels); got {found}"
            )
        if self._has_cross_attention:
            if not torch.is_tensor(encoder_hidden_states):
                raise ValueError(
                    f"ControlNetModel expects `encoder_hidden_states` of shape [batch, sequence, "
                    f"{cfg.cross_attention_dim}]; got {type(encoder_hidden_states).__name__}"
                )
            shape = tuple(encoder_hidden_states.shape)
            if encoder_hidden_states.ndim != 3 or shape[2] != cfg.cross_attention_dim or shape[0] != batch:
                raise ValueError(
                    f"ControlNetModel expects `encoder_hidden_states` of shape [{batch}, sequence, "
                    f"{cfg.cross_attention_dim}] (the sample's batch, cross_attention_dim="
                    f"{cfg.cross_attention_dim}); got {shape}"
                )
        if self.class_embedding is not None and class_labels is None:
            raise ValueError(
                f"ControlNetModel with class_embed_type={cfg.class_embed_type!r}, "
                f"num_class_embeds={cfg.num_class_embeds} needs `class_labels`"
            )
        if cfg.addition_embed_type == "text_time":
            check_text_time("ControlNetModel", cfg, added_cond_kwargs, batch)

    def _embed(self, sample, timestep, timestep_cond, class_labels, added_cond_kwargs) -> torch.Tensor:
        cfg = self.config
        timestep = timestep_batch("ControlNetModel", timestep, sample)
        t_emb = self.time_proj(timestep).to(dtype=sample.dtype)
        # A ControlNet's time embedding has no condition projection: a `timestep_cond` is refused there.
        emb = self.time_embedding(t_emb, timestep_cond)

        if self.class_embedding is not None:
            if cfg.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=sample.dtype)

        if cfg.addition_embed_type == "text_time":
            emb = emb + text_time_embedding(self, added_cond_kwargs, emb.dtype)
        return emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for a UNet denoising ``sample`` ``[B, in_channels, H, W]`` at ``timestep``, steered by
        ``controlnet_cond`` ``[B, conditioning_channels, 8H, 8W]`` (8x with the default embedding).

        The residuals are multiplied by ``conditioning_scale``; with ``guess_mode`` (and without
        ``global_pool_conditions``) also by a logspace from 0.1 (the first) to 1.0 (the mid block's).
        ``global_pool_conditions`` averages each residual over height and width.
        """
        self._check_inputs(sample, encoder_hidden_states, controlnet_cond, added_cond_kwargs, class_labels)
        cfg = self.config
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])

        attention_mask = mask_to_bias(attention_mask, sample.dtype)
        emb = self._embed(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)

        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)

        attn_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(sample, emb, **attn_kwargs)
            else:
                sample, res = block(sample, emb)
            skips += res

        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, **attn_kwargs)
        else:
            sample = self.mid_block(sample, emb)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(sample)

        if guess_mode and not cfg.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale

        if cfg.global_pool_conditions:
            down = [torch.mean(d, dim=(2, 3), keepdim=True) for d in down]
            mid = torch.mean(mid, dim=(2, 3), keepdim=True)

        if not return_dict:
            return tuple(down), mid
        return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)
