"""What every scheduler shares: loading/saving, the output type, dynamic thresholding, seeded noise
and the step-index bookkeeping. The training noise schedule and timestep spacings are in
``schedules.py``, the argument checks in ``checks.py``.

Numerics follow the reference exactly where it matters for reproducing its trajectories: schedules
are built in float32 torch, spacings in numpy, and the same dtype at each stage.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..config import ConfigMixin
from ..errors import ConfigError
from ..outputs import BaseOutput  # noqa: F401  (the step outputs' base; lcm.py and tcd.py import it from here)
from .checks import check_choice
from .schedules import make_betas, rescale_zero_terminal_snr
from .sigmas import vp_to_ve_sigmas

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The step output


@dataclass
class SchedulerOutput(BaseOutput):
    """What ``step`` returns: ``prev_sample`` (x_{t-1}, the next model input) and, where the
    algorithm has one, ``pred_original_sample`` (the model's current estimate of x_0)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------
# Dynamic thresholding (Saharia et al. 2022, Imagen, section 2.3)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per batch item: s = the ``ratio`` quantile of |x0|, clamped to [1, max_value]; then clip x0
    to [-s, s] and divide by s."""
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    flat = x0 if dtype in (torch.float32, torch.float64) else x0.float()
    flat = flat.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def clip_or_threshold(x0: torch.Tensor, config) -> torch.Tensor:
    """The x0 post-processing of the DDPM-family configs: thresholding wins over clip_sample."""
    if config.get("thresholding", False):
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.get("clip_sample", False):
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


# ------------------------------------------------------------------------------------------------
# Seeded noise


def randn(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise that a seed reproduces the way the reference draws it.

    A list of generators draws one batch item from each (in order); a single-item list is the same
    as that generator alone. A CPU generator with a non-CPU target draws on the CPU and moves the
    result, so the same seed gives the same numbers on any device.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_on = device
    if isinstance(generator, (list, tuple)):
        if len(generator) == 0:
            raise ValueError("randn: got an empty list of generators")
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(
                f"randn: got {len(generator)} generators for a batch of {shape[0]}; pass one per batch item"
            )
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type:
            if gen_type == "cpu":
                draw_on = torch.device("cpu")
            else:
                raise ValueError(f"randn: cannot draw a {device.type} tensor with a {gen_type} generator")
    if isinstance(generator, (list, tuple)):
        one = (1, *shape[1:])
        parts = [torch.randn(one, generator=g, device=draw_on, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------------
# Schedulers


def _broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.flatten()
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def _as_python_int(timestep) -> int:
    if isinstance(timestep, torch.Tensor):
        return int(timestep.item())
    return int(timestep)


# The reference's KarrasDiffusionSchedulers: the schedulers that can stand in for one another in
# the Stable Diffusion family of pipelines (only those diffpipe implements resolve in `compatibles`).
KARRAS_COMPATIBLES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
)

_HUB_ONLY_KWARGS = ("force_download", "resume_download", "proxies", "output_loading_info", "user_agent", "mirror")


class SchedulerMixin(ConfigMixin):
    """Base of every scheduler: config file I/O and the shared bookkeeping.

    Subclasses set ``_compatibles`` (the reference's class names) and ``order`` (how many model
    evaluations one step of the pipeline loop spends per ``timesteps`` entry group).
    """

    config_name = "scheduler_config.json"
    _compatibles: tuple[str, ...] = ()
    order = 1

    # ---------------------------------------------------------------- files
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs,
    ):
        """Build from ``[subfolder/]scheduler_config.json`` in a local folder or a Hub repo.

        ``revision``, ``cache_dir``, ``local_files_only`` and ``token`` go to the download; other
        keyword arguments override config values.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        for k in _HUB_ONLY_KWARGS:
            kwargs.pop(k, None)
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``scheduler_config.json`` into ``save_directory`` (created if missing)."""
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("diffpipe does not upload; save locally and push with huggingface_hub")
        self.save_config(save_directory)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---------------------------------------------------------------- shared set-up
    def _init_betas(self, *, rescale_betas_zero_snr: bool = False, extra_schedules: Sequence[str] = ()) -> None:
        """Set ``betas``, ``alphas`` and ``alphas_cumprod`` from this scheduler's config."""
        c = self.config
        betas = make_betas(
            type(self).__name__,
            num_train_timesteps=c.num_train_timesteps,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            beta_schedule=c.beta_schedule,
            trained_betas=c.trained_betas,
            extra_schedules=extra_schedules,
        )
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _check_options(self, **choices: Iterable[Any]) -> None:
        """Check config values against the choices this scheduler implements."""
        for key, allowed in choices.items():
            check_choice(type(self).__name__, key, self.config.get(key), allowed)

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(
                f"{type(self).__name__}.step was called before set_timesteps: call "
                "`scheduler.set_timesteps(num_inference_steps)` first"
            )

    def _check_train_timestep(self, timestep) -> int:
        t = _as_python_int(timestep)
        T = len(self.alphas_cumprod)
        if not 0 <= t < T:
            raise ValueError(f"{type(self).__name__}.step: timestep {t} is outside the training range [0, {T - 1}]")
        return t

    # ---------------------------------------------------------------- q(x_t | x_0)
    def _sqrt_alphas_at(self, like: torch.Tensor, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alphabar_t), sqrt(1 - alphabar_t)) at integer ``timesteps``, shaped to broadcast over ``like``."""
        self.alphas_cumprod = self.alphas_cumprod.to(device=like.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=like.dtype)
        timesteps = timesteps.to(like.device)
        signal = _broadcast_to(alphas_cumprod[timesteps] ** 0.5, like)
        noise_scale = _broadcast_to((1 - alphas_cumprod[timesteps]) ** 0.5, like)
        return signal, noise_scale

    def _add_noise_alphas_cumprod(self, original_samples, noise, timesteps) -> torch.Tensor:
        """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, timesteps indexing alphas_cumprod."""
        signal, noise_scale = self._sqrt_alphas_at(original_samples, timesteps)
        return signal * original_samples + noise_scale * noise

    def _velocity_alphas_cumprod(self, sample, noise, timesteps) -> torch.Tensor:
        """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0 (Salimans & Ho 2022)."""
        signal, noise_scale = self._sqrt_alphas_at(sample, timesteps)
        return signal * noise - noise_scale * sample


def index_in_schedule(owner: str, schedule: torch.Tensor, timestep, unknown_is_last: bool = False) -> int:
    """Position of ``timestep`` in ``schedule``. Where it occurs more than once (second-order
    schedulers repeat timesteps), the second occurrence is taken, as the reference does, so that a
    run starting mid-schedule (image-to-image) does not skip a sigma. A timestep not in it is an
    error, or, with ``unknown_is_last`` (the reference's DPM-Solver family), the last position, said
    in a warning."""
    if isinstance(timestep, torch.Tensor):
        timestep = timestep.to(schedule.device)
    matches = (schedule == timestep).nonzero()
    if len(matches) == 0:
        shown = schedule.tolist()
        if len(shown) > 12:
            shown = shown[:6] + ["..."] + shown[-6:]
        value = timestep.item() if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 else timestep
        if unknown_is_last and len(schedule):
            logger.warning(
                "%s: timestep %r is not in the current schedule %s; it is taken as the last step, as the reference "
                "does. Pass one of `scheduler.timesteps`, or call `set_begin_index` to start mid-schedule.",
                owner,
                value,
                shown,
            )
            return len(schedule) - 1
        raise ValueError(
            f"{owner}: timestep {value!r} is not in the current schedule {shown}; pass one of "
            "`scheduler.timesteps` (after `set_timesteps`), or call `set_begin_index` to start mid-schedule"
        )
    return int(matches[1 if len(matches) > 1 else 0].item())


class StepIndexMixin:
    """Schedulers that walk ``timesteps``/``sigmas`` by position: ``step_index`` counts the steps
    taken, ``begin_index`` (set by pipelines through ``set_begin_index``) says where a run starts."""

    _step_index: int | None = None
    _begin_index: int | None = None
    _unknown_timestep_is_last = False  # the reference's DPM-Solver family runs the last step for one

    @property
    def step_index(self) -> int | None:
        """The position of the current timestep; advances by one after each ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first position of the run; ``None`` means it is found from the first timestep."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Set where the run starts (pipelines call this before the loop, e.g. for image-to-image)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        return index_in_schedule(type(self).__name__, schedule, timestep, self._unknown_timestep_is_last)

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _noise_step_indices(self, timesteps: torch.Tensor, device) -> list[int]:
        """Positions used by ``add_noise``: looked up from ``timesteps`` unless a begin index was set
        (then the current step, or the begin index before the first step)."""
        if self._begin_index is None:
            schedule = self.timesteps.to(device)
            return [self.index_for_timestep(t, schedule) for t in timesteps.to(device).flatten()]
        start = self._step_index if self._step_index is not None else self._begin_index
        return [start] * timesteps.shape[0]


def reject_integer_timestep(owner: str, timestep) -> None:
    """Sigma-based schedulers take a value from ``scheduler.timesteps``, not a loop counter."""
    if (
        isinstance(timestep, (int, np.integer))
        and not isinstance(timestep, bool)
        or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point())
    ):
        raise ValueError(
            f"{owner}.step got an integer timestep ({timestep!r}); passing loop indices (e.g. from "
            "`enumerate(timesteps)`) is not supported. Pass one of `scheduler.timesteps` instead."
        )


