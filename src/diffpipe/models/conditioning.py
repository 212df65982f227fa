"""The conditioning vector's parts a UNet and its ControlNet build alike: the timestep batch, SDXL's
``text_time`` addition (pooled text + sinusoidal size/crop ids) and its input check. ``owner`` names the
model in messages."""

from __future__ import annotations

import torch


def timestep_batch(owner: str, timestep, sample: torch.Tensor) -> torch.Tensor:
    """A 1-d float or integer tensor of one timestep per sample, on the sample's device."""
    batch = sample.shape[0]
    if not torch.is_tensor(timestep):
        # Converted straight to float32: the sinusoidal projection computes in float32 anyway.
        return torch.full((batch,), float(timestep), dtype=torch.float32, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep[None]
    if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
        raise ValueError(
            f"{owner} expects `timestep` as a number, a 0-d tensor or a 1-d tensor of length 1 "
            f"or {batch} (the batch); got shape {tuple(timestep.shape)}"
        )
    return timestep.to(sample.device).expand(batch)


def check_text_time(owner: str, config, added_cond_kwargs, batch: int) -> None:
    """``added_cond_kwargs`` must hold ``text_embeds`` [batch, T] and ``time_ids`` [batch, N] with
    ``T + N * addition_time_embed_dim == projection_class_embeddings_input_dim``."""
    total = config.projection_class_embeddings_input_dim
    per_id = config.addition_time_embed_dim
    wanted = (
        f"added_cond_kwargs={{'text_embeds': [batch, T], 'time_ids': [batch, N]}} with "
        f"T + N * {per_id} = {total} (projection_class_embeddings_input_dim; SDXL: T=1280, N=6)"
    )
    if not isinstance(added_cond_kwargs, dict):
        raise ValueError(
            f"{owner} with addition_embed_type='text_time' (SDXL) needs {wanted}; "
            f"got added_cond_kwargs={added_cond_kwargs!r}"
        )
    missing = [k for k in ("text_embeds", "time_ids") if added_cond_kwargs.get(k) is None]
    if missing:
        raise ValueError(
            f"{owner} with addition_embed_type='text_time' (SDXL) needs {wanted}; "
            f"added_cond_kwargs lacks {missing} (has keys {sorted(added_cond_kwargs)})"
        )
    text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
    if text_embeds.ndim != 2 or text_embeds.shape[0] != batch or time_ids.numel() % batch != 0:
        raise ValueError(
            f"{owner} needs {wanted} for batch {batch}; got text_embeds "
            f"{tuple(text_embeds.shape)}, time_ids {tuple(time_ids.shape)}"
        )
    width = text_embeds.shape[1] + (time_ids.numel() // batch) * per_id
    if width != total:
        raise ValueError(
            f"{owner} needs {wanted}; got text_embeds {tuple(text_embeds.shape)} and time_ids "
            f"{tuple(time_ids.shape)}, which give {width}"
        )


def text_time_embedding(model, added_cond_kwargs: dict, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's addition: ``add_embedding([text_embeds, add_time_proj(time_ids)])``."""
    text_embeds = added_cond_kwargs["text_embeds"]
    time_embeds = model.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape(text_embeds.shape[0], -1)
    return model.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))
