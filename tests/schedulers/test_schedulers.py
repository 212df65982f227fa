"""Schedulers against the reference (diffusers, the test oracle): schedules, model inputs and
10-step sampling trajectories over a matrix of configurations, with identically seeded noise.

Each case builds the same configuration in both libraries, checks ``timesteps`` (values and dtype),
``sigmas``, ``init_noise_sigma``, then drives both with the same deterministic "model"
(a fixed function of the model input and the timestep) and the same seeds, and compares every
step's model input and every step output field within 1e-5 (fp32).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from diffpipe.registry import find_class
from diffpipe.schedulers import SCHEDULERS

import diffusers  # the oracle (test extra): missing, the module fails to load
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_mu

# the reference warns (deprecations, numpy 2 conversions) on nearly every call; none of it is ours
pytestmark = pytest.mark.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)

ATOL = 1e-5
SHAPE = (2, 4, 8, 8)


@dataclass
class Case:
    cls: str
    config: dict = field(default_factory=dict)
    steps: int | None = 10
    set_kwargs: dict = field(default_factory=dict)  # extra set_timesteps arguments
    step_kwargs: dict = field(default_factory=dict)  # extra step arguments
    shape: tuple = SHAPE
    double_output: bool = False  # the model also returns a variance (learned / learned_range)
    generator_list: bool = False  # one generator per batch item
    beta_sigmas: bool = False  # timesteps via our scipy-free Beta quantile (agrees to ~1e-13)

    @property
    def id(self) -> str:
        parts = [f"{k}={v}" for k, v in {**self.config, **self.set_kwargs, **self.step_kwargs}.items()]
        if self.steps != 10:
            parts.append(f"steps={self.steps}")
        if self.generator_list:
            parts.append("generator_list")
        return f"{self.cls}[{','.join(parts) or 'default'}]"


def C(cls, steps=10, set_kwargs=None, step_kwargs=None, **config):
    return Case(
        cls,
        config,
        steps,
        set_kwargs or {},
        step_kwargs or {},
        beta_sigmas=bool(config.get("use_beta_sigmas")),
    )


SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion's betas

CASES = [
    # ---- DDPM
    C("DDPMScheduler"),
    C("DDPMScheduler", timestep_spacing="trailing", prediction_type="v_prediction", **SD),
    C("DDPMScheduler", timestep_spacing="linspace", prediction_type="sample", beta_schedule="squaredcos_cap_v2"),
    C("DDPMScheduler", thresholding=True, sample_max_value=1.5, prediction_type="sample", timestep_spacing="trailing"),
    C("DDPMScheduler", variance_type="fixed_large", steps_offset=1, clip_sample=False),
    C("DDPMScheduler", variance_type="fixed_small_log", beta_schedule="sigmoid"),
    C("DDPMScheduler", beta_schedule="laplace", clip_sample=False, timestep_spacing="linspace"),
    C("DDPMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    C("DDPMScheduler", num_train_timesteps=100, trained_betas=[0.0005 + 0.0002 * i for i in range(100)]),
    C("DDPMScheduler", steps=None, set_kwargs={"timesteps": [999, 800, 650, 400, 201, 77, 3]}),
    # ---- DDIM
    C("DDIMScheduler"),
    C("DDIMScheduler", clip_sample=False, steps_offset=1, set_alpha_to_one=False, **SD),
    C("DDIMScheduler", timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction", **SD),
    C("DDIMScheduler", timestep_spacing="linspace", prediction_type="sample", clip_sample_range=0.5),
    C("DDIMScheduler", thresholding=True, prediction_type="sample", dynamic_thresholding_ratio=0.9),
    C("DDIMScheduler", beta_schedule="squaredcos_cap_v2", step_kwargs={"eta": 0.5}),
    C("DDIMScheduler", step_kwargs={"eta": 1.0, "use_clipped_model_output": True}, clip_sample_range=0.8),
    # ---- PNDM
    C("PNDMScheduler"),
    C("PNDMScheduler", skip_prk_steps=True, steps_offset=1, **SD),
    C("PNDMScheduler", skip_prk_steps=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    C("PNDMScheduler", timestep_spacing="linspace", set_alpha_to_one=True, beta_schedule="squaredcos_cap_v2"),
    C("PNDMScheduler", timestep_spacing="trailing", prediction_type="v_prediction", steps=12),
    # ---- Euler
    C("EulerDiscreteScheduler"),
    C("EulerDiscreteScheduler", timestep_spacing="leading", steps_offset=1, **SD),
    C(
        "EulerDiscreteScheduler",
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    ),
    C("EulerDiscreteScheduler", use_karras_sigmas=True, **SD),
    C("EulerDiscreteScheduler", use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0, final_sigmas_type="sigma_min"),
    C("EulerDiscreteScheduler", use_exponential_sigmas=True, prediction_type="v_prediction"),
    C("EulerDiscreteScheduler", use_beta_sigmas=True, **SD),
    C("EulerDiscreteScheduler", interpolation_type="log_linear", beta_schedule="squaredcos_cap_v2"),
    C("EulerDiscreteScheduler", timestep_type="continuous", prediction_type="v_prediction", **SD),
    C("EulerDiscreteScheduler", prediction_type="original_sample"),
    C("EulerDiscreteScheduler", step_kwargs={"s_churn": 0.8, "s_noise": 1.003}),
    C("EulerDiscreteScheduler", step_kwargs={"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 3.0}, **SD),
    C("EulerDiscreteScheduler", steps=None, set_kwargs={"sigmas": [14.0, 7.0, 3.0, 1.2, 0.5, 0.1, 0.0]}),
    C("EulerDiscreteScheduler", steps=None, set_kwargs={"timesteps": [999.0, 750.5, 500.0, 250.25, 10.0]}),
    # ---- Euler ancestral
    C("EulerAncestralDiscreteScheduler"),
    C("EulerAncestralDiscreteScheduler", timestep_spacing="leading", steps_offset=1, **SD),
    C("EulerAncestralDiscreteScheduler", timestep_spacing="trailing", prediction_type="v_prediction"),
    C("EulerAncestralDiscreteScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing", **SD),
    C("EulerAncestralDiscreteScheduler", beta_schedule="squaredcos_cap_v2"),
    # ---- Heun
    C("HeunDiscreteScheduler"),
    C("HeunDiscreteScheduler", use_karras_sigmas=True, **SD),
    C("HeunDiscreteScheduler", use_exponential_sigmas=True),
    C("HeunDiscreteScheduler", use_beta_sigmas=True, prediction_type="v_prediction"),
    C("HeunDiscreteScheduler", timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"),
    C("HeunDiscreteScheduler", timestep_spacing="trailing", prediction_type="sample", clip_sample=True),
    C("HeunDiscreteScheduler", beta_schedule="exp"),
    C("HeunDiscreteScheduler", steps=None, set_kwargs={"timesteps": [999.0, 700.0, 400.0, 100.0, 20.0]}),
    # ---- LMS
    C("LMSDiscreteScheduler"),
    C("LMSDiscreteScheduler", use_karras_sigmas=True, **SD),
    C("LMSDiscreteScheduler", use_exponential_sigmas=True),
    C("LMSDiscreteScheduler", use_beta_sigmas=True),
    C("LMSDiscreteScheduler", timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction", **SD),
    C("LMSDiscreteScheduler", timestep_spacing="trailing", prediction_type="sample"),
    C("LMSDiscreteScheduler", beta_schedule="squaredcos_cap_v2", step_kwargs={"order": 3}),
    # ---- DPM-Solver multistep
    C("DPMSolverMultistepScheduler"),
    C("DPMSolverMultistepScheduler", use_karras_sigmas=True, **SD),
    C("DPMSolverMultistepScheduler", solver_order=3, solver_type="heun"),
    C("DPMSolverMultistepScheduler", solver_order=3, steps=20, lower_order_final=False, final_sigmas_type="sigma_min"),
    C("DPMSolverMultistepScheduler", solver_order=1, timestep_spacing="trailing", prediction_type="v_prediction"),
    C("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    C("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"),
    C("DPMSolverMultistepScheduler", algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    C("DPMSolverMultistepScheduler", algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
    C("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
    C("DPMSolverMultistepScheduler", use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
    C("DPMSolverMultistepScheduler", use_beta_sigmas=True, **SD),
    C("DPMSolverMultistepScheduler", use_lu_lambdas=True, prediction_type="sample"),
    C("DPMSolverMultistepScheduler", thresholding=True, prediction_type="sample", sample_max_value=2.0),
    C(
        "DPMSolverMultistepScheduler",
        thresholding=True,
        algorithm_type="dpmsolver",
        final_sigmas_type="sigma_min",
        prediction_type="v_prediction",
    ),
    C("DPMSolverMultistepScheduler", timestep_spacing="leading", steps_offset=1, **SD),
    C(
        "DPMSolverMultistepScheduler",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        **SD,
    ),
    C("DPMSolverMultistepScheduler", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, euler_at_final=True),
    C("DPMSolverMultistepScheduler", use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    # legacy names, remapped to dpmsolver++ / midpoint
    C("DPMSolverMultistepScheduler", algorithm_type="deis", solver_type="bh2", final_sigmas_type="sigma_min"),
    C("DPMSolverMultistepScheduler", steps=None, set_kwargs={"timesteps": [999, 850, 600, 420, 230, 81, 9]}),
    # ---- DPM-Solver singlestep
    C("DPMSolverSinglestepScheduler"),
    C("DPMSolverSinglestepScheduler", solver_order=3, steps=12),
    C("DPMSolverSinglestepScheduler", solver_order=3, solver_type="heun", lower_order_final=True, steps=11),
    C("DPMSolverSinglestepScheduler", solver_order=1, prediction_type="v_prediction"),
    C("DPMSolverSinglestepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3, steps=9),
    C("DPMSolverSinglestepScheduler", algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"),
    C("DPMSolverSinglestepScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min", **SD),
    C("DPMSolverSinglestepScheduler", use_exponential_sigmas=True, prediction_type="sample"),
    C("DPMSolverSinglestepScheduler", use_beta_sigmas=True),
    C("DPMSolverSinglestepScheduler", thresholding=True, prediction_type="sample"),
    C("DPMSolverSinglestepScheduler", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    C("DPMSolverSinglestepScheduler", use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.0),
    # ---- KDPM2
    C("KDPM2DiscreteScheduler"),
    C("KDPM2DiscreteScheduler", use_karras_sigmas=True, **SD),
    C("KDPM2DiscreteScheduler", use_exponential_sigmas=True),
    C("KDPM2DiscreteScheduler", use_beta_sigmas=True, prediction_type="v_prediction"),
    C("KDPM2DiscreteScheduler", timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"),
    C("KDPM2DiscreteScheduler", timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2"),
    # ---- UniPC
    C("UniPCMultistepScheduler"),
    C("UniPCMultistepScheduler", solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min", **SD),
    C("UniPCMultistepScheduler", solver_type="bh1", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    C("UniPCMultistepScheduler", predict_x0=False, final_sigmas_type="sigma_min"),
    C("UniPCMultistepScheduler", solver_order=1, prediction_type="v_prediction"),
    C("UniPCMultistepScheduler", use_karras_sigmas=True, **SD),
    C("UniPCMultistepScheduler", use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
    C("UniPCMultistepScheduler", use_beta_sigmas=True),
    C("UniPCMultistepScheduler", disable_corrector=[0, 3], solver_order=3),
    C("UniPCMultistepScheduler", thresholding=True, prediction_type="sample"),
    C(
        "UniPCMultistepScheduler",
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    ),
    C("UniPCMultistepScheduler", timestep_spacing="leading", steps_offset=1, **SD),
    C("UniPCMultistepScheduler", lower_order_final=False, final_sigmas_type="sigma_min", steps=12),
    C("UniPCMultistepScheduler", use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    C("UniPCMultistepScheduler", use_flow_sigmas=True, prediction_type="flow_prediction", shift_terminal=0.02),
    C(
        "UniPCMultistepScheduler",
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        set_kwargs={"mu": 0.7},
    ),
    # ---- LCM
    C("LCMScheduler", steps=4),
    C("LCMScheduler", steps=6, prediction_type="v_prediction"),
    C("LCMScheduler", steps=6, clip_sample=True, prediction_type="sample", set_alpha_to_one=False),
    C("LCMScheduler", steps=4, thresholding=True, timestep_scaling=5.0),
    C("LCMScheduler", steps=4, beta_schedule="linear", original_inference_steps=40),
    C(
        "LCMScheduler",
        steps=4,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    ),
    C("LCMScheduler", steps=6, set_kwargs={"strength": 0.5}),
    C("LCMScheduler", steps=None, set_kwargs={"timesteps": [999, 759, 499, 259]}),
    # ---- TCD
    C("TCDScheduler", steps=4),
    C("TCDScheduler", steps=8, step_kwargs={"eta": 0.0}),
    C("TCDScheduler", steps=8, step_kwargs={"eta": 0.8}, prediction_type="v_prediction"),
    C("TCDScheduler", steps=6, prediction_type="sample", set_kwargs={"original_inference_steps": 100}),
    C("TCDScheduler", steps=None, set_kwargs={"timesteps": [999, 759, 499, 259]}),
    # ---- KDPM2 ancestral
    C("KDPM2AncestralDiscreteScheduler"),
    C("KDPM2AncestralDiscreteScheduler", use_karras_sigmas=True, **SD),
    C("KDPM2AncestralDiscreteScheduler", use_exponential_sigmas=True, prediction_type="v_prediction"),
    C("KDPM2AncestralDiscreteScheduler", use_beta_sigmas=True, **SD),
    C("KDPM2AncestralDiscreteScheduler", timestep_spacing="leading", steps_offset=1, **SD),
    C("KDPM2AncestralDiscreteScheduler", timestep_spacing="trailing", prediction_type="v_prediction"),
    C("KDPM2AncestralDiscreteScheduler", timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2"),
    C(
        "KDPM2AncestralDiscreteScheduler",
        num_train_timesteps=100,
        trained_betas=[0.0005 + 0.0002 * i for i in range(100)],
    ),
    C("KDPM2AncestralDiscreteScheduler", steps=1),
    # ---- DEIS multistep
    C("DEISMultistepScheduler"),
    C("DEISMultistepScheduler", solver_order=1, timestep_spacing="trailing", prediction_type="v_prediction"),
    C("DEISMultistepScheduler", solver_order=3, **SD),
    C("DEISMultistepScheduler", solver_order=3, steps=20, lower_order_final=False),
    C("DEISMultistepScheduler", solver_order=3, steps=12, lower_order_final=False, prediction_type="v_prediction"),
    C("DEISMultistepScheduler", timestep_spacing="leading", steps_offset=1, lower_order_final=False, **SD),
    C("DEISMultistepScheduler", use_karras_sigmas=True, solver_order=3, **SD),
    C("DEISMultistepScheduler", use_exponential_sigmas=True, prediction_type="sample"),
    C("DEISMultistepScheduler", use_beta_sigmas=True, prediction_type="v_prediction"),
    C("DEISMultistepScheduler", thresholding=True, prediction_type="sample", sample_max_value=1.5),
    C("DEISMultistepScheduler", thresholding=True, solver_order=3, dynamic_thresholding_ratio=0.9),
    C("DEISMultistepScheduler", beta_schedule="squaredcos_cap_v2", solver_order=3, timestep_spacing="trailing"),
    C("DEISMultistepScheduler", use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    C(
        "DEISMultistepScheduler",
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        solver_order=3,
        set_kwargs={"mu": 0.7},
    ),
    # legacy names (DPM-Solver's / UniPC's), remapped to deis / logrho
    C("DEISMultistepScheduler", algorithm_type="dpmsolver++", solver_type="midpoint"),
    C("DEISMultistepScheduler", algorithm_type="dpmsolver", solver_type="bh2", solver_order=3),
    C("DEISMultistepScheduler", steps=3, solver_order=3),
    # ---- EDM Euler
    C("EDMEulerScheduler"),
    C("EDMEulerScheduler", sigma_schedule="exponential"),
    C("EDMEulerScheduler", prediction_type="v_prediction", sigma_data=0.7),
    C("EDMEulerScheduler", sigma_min=0.03, sigma_max=14.6, rho=5.0, final_sigmas_type="sigma_min"),
    C(
        "EDMEulerScheduler",
        sigma_schedule="exponential",
        sigma_min=0.01,
        sigma_max=20.0,
        final_sigmas_type="sigma_min",
        prediction_type="v_prediction",
    ),
    C("EDMEulerScheduler", steps=25, sigma_data=1.0, num_train_timesteps=40),
    C("EDMEulerScheduler", step_kwargs={"s_churn": 0.8, "s_noise": 1.003}),
    C("EDMEulerScheduler", step_kwargs={"s_churn": 1.0, "s_tmin": 0.05, "s_tmax": 3.0}, sigma_schedule="exponential"),
    # the reference's `sigmas` are positions on the Karras ramp (0 = sigma_max, 1 = sigma_min)
    C("EDMEulerScheduler", steps=None, set_kwargs={"sigmas": torch.tensor([0.0, 0.1, 0.3, 0.55, 0.8, 1.0])}),
    C("EDMEulerScheduler", steps=4, set_kwargs={"sigmas": torch.tensor([0.0, 0.4, 0.9], dtype=torch.float64)}),
    # ---- EDM DPM-Solver multistep
    C("EDMDPMSolverMultistepScheduler"),
    C("EDMDPMSolverMultistepScheduler", sigma_schedule="exponential", prediction_type="v_prediction"),
    C("EDMDPMSolverMultistepScheduler", solver_order=3, solver_type="heun"),
    C("EDMDPMSolverMultistepScheduler", solver_order=3, steps=12, lower_order_final=False),
    # (the reference's third order into a repeated sigma_min divides by h = 0: NaN, so order 2 here)
    C("EDMDPMSolverMultistepScheduler", steps=20, lower_order_final=False, final_sigmas_type="sigma_min"),
    C("EDMDPMSolverMultistepScheduler", solver_order=3, steps=20, euler_at_final=True, final_sigmas_type="sigma_min"),
    C("EDMDPMSolverMultistepScheduler", solver_order=3, steps=16, sigma_schedule="exponential", sigma_data=0.8),
    C("EDMDPMSolverMultistepScheduler", solver_order=1, sigma_data=0.7, sigma_min=0.03, sigma_max=14.6),
    C("EDMDPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"),
    C(
        "EDMDPMSolverMultistepScheduler",
        algorithm_type="sde-dpmsolver++",
        solver_type="heun",
        final_sigmas_type="sigma_min",
        sigma_schedule="exponential",
    ),
    C("EDMDPMSolverMultistepScheduler", thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
    C("EDMDPMSolverMultistepScheduler", euler_at_final=True, final_sigmas_type="sigma_min", rho=3.0),
    C("EDMDPMSolverMultistepScheduler", lower_order_final=False, steps=12, prediction_type="v_prediction"),
    # legacy names, remapped to dpmsolver++ / midpoint
    C("EDMDPMSolverMultistepScheduler", algorithm_type="deis", solver_type="bh2", final_sigmas_type="sigma_min"),
    # ---- DPM-Solver SDE
    # The noise comes from a Brownian tree seeded by noise_sampler_seed (the step takes no generator);
    # left None, each library draws a seed from torch's global generator, which the two runs here do not
    # share, so every case fixes it (the unseeded default is test_dpm_solver_sde_unseeded_... below).
    C("DPMSolverSDEScheduler", noise_sampler_seed=0),
    C("DPMSolverSDEScheduler", use_karras_sigmas=True, noise_sampler_seed=42, **SD),
    C("DPMSolverSDEScheduler", use_exponential_sigmas=True, noise_sampler_seed=1),
    C("DPMSolverSDEScheduler", use_beta_sigmas=True, prediction_type="v_prediction", noise_sampler_seed=2),
    C("DPMSolverSDEScheduler", timestep_spacing="leading", steps_offset=1, noise_sampler_seed=3, **SD),
    C("DPMSolverSDEScheduler", timestep_spacing="trailing", prediction_type="v_prediction", noise_sampler_seed=4),
    C("DPMSolverSDEScheduler", beta_schedule="squaredcos_cap_v2", noise_sampler_seed=5, step_kwargs={"s_noise": 1.003}),
    C("DPMSolverSDEScheduler", steps=7, noise_sampler_seed=2**40 + 7),  # fractional (float64) linspace timesteps
    C("DPMSolverSDEScheduler", noise_sampler_seed=[11, 12]),  # one tree per batch item
    C(
        "DPMSolverSDEScheduler",
        num_train_timesteps=100,
        trained_betas=[0.0005 + 0.0002 * i for i in range(100)],
        noise_sampler_seed=8,
    ),
    C("DPMSolverSDEScheduler", steps=1, noise_sampler_seed=6),  # a single Euler step to sigma = 0
    # ---- Flow-matching Euler (SD3 / Flux). Flux: sigmas np.linspace(1, 1/N, N) and mu from the
    # image's token count, (px / 16)^2 (2 x 2 patches of the 8x-downsampled latents)
    C("FlowMatchEulerDiscreteScheduler"),
    C("FlowMatchEulerDiscreteScheduler", shift=3.0),  # SD3
    *[
        C("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True, set_kwargs={"mu": flux_mu((px // 16) ** 2)})
        for px in (256, 512, 1024)
    ],
    C(
        "FlowMatchEulerDiscreteScheduler",
        steps=None,
        use_dynamic_shifting=True,
        set_kwargs={"sigmas": np.linspace(1.0, 1 / 10, 10), "mu": flux_mu(4096)},
    ),
    C("FlowMatchEulerDiscreteScheduler", steps=None, shift=3.0, set_kwargs={"sigmas": np.linspace(1.0, 1 / 8, 8)}),
    C("FlowMatchEulerDiscreteScheduler", steps=None, set_kwargs={"sigmas": [1.0, 0.8, 0.55, 0.3, 0.1]}),
    C(
        "FlowMatchEulerDiscreteScheduler",
        steps=None,
        shift=3.0,
        set_kwargs={"timesteps": [999.0, 750.5, 500.0, 250.25, 10.0]},
    ),
    C(
        "FlowMatchEulerDiscreteScheduler",
        steps=None,
        shift=2.0,
        set_kwargs={"timesteps": [999.0, 750.5, 500.0, 250.25, 10.0], "sigmas": [1.0, 0.8, 0.55, 0.3, 0.1]},
    ),
    C("FlowMatchEulerDiscreteScheduler", invert_sigmas=True),
    C(
        "FlowMatchEulerDiscreteScheduler",
        steps=None,
        invert_sigmas=True,
        shift=3.0,
        set_kwargs={"timesteps": [900.0, 400.0, 50.0]},
    ),
    C("FlowMatchEulerDiscreteScheduler", shift_terminal=0.02, shift=3.0),
    C(
        "FlowMatchEulerDiscreteScheduler",
        steps=None,
        shift_terminal=0.1,
        use_dynamic_shifting=True,
        set_kwargs={"sigmas": np.linspace(1.0, 1 / 10, 10), "mu": 0.9},
    ),
    C("FlowMatchEulerDiscreteScheduler", use_karras_sigmas=True),
    C("FlowMatchEulerDiscreteScheduler", use_karras_sigmas=True, shift=3.0),
    C("FlowMatchEulerDiscreteScheduler", use_exponential_sigmas=True, shift=3.0),
    C("FlowMatchEulerDiscreteScheduler", use_beta_sigmas=True, shift=3.0),
    C(
        "FlowMatchEulerDiscreteScheduler",
        steps=None,
        use_beta_sigmas=True,
        use_dynamic_shifting=True,
        set_kwargs={"sigmas": np.linspace(1.0, 1 / 10, 10), "mu": 1.0},
    ),
    C("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True, time_shift_type="linear", set_kwargs={"mu": 0.8}),
    C("FlowMatchEulerDiscreteScheduler", stochastic_sampling=True),
    C("FlowMatchEulerDiscreteScheduler", stochastic_sampling=True, use_dynamic_shifting=True, set_kwargs={"mu": 1.1}),
    C("FlowMatchEulerDiscreteScheduler", num_train_timesteps=100, shift=1.5, steps=7),
    C("FlowMatchEulerDiscreteScheduler", steps=1),
    C("FlowMatchEulerDiscreteScheduler", steps=28, use_dynamic_shifting=True, set_kwargs={"mu": flux_mu(4096)}),
]

# special shapes and noise sources
CASES += [
    Case("EDMEulerScheduler", {}, step_kwargs={"s_churn": 1.0}, generator_list=True),
    Case("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, generator_list=True),
    Case("DDPMScheduler", {"variance_type": "learned_range"}, double_output=True),
    Case("DDPMScheduler", {"variance_type": "learned", "clip_sample": False}, double_output=True),
    Case(
        "DPMSolverMultistepScheduler",
        {"variance_type": "learned_range"},
        shape=(2, 3, 8, 8),
        double_output=True,
    ),
    Case("EulerAncestralDiscreteScheduler", {}, generator_list=True),
    Case("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, generator_list=True),
    Case("DDPMScheduler", {"timestep_spacing": "trailing"}, generator_list=True),
    Case("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, generator_list=True),
    Case("LCMScheduler", {}, steps=4, generator_list=True),
    Case("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, generator_list=True),
    # Flux's packed latents: (batch, tokens, channels)
    Case("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, set_kwargs={"mu": 0.7}, shape=(2, 16, 8)),
]


def toy_model(x: torch.Tensor, t, double: bool = False) -> torch.Tensor:
    """A fixed, smooth "denoiser": the same function of (input, timestep) for both libraries."""
    t = torch.as_tensor(t, dtype=torch.float32)
    out = 0.6 * torch.tanh(0.7 * x + 0.0017 * t) + 0.05 * torch.cos(3.0 * x)
    if double:
        out = torch.cat([out, 0.5 + 0.4 * torch.tanh(0.3 * x - 0.2)], dim=1)  # a variance in (0.1, 0.9)
    return out


def accepted(fn, kwargs: dict) -> dict:
    """The reference's step functions reject unknown keywords; pass only what they take."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


