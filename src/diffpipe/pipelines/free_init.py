"""FreeInit (Wu et al. 2023, "FreeInit: Bridging Initialization Gap in Video Diffusion Models") for
AnimateDiff: denoise the video several times; between runs, noise the result back to the last training
timestep with the first run's noise and keep only its low spatio-temporal frequencies, taking the high
ones from fresh noise. Later runs start from a noise whose low frequencies already agree across frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedulers.base import randn
from . import stages

METHODS = ("butterworth", "gaussian", "ideal")


@dataclass(frozen=True)
class FreeInit:
    num_iters: int = 3
    use_fast_sampling: bool = False
    method: str = "butterworth"
    order: int = 4
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25

    def __post_init__(self):
        if isinstance(self.num_iters, bool) or not isinstance(self.num_iters, int) or self.num_iters < 1:
            raise ValueError(f"enable_free_init: num_iters must be a positive integer, got {self.num_iters!r}")
        if self.method not in METHODS:
            raise ValueError(f"enable_free_init: method must be one of {METHODS}, got {self.method!r}")

    def low_pass(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The ``[frames, height, width]`` filter: 1 at the centre of the shifted spectrum, falling off
        with the normalised distance (temporal distances stretched by the spatial/temporal ratio)."""
        frames, height, width = shape
        d_s, d_t = self.spatial_stop_frequency, self.temporal_stop_frequency

        def axis(n: int) -> torch.Tensor:
            return 2 * torch.arange(n, dtype=torch.float32) / n - 1

        t = axis(frames)[:, None, None] * (d_s / d_t) if d_t > 0 else torch.zeros(frames, 1, 1)
        distance = t**2 + axis(height)[None, :, None] ** 2 + axis(width)[None, None, :] ** 2
        if self.method == "butterworth":
            return 1 / (1 + (distance / d_s**2) ** self.order)
        if self.method == "gaussian":
            return torch.exp(-distance / (2 * d_s**2))
        return (distance <= d_s * 2).float()  # ideal


def mix_frequencies(x: torch.Tensor, noise: torch.Tensor, low_pass: torch.Tensor) -> torch.Tensor:
    """The low frequencies of ``x`` and the high ones of ``noise`` over (frames, height, width)."""
    dims = (-3, -2, -1)

    def spectrum(v):
        return torch.fft.fftshift(torch.fft.fftn(v, dim=dims), dim=dims)

    low_pass = low_pass.to(x.device)
    mixed = spectrum(x) * low_pass + spectrum(noise) * (1 - low_pass)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


def denoise_with_free_init(pipe, request, state):
    """The denoising loop, once, or ``num_iters`` times under FreeInit (``pipe.enable_free_init``)."""
    free_init: FreeInit | None = pipe.__dict__.get("_free_init")
    if free_init is None:
        return stages.denoise(pipe, request, state)
    initial = state.latents.detach().clone()
    scheduler, latents_dtype = pipe.scheduler, state.latents.dtype
    for i in range(free_init.num_iters):
        if i > 0:
            batch = state.latents.shape[0]
            last = torch.full((batch,), scheduler.config.num_train_timesteps - 1, dtype=torch.long)
            try:
                if getattr(scheduler, "_unknown_timestep_is_last", False) and not bool(
                    (scheduler.timesteps == last[0]).any()
                ):
                    # (the scheduler would take it as the last inference step: almost no noise)
                    raise ValueError("the last training timestep is not in the schedule")
                noised = scheduler.add_noise(state.latents, initial, last.to(state.latents.device))
            except ValueError as e:
                raise ValueError(
                    f"FreeInit noises each result back to the last training timestep, which "
                    f"{type(scheduler).__name__} can only do at the timesteps of its schedule; use a scheduler that "
                    "noises at any training timestep (DDIMScheduler, DDPMScheduler, PNDMScheduler, LCMScheduler)"
                ) from e
            noised = noised.to(torch.float32)
            fresh = randn(state.latents.shape, generator=request.generator, device=state.device, dtype=torch.float32)
            mixed = mix_frequencies(noised, fresh, free_init.low_pass(tuple(noised.shape[-3:])))
            state.latents = mixed.to(latents_dtype)
        steps = request.num_inference_steps
        if free_init.use_fast_sampling:
            steps = max(int(steps / free_init.num_iters * (i + 1)), 1)
        state.timesteps, state.num_inference_steps = stages.set_timesteps(scheduler, steps, state.device)
        state = stages.denoise(pipe, request, state)
    return state


class FreeInitMixin:
    """``enable_free_init`` / ``disable_free_init`` for AnimateDiff pipelines."""

    def enable_free_init(
        self,
        num_iters: int = 3,
        use_fast_sampling: bool = False,
        method: str = "butterworth",
        order: int = 4,
        spatial_stop_frequency: float = 0.25,
        temporal_stop_frequency: float = 0.25,
    ) -> None:
        object.__setattr__(
            self,
            "_free_init",
            FreeInit(num_iters, use_fast_sampling, method, order, spatial_stop_frequency, temporal_stop_frequency),
        )

    def disable_free_init(self) -> None:
        self.__dict__.pop("_free_init", None)

    @property
    def free_init_enabled(self) -> bool:
        return self.__dict__.get("_free_init") is not None
