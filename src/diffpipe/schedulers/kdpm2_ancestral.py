"""DPM-Solver-2 with ancestral sampling (k-diffusion's ``sample_dpm_2_ancestral``; Karras et al. 2022,
Lu et al. 2022).

Each interval [sigma_i, sigma_{i+1}] is split the ancestral way, as in Euler ancestral:
sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2) of fresh noise and a
deterministic part down to sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2). The deterministic part is
a DPM-Solver-2 (midpoint in log-sigma) step from sigma_i to sigma_down: Euler to the geometric
midpoint sigma_mid = sqrt(sigma_i sigma_down), then the slope found there over the whole way down.
(With eta = 1, sigma_down = sigma_{i+1}^2 / sigma_i, so sigma_mid lands on sigma_{i+1}.) The noise
is added after the second model call. Where sigma_down is 0 (into the final sigma), the midpoint is
0 as well and the first call's Euler step already ends the run.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SchedulerOutput, randn
from .kdpm2 import KDPM2DiscreteScheduler
from .prediction import ve_x0
from .sigmas import sigma_to_t


def _interleave(values: torch.Tensor) -> torch.Tensor:
    """Per-interval values laid out on the 2n - 1 timesteps (plus the final sigma's two slots):
    the first, each later one twice, the last once more."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """DPM-Solver-2 ancestral on a Karras-style sigma schedule (two model calls per interval).

    The config, the sigma schedule and the first-call timesteps are KDPM2's; the midpoints lie
    between each sigma and its ``sigmas_down`` instead of the next sigma.
    """

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` intervals; ``timesteps`` gets 2n - 1 entries (midpoints
        interleaved), ``sigmas_up`` / ``sigmas_down`` the ancestral split of each interval."""
        super().set_timesteps(num_inference_steps, device, num_train_timesteps)
        # KDPM2's layout: the first sigma, then each later one twice (the final 0 three times);
        # the first-call timesteps sit at the even positions
        sigmas = torch.cat([self.sigmas[:1], self.sigmas[1:-1:2]])
        timesteps = self.timesteps[::2]
        sigmas_next = torch.cat([sigmas[1:], sigmas.new_zeros(1)])

        sigmas_up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
        sigmas_down = (sigmas_next**2 - sigmas_up**2) ** 0.5
        sigmas_down[-1] = 0.0  # after the final sigma (0/0 above)
        sigmas_interpol = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
        sigmas_interpol[-2:] = 0.0  # into and after the final sigma: lerp towards log 0 gives nan

        self.sigmas_up = _interleave(sigmas_up)
        self.sigmas_down = _interleave(sigmas_down)
        self.sigmas_interpol = _interleave(sigmas_interpol).to(device)

        # the midpoints' timesteps (float32 arithmetic, as the reference does it), interleaved; the
        # last interval has no midpoint
        mid_t = sigma_to_t(sigmas_interpol.cpu().numpy(), self.log_sigmas.cpu().numpy(), float32_index=True)
        mid_t = torch.from_numpy(np.asarray(mid_t)).to(timesteps.device, dtype=timesteps.dtype)
        interleaved = torch.stack((mid_t[:-2, None], timesteps[1:, None]), dim=-1).flatten()
        self.timesteps = torch.cat([timesteps[:1], interleaved])

    def _model_input_sigma(self):
        index = self._step_index
        return self.sigmas[index] if self.state_in_first_order else self.sigmas_interpol[index - 1]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """First call: Euler to the midpoint. Second call: the midpoint slope down to sigma_down,
        then fresh noise of size sigma_up."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        # the interval's values sit at the first call's position
        i = self._step_index if first else self._step_index - 1
        sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i]
        sigma_up, sigma_down = self.sigmas_up[i], self.sigmas_down[i]

        # 1. the denoised estimate at the point the model was evaluated (start or midpoint)
        x0 = ve_x0(model_output, sample, sigma if first else sigma_mid, self.config.prediction_type)

        if first:
            # 2a. d = (x - D) / sigma; Euler to the midpoint
            derivative = (sample - x0) / sigma
            prev_sample = sample + derivative * (sigma_mid - sigma)
            self.sample = sample
        else:
            # 2b. the midpoint slope from the interval's start down to sigma_down, then the noise
            derivative = (sample - x0) / sigma_mid
            prev_sample = self.sample + derivative * (sigma_down - sigma)
            self.sample = None
            noise = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + noise * sigma_up

        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