_PRISTINE_REFERENCE: dict = {}


def build(lib: str, case: Case):
    if lib == "ref":  # some reference constructors are slow (KDPM2: ~0.6 s); build each case once
        key = case.id + repr(case.set_kwargs)
        if key not in _PRISTINE_REFERENCE:
            _PRISTINE_REFERENCE[key] = _build(lib, case)
        return copy.deepcopy(_PRISTINE_REFERENCE[key])
    return _build(lib, case)


def _build(lib: str, case: Case):
    cls = getattr(diffusers, case.cls) if lib == "ref" else find_class(case.cls)
    scheduler = cls(**case.config)
    scheduler.set_timesteps(case.steps, **case.set_kwargs) if case.steps is not None else scheduler.set_timesteps(
        **case.set_kwargs
    )
    return scheduler


def generators(case: Case, seed: int = 1234):
    if case.generator_list:
        return [torch.Generator().manual_seed(seed + i) for i in range(case.shape[0])]
    return torch.Generator().manual_seed(seed)


def _init_noise_sigma(scheduler):
    # (the reference's flow-matching schedulers have none: their latents are plain N(0, I) noise)
    return getattr(scheduler, "init_noise_sigma", 1.0)


def _scale_model_input(scheduler, x, t):
    # (nor a scale_model_input: the model sees the sample as it is)
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


