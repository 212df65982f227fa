"""Schedulers: one algorithm per file, shared math in base.py, prediction.py and sigmas.py.

Nothing is imported here: ``diffpipe.registry`` reads the table below and imports a module only
when its class is used (``from diffpipe import DDIMScheduler``).
"""

from .ays import AysSchedules  # noqa: F401  (plain data, no torch)

# Class name -> "module:attribute"; read by diffpipe.registry (the allow-list).
SCHEDULERS: dict[str, str] = {
    "DDPMScheduler": "diffpipe.schedulers.ddpm:DDPMScheduler",
    "DDIMScheduler": "diffpipe.schedulers.ddim:DDIMScheduler",
    "PNDMScheduler": "diffpipe.schedulers.pndm:PNDMScheduler",
    "EulerDiscreteScheduler": "diffpipe.schedulers.euler:EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler": "diffpipe.schedulers.euler_ancestral:EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler": "diffpipe.schedulers.heun:HeunDiscreteScheduler",
    "LMSDiscreteScheduler": "diffpipe.schedulers.lms:LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler": "diffpipe.schedulers.dpm_solver:DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler": "diffpipe.schedulers.dpm_solver_singlestep:DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler": "diffpipe.schedulers.kdpm2:KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler": "diffpipe.schedulers.kdpm2_ancestral:KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler": "diffpipe.schedulers.deis:DEISMultistepScheduler",
    "UniPCMultistepScheduler": "diffpipe.schedulers.unipc:UniPCMultistepScheduler",
    "LCMScheduler": "diffpipe.schedulers.lcm:LCMScheduler",
    "TCDScheduler": "diffpipe.schedulers.tcd:TCDScheduler",
    "EDMEulerScheduler": "diffpipe.schedulers.edm_euler:EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler": "diffpipe.schedulers.edm_dpm_solver:EDMDPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler": "diffpipe.schedulers.dpm_solver_sde:DPMSolverSDEScheduler",
    "FlowMatchEulerDiscreteScheduler": "diffpipe.schedulers.flow_match_euler:FlowMatchEulerDiscreteScheduler",
}