class SigmaScheduleMixin(StepIndexMixin):
    """Schedulers that run on a VE sigma schedule ``sigmas`` (one per position in ``timesteps``,
    plus the final one): the Euler/Heun/LMS/KDPM2 family and, in VP form, DPM-Solver and UniPC."""

    def _sigma_respacing(self) -> str | None:
        """Which of the Karras / exponential / beta sigma schedules the config asks for, if any."""
        c = self.config
        chosen = [
            kind
            for kind, key in (
                ("karras", "use_karras_sigmas"),
                ("exponential", "use_exponential_sigmas"),
                ("beta", "use_beta_sigmas"),
            )
            if c.get(key)
        ]
        if len(chosen) > 1:
            raise ConfigError(
                f"{type(self).__name__}: only one of `use_karras_sigmas`, `use_exponential_sigmas` and "
                f"`use_beta_sigmas` can be true; got {chosen}"
            )
        return chosen[0] if chosen else None

    def _train_sigmas(self) -> np.ndarray:
        """The float32 VE sigmas of the training steps, ascending in t."""
        return vp_to_ve_sigmas(self.alphas_cumprod).numpy()

    def _indexed_sigmas(self, original_samples: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        indices = self._noise_step_indices(timesteps, original_samples.device)
        return _broadcast_to(sigmas[indices], original_samples)


class KarrasSigmaMixin(SigmaScheduleMixin):
    """The VE schedulers (Karras et al. 2022): x = x_0 + sigma eps; the model sees x / sqrt(sigma^2 + 1)."""

    is_scale_input_called = False

    @property
    def init_noise_sigma(self):
        """The standard deviation of the initial noise: sigma_max (or sqrt(sigma_max^2 + 1) for the
        leading spacing, whose first timestep is below the last training step)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def _model_input_sigma(self):
        return self.sigmas[self._step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The model's input: x / sqrt(sigma^2 + 1), the VP-scaled sample (c_in of Karras et al.)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._model_input_sigma()
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def _warn_if_unscaled(self) -> None:
        if not self.is_scale_input_called:
            logger.warning(
                "%s.step was called without scale_model_input; call `scheduler.scale_model_input(sample, t)` on "
                "the model input first",
                type(self).__name__,
            )

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x_0 + sigma eps at the sigma of each timestep."""
        return original_samples + noise * self._indexed_sigmas(original_samples, timesteps)