def trajectory(lib: str, case: Case):
    """Run the scheduler; return (scheduler, [model input per step], [step output tuple per step])."""
    scheduler = build(lib, case)
    generator = generators(case)
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(7)) * _init_noise_sigma(scheduler)
    inputs, outputs = [], []
    for t in scheduler.timesteps:
        model_input = _scale_model_input(scheduler, x, t)
        inputs.append(model_input)
        kwargs = accepted(scheduler.step, {"generator": generator, **case.step_kwargs})
        out = scheduler.step(toy_model(model_input, t, case.double_output), t, x, **kwargs)
        outputs.append(out.to_tuple())
        x = out.prev_sample
    return scheduler, inputs, outputs


def assert_close(ours, ref, what: str):
    assert isinstance(ours, torch.Tensor), f"{what}: expected a tensor, got {type(ours).__name__}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the reference produced non-finite values (bad test case)"
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= ATOL, f"{what}: max abs difference {err:.3g} > {ATOL}"


def assert_schedule_equal(ours: torch.Tensor, ref: torch.Tensor, what: str, *, fuzzy: bool = False):
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != reference {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: {ours.tolist()} != reference {ref.tolist()}"
    if fuzzy:  # values from our Beta quantile (no scipy): equal to ~1e-13, not bit for bit
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9, equal_nan=True)
    else:
        assert torch.equal(ours.nan_to_num(), ref.nan_to_num()), f"{what}: {ours.tolist()} != reference {ref.tolist()}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_schedule_matches_reference(case: Case):
    ref, ours = build("ref", case), build("ours", case)
    assert_schedule_equal(ours.timesteps, ref.timesteps, "timesteps", fuzzy=case.beta_sigmas)
    for name in ("sigmas", "sigmas_interpol"):
        if hasattr(ref, name):
            assert_schedule_equal(getattr(ours, name), getattr(ref, name), name, fuzzy=case.beta_sigmas)
    assert float(ours.init_noise_sigma) == float(_init_noise_sigma(ref))
    assert ours.order == ref.order
    assert ours.num_inference_steps == ref.num_inference_steps
    assert len(ours) == len(ref)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_trajectory_matches_reference(case: Case):
    _, ref_inputs, ref_outputs = trajectory("ref", case)
    ours, our_inputs, our_outputs = trajectory("ours", case)
    assert len(our_outputs) == len(ref_outputs) > 0
    for i, (a, b) in enumerate(zip(our_inputs, ref_inputs)):
        assert_close(a, b, f"model input at step {i}")
    for i, (a, b) in enumerate(zip(our_outputs, ref_outputs)):
        assert len(a) == len(b), f"step {i}: output has {len(a)} fields, the reference {len(b)}"
        for j, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"step {i}, output field {j}")
    if getattr(ours, "step_index", None) is not None:
        assert ours.step_index == len(ours.timesteps)


