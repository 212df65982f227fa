"""UNet2DConditionModel: the denoiser of Stable Diffusion 1.x/2.x, SDXL and their inpainting variants.

The constructor takes the reference's full set of config keys with the same names and defaults, so
configs round-trip. Keys are kept verbatim even where the name misleads; notably
``attention_head_dim`` is, for these UNets, the number of attention *heads* per block (the reference's
historical misnomer): each transformer uses ``channels // heads`` as its head width.

Features outside the SD family raise ``NotImplementedError`` when a config asks for them
(``dual_cross_attention``, GLIGEN ``attention_type``, Fourier time embeddings, Kandinsky-style
``addition_embed_type`` / ``encoder_hid_dim_type``, and block types other than the SD ones). Keys that
only affect block types diffpipe does not build (``resnet_skip_time_act``, ``resnet_out_scale_factor``,
``cross_attention_norm``, ``mid_block_only_cross_attention``, ``addition_embed_type_num_heads``) are
accepted and, as in the reference with these blocks, have no effect.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.activations import get_activation
from ..nn.attention import AttentionHostMixin
from ..nn.memory import MemorySwitchesMixin
from ..adapters.lora_model import LoraModelMixin
from .freeu import FreeUMixin
from ..nn.embeddings import TimestepEmbedding, Timesteps
from ..nn.transformer_2d import mask_to_bias
from .conditioning import check_text_time, text_time_embedding, timestep_batch
from .modeling import ModelMixin
from .outputs import UNet2DConditionOutput
from .unet_block_factory import get_down_block, get_mid_block, get_up_block
from .unet_body import unet_body

_UNIMPLEMENTED_ADDITION_EMBEDS = ("text", "text_image", "image", "image_hint")
_UNIMPLEMENTED_ENCODER_HID = ("text_image_proj", "image_proj")


def _per_block(name: str, value: Any, n: int, *, scalar_types=(int,)) -> list:
    """A per-block config value (scalar for all blocks, or one entry per block) as a list of ``n``."""
    if isinstance(value, scalar_types) or value is None:
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ConfigError(
            f"UNet2DConditionModel: `{name}` has {len(value)} entries ({value}) but there are {n} down blocks"
        )
    return value


class UNet2DConditionModel(ModelMixin, AttentionHostMixin, MemorySwitchesMixin, FreeUMixin, LoraModelMixin):
    """Conditional 2D UNet predicting noise (or v / x0) from a noisy latent, a timestep and text states."""

    # what compile_repeated_blocks() / pipe.compile() compile one by one
    _repeated_blocks = ("ResnetBlock2D", "Transformer2DModel")

    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int | Sequence[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | Sequence[int] = 1280,
        transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1,
        reverse_transformer_layers_per_block: Sequence[Sequence[int]] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        self.sample_size = sample_size
        n_blocks = len(down_block_types)

        # ---- config checks and unsupported features (before any layer is built)
        if len(up_block_types) != n_blocks:
            raise ConfigError(
                f"UNet2DConditionModel: {n_blocks} down_block_types {list(down_block_types)} but "
                f"{len(up_block_types)} up_block_types {list(up_block_types)}; they must match"
            )
        if len(block_out_channels) != n_blocks:
            raise ConfigError(
                f"UNet2DConditionModel: {len(block_out_channels)} block_out_channels {list(block_out_channels)} "
                f"for {n_blocks} down_block_types; they must match"
            )
        if dual_cross_attention:
            raise NotImplementedError("UNet2DConditionModel: dual_cross_attention=True is not implemented in diffpipe")
        if attention_type != "default":
            raise NotImplementedError(
                f"UNet2DConditionModel: attention_type={attention_type!r} (GLIGEN) is not implemented in diffpipe"
            )
        if resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ConfigError(
                f"UNet2DConditionModel: resnet_time_scale_shift={resnet_time_scale_shift!r}; "
                "expected 'default' or 'scale_shift'"
            )
        if isinstance(transformer_layers_per_block, (list, tuple)) and reverse_transformer_layers_per_block is None:
            if any(isinstance(x, (list, tuple)) for x in transformer_layers_per_block):
                raise ConfigError(
                    "UNet2DConditionModel: per-layer `transformer_layers_per_block` lists need "
                    "`reverse_transformer_layers_per_block` for the up blocks"
                )

        # `attention_head_dim` is the number of heads unless `num_attention_heads` says otherwise.
        heads = _per_block("num_attention_heads", num_attention_heads or attention_head_dim, n_blocks)
        _per_block("attention_head_dim", attention_head_dim, n_blocks)  # length check only
        cross_dims = _per_block("cross_attention_dim", cross_attention_dim, n_blocks)
        layers = _per_block("layers_per_block", layers_per_block, n_blocks)
        transformer_layers = _per_block("transformer_layers_per_block", transformer_layers_per_block, n_blocks)
        if isinstance(only_cross_attention, bool):
            if mid_block_only_cross_attention is None:
                mid_block_only_cross_attention = only_cross_attention
            only_cross = [only_cross_attention] * n_blocks
        else:
            only_cross = _per_block("only_cross_attention", only_cross_attention, n_blocks, scalar_types=(bool,))

        # ---- input
        self.conv_in = nn.Conv2d(
            in_channels, block_out_channels[0], kernel_size=conv_in_kernel, padding=(conv_in_kernel - 1) // 2
        )

        # ---- time embedding
        if time_embedding_type == "positional":
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
            timestep_input_dim = block_out_channels[0]
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        elif time_embedding_type == "fourier":
            raise NotImplementedError(
                "UNet2DConditionModel: time_embedding_type='fourier' is not implemented in diffpipe"
            )
        else:
            raise ConfigError(
                f"UNet2DConditionModel: time_embedding_type={time_embedding_type!r}; expected 'positional' or 'fourier'"
            )
        self.time_embedding = TimestepEmbedding(
            timestep_input_dim,
            time_embed_dim,
            act_fn=act_fn,
            post_act_fn=timestep_post_act,
            cond_proj_dim=time_cond_proj_dim,
        )

        # ---- projection of encoder_hidden_states
        if encoder_hid_dim_type is None and encoder_hid_dim is not None:
            encoder_hid_dim_type = "text_proj"  # the reference's implied default, recorded in the config
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        if encoder_hid_dim_type is not None and encoder_hid_dim is None:
            raise ConfigError(
                f"UNet2DConditionModel: encoder_hid_dim_type={encoder_hid_dim_type!r} needs `encoder_hid_dim`"
            )
        if encoder_hid_dim_type == "text_proj":
            self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim)
        elif encoder_hid_dim_type in _UNIMPLEMENTED_ENCODER_HID:
            raise NotImplementedError(
                f"UNet2DConditionModel: encoder_hid_dim_type={encoder_hid_dim_type!r} is not implemented in diffpipe"
            )
        elif encoder_hid_dim_type is not None:
            raise ConfigError(
                f"UNet2DConditionModel: encoder_hid_dim_type={encoder_hid_dim_type!r}; expected None or 'text_proj'"
            )
        else:
            self.encoder_hid_proj = None

        # ---- class embedding (summed with, or concatenated to, the time embedding)
        self.class_embedding = self._build_class_embedding(
            class_embed_type,
            num_class_embeds,
            projection_class_embeddings_input_dim,
            act_fn,
            time_embed_dim,
            timestep_input_dim,
        )

        # ---- additional embeddings (SDXL: pooled text embeds + size/crop ids)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ConfigError(
                    "UNet2DConditionModel: addition_embed_type='text_time' needs `addition_time_embed_dim` and "
                    "`projection_class_embeddings_input_dim`"
                )
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif addition_embed_type in _UNIMPLEMENTED_ADDITION_EMBEDS:
            raise NotImplementedError(
                f"UNet2DConditionModel: addition_embed_type={addition_embed_type!r} is not implemented in diffpipe"
            )
        elif addition_embed_type is not None:
            raise ConfigError(
                f"UNet2DConditionModel: addition_embed_type={addition_embed_type!r}; expected None or 'text_time'"
            )

        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None

        # ---- blocks. Registration order is down_blocks, up_blocks, mid_block (the checkpoint order).
        blocks_temb = 2 * time_embed_dim if class_embeddings_concat else time_embed_dim
        shared = dict(
            temb_channels=blocks_temb,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            dual_cross_attention=dual_cross_attention,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_type=attention_type,
            dropout=dropout,
        )
        down_blocks = []
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers[i],
                    transformer_layers_per_block=transformer_layers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    add_downsample=i < n_blocks - 1,
                    cross_attention_dim=cross_dims[i],
                    num_attention_heads=heads[i],
                    downsample_padding=downsample_padding,
                    only_cross_attention=only_cross[i],
                    **shared,
                )
            )

        # Built between the down and the up blocks, as the reference builds it, so that a model made
        # under a seed draws the reference's initial weights; registered last (the checkpoint order).
        mid_block = get_mid_block(
            mid_block_type,
            in_channels=block_out_channels[-1],
            output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=transformer_layers[-1],
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_dims[-1],
            **shared,
        )
        up_transformer_layers = (
            list(reversed(transformer_layers))
            if reverse_transformer_layers_per_block is None
            else list(reverse_transformer_layers_per_block)
        )
        reversed_channels = list(reversed(block_out_channels))
        up_blocks = []
        self.num_upsamplers = 0
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            is_final = i == n_blocks - 1
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, n_blocks - 1)]
            self.num_upsamplers += 0 if is_final else 1
            j = n_blocks - 1 - i  # the matching down block
            up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers[j] + 1,
                    transformer_layers_per_block=up_transformer_layers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    add_upsample=not is_final,
                    resolution_idx=i,
                    cross_attention_dim=cross_dims[j],
                    num_attention_heads=heads[j],
                    only_cross_attention=only_cross[j],
                    **shared,
                )
            )
        self.down_blocks = nn.ModuleList(down_blocks)
        self.up_blocks = nn.ModuleList(up_blocks)
        self.mid_block = mid_block

        # ---- output
        if norm_num_groups is not None:
            self.conv_norm_out = nn.GroupNorm(
                num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps
            )
            self.conv_act = get_activation(act_fn)
        else:
            self.conv_norm_out = None
            self.conv_act = None
        self.conv_out = nn.Conv2d(
            block_out_channels[0], out_channels, kernel_size=conv_out_kernel, padding=(conv_out_kernel - 1) // 2
        )

        # What forward validates encoder_hidden_states against.
        self._has_cross_attention = any(
            getattr(b, "has_cross_attention", False) for b in (*down_blocks, *up_blocks)
        ) or bool(getattr(mid_block, "has_cross_attention", False))

    @staticmethod
    def _build_class_embedding(
        class_embed_type, num_class_embeds, projection_dim, act_fn, time_embed_dim, timestep_input_dim
    ) -> nn.Module | None:
        if class_embed_type is None:
            return nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
        if class_embed_type == "timestep":
            return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
        if class_embed_type == "identity":
            return nn.Identity()
        if class_embed_type in ("projection", "simple_projection"):
            if projection_dim is None:
                raise ConfigError(
                    f"UNet2DConditionModel: class_embed_type={class_embed_type!r} needs "
                    "`projection_class_embeddings_input_dim`"
                )
            if class_embed_type == "projection":
                return TimestepEmbedding(projection_dim, time_embed_dim)
            return nn.Linear(projection_dim, time_embed_dim)
        raise ConfigError(
            f"UNet2DConditionModel: class_embed_type={class_embed_type!r}; expected None, 'timestep', 'identity', "
            "'projection' or 'simple_projection'"
        )

    # ====================================================================== forward
    def _check_inputs(self, sample, encoder_hidden_states, added_cond_kwargs, class_labels) -> None:
        """Shape checks that fail fast, before any heavy compute, with what was expected and found."""
        cfg = self.config
        if not torch.is_tensor(sample) or sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            found = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(
                f"UNet2DConditionModel expects `sample` of shape [batch, {cfg.in_channels}, height, width] "
                f"(in_channels={cfg.in_channels}); got {found}"
            )
        batch = sample.shape[0]
        if self._has_cross_attention:
            if self.encoder_hid_proj is not None and cfg.encoder_hid_dim_type == "text_proj":
                widths = {cfg.encoder_hid_dim}
            elif isinstance(cfg.cross_attention_dim, int):
                widths = {cfg.cross_attention_dim}
            else:
                widths = set(cfg.cross_attention_dim)
            expected = " or ".join(str(w) for w in sorted(widths))
            if not torch.is_tensor(encoder_hidden_states):
                raise ValueError(
                    f"UNet2DConditionModel expects `encoder_hidden_states` of shape [batch, sequence, {expected}]; "
                    f"got {type(encoder_hidden_states).__name__}"
                )
            shape = tuple(encoder_hidden_states.shape)
            if encoder_hidden_states.ndim != 3 or shape[2] not in widths:
                raise ValueError(
                    f"UNet2DConditionModel expects `encoder_hidden_states` of shape [batch, sequence, {expected}] "
                    f"(cross_attention_dim={cfg.cross_attention_dim}); got {shape}"
                )
            if shape[0] != batch:
                raise ValueError(
                    f"UNet2DConditionModel: `encoder_hidden_states` has batch {shape[0]} but `sample` has batch "
                    f"{batch}; they must match"
                )
        if self.class_embedding is not None and class_labels is None:
            raise ValueError(
                f"UNet2DConditionModel with class_embed_type={cfg.class_embed_type!r}, "
                f"num_class_embeds={cfg.num_class_embeds} needs `class_labels`"
            )
        if cfg.addition_embed_type == "text_time":
            check_text_time("UNet2DConditionModel", cfg, added_cond_kwargs, batch)

    def _embed(self, sample, timestep, timestep_cond, class_labels, added_cond_kwargs) -> torch.Tensor:
        cfg = self.config
        t_emb = self.time_proj(timestep_batch("UNet2DConditionModel", timestep, sample)).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)

        if self.class_embedding is not None:
            if cfg.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(dtype=sample.dtype)
            class_emb = self.class_embedding(class_labels).to(dtype=sample.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if cfg.class_embeddings_concat else emb + class_emb

        if cfg.addition_embed_type == "text_time":
            emb = emb + text_time_embedding(self, added_cond_kwargs, emb.dtype)

        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def _project_encoder_states(self, encoder_hidden_states, added_cond_kwargs):
        kind = self.config.encoder_hid_dim_type
        if self.encoder_hid_proj is None:
            return encoder_hidden_states
        if kind == "text_proj":
            return self.encoder_hid_proj(encoder_hidden_states)
        if kind == "ip_image_proj":
            # Set at load time by image-prompt adapters: the image projection's output travels with the
            # text states as a tuple to the adapter's attention processors.
            if not added_cond_kwargs or added_cond_kwargs.get("image_embeds") is None:
                raise ValueError(
                    "UNet2DConditionModel with an image-prompt projection (encoder_hid_dim_type='ip_image_proj') "
                    "needs added_cond_kwargs['image_embeds']"
                )
            text_proj = getattr(self, "text_encoder_hid_proj", None)
            if text_proj is not None:
                encoder_hidden_states = text_proj(encoder_hidden_states)
            return encoder_hidden_states, self.encoder_hid_proj(added_cond_kwargs["image_embeds"])
        raise NotImplementedError(f"encoder_hid_dim_type={kind!r} is not implemented in diffpipe")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict from ``sample`` ``[B, in_channels, H, W]`` at ``timestep`` given ``encoder_hidden_states``
        ``[B, L, cross_attention_dim]``.

        ``attention_mask`` / ``encoder_attention_mask``: ``[B, L]`` keep(1)/discard(0) masks for the
        self-/cross-attention keys. ``down_block_additional_residuals`` + ``mid_block_additional_residual``
        are ControlNet residuals; ``down_intrablock_additional_residuals`` are T2I-Adapter features.
        """
        self._check_inputs(sample, encoder_hidden_states, added_cond_kwargs, class_labels)
        if cross_attention_kwargs and cross_attention_kwargs.get("gligen") is not None:
            raise NotImplementedError("GLIGEN (cross_attention_kwargs['gligen']) is not implemented in diffpipe")

        attention_mask = mask_to_bias(attention_mask, sample.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, sample.dtype)

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self._embed(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)
        encoder_hidden_states = self._project_encoder_states(encoder_hidden_states, added_cond_kwargs)
        attn_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )
        sample = unet_body(
            self,
            sample,
            emb,
            attn_kwargs,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
        )

        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)