def _stochastic_case(name: str) -> Case:
    config = {
        "DPMSolverMultistepScheduler": {"algorithm_type": "sde-dpmsolver++"},
        "FlowMatchEulerDiscreteScheduler": {"stochastic_sampling": True},
    }.get(name, {})
    steps = 4 if name in ("LCMScheduler", "TCDScheduler") else 10
    step_kwargs = {"DDIMScheduler": {"eta": 1.0}, "EulerDiscreteScheduler": {"s_churn": 1.0}}.get(name, {})
    return Case(name, config, steps, step_kwargs=step_kwargs)


STOCHASTIC = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "FlowMatchEulerDiscreteScheduler",
]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seed_matters_for_stochastic_samplers(name):
    """The noise really comes from the generator: another seed gives another trajectory."""
    case = _stochastic_case(name)
    _, _, first = trajectory("ours", case)
    case_other = Case(name, case.config, case.steps, step_kwargs=case.step_kwargs)
    scheduler = build("ours", case_other)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * _init_noise_sigma(scheduler)
    g = torch.Generator().manual_seed(99)
    for t in scheduler.timesteps:
        kwargs = {"generator": g, **case.step_kwargs}
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
    assert (x - first[-1][0]).abs().max() > 1e-3


def test_variance_noise_replaces_the_generator_in_ddim_and_dpm_sde():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for name, config, kwargs in (
        ("DDIMScheduler", {}, {"eta": 0.7}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ):
        results = []
        for lib in ("ref", "ours"):
            s = build(lib, Case(name, config))
            t = s.timesteps[0]
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
            results.append(s.step(toy_model(x, t), t, x, variance_noise=noise, **kwargs).prev_sample)
        assert_close(results[1], results[0], f"{name} with variance_noise")


# ------------------------------------------------------------------------------------------------
# scale_model_input and add_noise

ALL = list(SCHEDULERS)
# the flow-matching scheduler's forward process is scale_noise, and its model input the sample itself
# (the reference has neither add_noise nor scale_model_input there): test_flow_match_euler.py
WITH_ADD_NOISE = [n for n in ALL if hasattr(getattr(diffusers, n), "add_noise")]
NOISE_CONFIGS = {
    "EulerDiscreteScheduler": [{}, {"use_karras_sigmas": True, "timestep_spacing": "leading"}],
    "HeunDiscreteScheduler": [{}, {"use_exponential_sigmas": True}],
    "KDPM2DiscreteScheduler": [{}, {"timestep_spacing": "trailing"}],
    "DPMSolverMultistepScheduler": [{}, {"use_karras_sigmas": True}],
    "DEISMultistepScheduler": [{}, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}],
    "UniPCMultistepScheduler": [{}, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}],
}


def _noise_cases():
    for name in WITH_ADD_NOISE:
        for config in NOISE_CONFIGS.get(name, [{}]):
            yield pytest.param(name, config, id=f"{name}[{','.join(f'{k}={v}' for k, v in config.items())}]")


@pytest.mark.parametrize(("name", "config"), list(_noise_cases()))
def test_add_noise_matches_reference(name, config):
    steps = 4 if name in ("LCMScheduler", "TCDScheduler") else 10
    ref, ours = build("ref", Case(name, config, steps)), build("ours", Case(name, config, steps))
    x0 = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    positions = [0, 2, len(ref.timesteps) - 1]
    timesteps = ref.timesteps[positions]
    assert_close(ours.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps), "add_noise")
    if hasattr(ref, "set_begin_index"):
        # image-to-image: the pipeline sets where the run starts, then noises at that timestep
        for s in (ref, ours):
            s.set_begin_index(2)
        t = ref.timesteps[2].repeat(3)
        assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), "add_noise after set_begin_index")
        assert ours.begin_index == ref.begin_index == 2
        assert_close(ours.scale_model_input(x0, t[0]), ref.scale_model_input(x0, t[0]), "scale_model_input mid-run")


@pytest.mark.parametrize("name", WITH_ADD_NOISE)
def test_scale_model_input_matches_reference_at_every_timestep(name):
    steps = 4 if name in ("LCMScheduler", "TCDScheduler") else 10
    ref, ours = build("ref", Case(name, {}, steps)), build("ours", Case(name, {}, steps))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    for i, t in enumerate(ref.timesteps):
        for s in (ref, ours):  # position the scheduler at step i (img2img-style) and scale
            if hasattr(s, "_step_index"):
                s._step_index = None
                s.set_begin_index(i)
        assert_close(ours.scale_model_input(x, t), ref.scale_model_input(x, t), f"scale_model_input at position {i}")


@pytest.mark.parametrize("name", ALL)
def test_state_before_set_timesteps_matches_reference(name):
    """Right after construction (training schedule, initial timesteps/sigmas, counters)."""
    ours, ref = find_class(name)(), getattr(diffusers, name)()
    for attr in ("timesteps", "sigmas", "sigmas_interpol", "betas", "alphas_cumprod", "init_noise_sigma"):
        if not hasattr(ref, attr):
            continue
        a, b = getattr(ours, attr), getattr(ref, attr)
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype, attr
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), attr
        else:
            assert a == b, attr
    assert ours.num_inference_steps == getattr(ref, "num_inference_steps", None)
    assert ours.order == ref.order


def test_get_velocity_matches_reference():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    for name in ("DDPMScheduler", "DDIMScheduler", "LCMScheduler"):
        ref, ours = getattr(diffusers, name)(), find_class(name)()
        t = torch.tensor([10, 500])
        assert_close(ours.get_velocity(x, noise, t), ref.get_velocity(x, noise, t), f"{name}.get_velocity")
    ref, ours = build("ref", Case("EulerDiscreteScheduler")), build("ours", Case("EulerDiscreteScheduler"))
    t = ref.timesteps[[1, 6]]
    assert_close(ours.get_velocity(x, noise, t), ref.get_velocity(x, noise, t), "EulerDiscreteScheduler.get_velocity")


def test_return_dict_false_gives_the_reference_tuple():
    for name in ALL:
        steps = 4 if name in ("LCMScheduler", "TCDScheduler") else 10
        ref, ours = build("ref", Case(name, {}, steps)), build("ours", Case(name, {}, steps))
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
        t = ref.timesteps[0]
        got = ours.step(toy_model(x, t), t, x, return_dict=False, generator=torch.Generator().manual_seed(0))
        want = ref.step(toy_model(x, t), t, x, **accepted(ref.step, {"return_dict": False}))
        assert isinstance(got, tuple) and len(got) == len(want), name
        out = ours.step(toy_model(x, ours.timesteps[1]), ours.timesteps[1], got[0])
        assert out[0] is out.prev_sample and out.to_tuple()[0] is out.prev_sample


def test_pipelines_can_pass_the_same_step_arguments_to_every_scheduler():
    """eta, generator, variance_noise, use_clipped_model_output and unknown keywords are accepted
    (and ignored where unused), so a pipeline never needs to inspect signatures."""
    for name in ALL:
        steps = 4 if name in ("LCMScheduler", "TCDScheduler") else 10
        s = build("ours", Case(name, {}, steps))
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
        t = s.timesteps[0]
        x = s.scale_model_input(x, t)
        out = s.step(
            toy_model(x, t),
            t,
            x,
            eta=0.0,
            generator=torch.Generator().manual_seed(0),
            use_clipped_model_output=False,
            return_dict=True,
            some_future_argument=1,
        )
        assert out.prev_sample.shape == x.shape


# ------------------------------------------------------------------------------------------------
# DPM-Solver SDE: where its noise comes from, and its optional dependency (torchsde)


def test_dpm_solver_sde_noise_comes_from_noise_sampler_seed_or_the_global_generator():
    case = Case("DPMSolverSDEScheduler", {}, 6)
    with torch.random.fork_rng():
        # unseeded, each library draws the tree's seed from torch's global generator: seeded alike, alike
        torch.manual_seed(2024)
        _, _, ref = trajectory("ref", case)
        torch.manual_seed(2024)
        _, _, ours = trajectory("ours", case)
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_close(a[0], b[0], f"unseeded, step {i}")
        torch.manual_seed(2025)
        _, _, other = trajectory("ours", case)
        assert (other[-1][0] - ours[-1][0]).abs().max() > 1e-3
        # a noise_sampler_seed fixes the noise whatever the global generator's state
        seeded = Case("DPMSolverSDEScheduler", {"noise_sampler_seed": 5}, 6)
        torch.manual_seed(1)
        _, _, first = trajectory("ours", seeded)
        torch.manual_seed(2)
        _, _, second = trajectory("ours", seeded)
        assert torch.equal(first[-1][0], second[-1][0])


def test_dpm_solver_sde_without_torchsde_says_how_to_install_it(monkeypatch):
    import subprocess
    import sys

    from diffpipe.errors import ConfigError

    code = "import sys, diffpipe; from diffpipe import DPMSolverSDEScheduler; assert 'torchsde' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)  # importing diffpipe (and the class) never needs it

    cls = find_class("DPMSolverSDEScheduler")
    with pytest.raises(ConfigError, match=r"prediction_type.*'v_prediction'.*got 'sample'"):
        cls(prediction_type="sample")  # the reference fails at its first step; we say so up front
    built = cls(noise_sampler_seed=0)
    built.set_timesteps(4)
    monkeypatch.setitem(sys.modules, "torchsde", None)  # how a missing package looks to `import`
    message = r"DPMSolverSDEScheduler needs the torchsde package.*pip install torchsde.*diffpipe\[sde\]"
    with pytest.raises(ImportError, match=message):
        cls()
    x = torch.zeros(SHAPE)
    with pytest.raises(ImportError, match=message):  # a scheduler built before it went missing: at the first step
        built.step(x, built.timesteps[0], x)
