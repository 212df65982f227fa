"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): reuse a UNet's deep
features across denoising steps. Opt-in: ``pipe.enable_deepcache(cache_interval=3, cache_branch_id=0)``,
``pipe.disable_deepcache()``; without it nothing here runs.

What it does (the semantics of the reference implementation, ``DeepCacheSDHelper`` of the DeepCache
package 0.1.1, found by running it with hooks on every block):

- **Steps.** A step's number is the position of its timestep in ``scheduler.timesteps`` (for a
  timestep that repeats there, as in PNDM's and Heun's schedules, its first position: both of its
  UNet calls share one number), counted from the call's first step (so img2img with ``strength < 1``
  starts at 0). A step whose number is a multiple of ``cache_interval`` is a *full* step: the whole
  UNet runs and its features are kept. The others are *skip* steps. The count starts again at every
  pipeline call; ``cache_interval=1`` runs every step in full and keeps nothing.
- **Branches.** ``cache_branch_id`` names a skip branch by (block, layer) = ``divmod(id, 3)``: three
  per down block, as SD 1.x has them (two resnets and a downsampler), whatever the UNet's
  ``layers_per_block``; valid ids are ``0 .. 3 * len(down_blocks) - 1``. Counting the layers of a
  down block as its resnets then its downsampler, and those of an up block from its last resnet
  (which reads the shallowest skip) back to its first, a skip step computes:

  * ``conv_in``, the time embedding, ``conv_out``;
  * the down layers before (block, layer) (whole down blocks here: block ``i`` runs if
    ``3 * i + 1 <= id``; the layers it computes beyond the branch feed only cached layers);
  * not the mid block, nor the up blocks deeper than ``block``;
  * in the up block mirroring ``block`` (up block ``len(down_blocks) - 1 - block``), its last
    ``layer + 1`` layers, starting from the features its first skipped layer left at the last full
    step (the whole block, from the up block before it, if ``layer + 1`` covers it);
  * every up block after it.

- **Several UNet calls in one step** (SAG's second prediction on the degraded latents, of another
  batch size) each keep their own cache, by their order within the step. (The reference keeps one
  cache for all of them, and SAG fails with it.) SAG also reads the mid block's self-attention map,
  which a skip step does not compute: each call puts back the map its last full step saw.

How it is wired: :func:`enable` attaches a :class:`DeepCache` to the UNet under the name ``deepcache``
(``runtime/hooks.py``); the hook has no forward hooks of its own. The pipeline's call context
(:func:`counting_steps`) hands it the call's state, from which it reads the step (``step_index`` and
``timesteps``, set by the denoising loop) and the scheduler's timesteps, and takes it away (and the
cached features with it) when the call ends. ``unet_body`` asks :func:`step_plan` once per forward:
``None`` when DeepCache is off or the UNet runs outside a pipeline call (an ordinary forward), else a
:class:`StepPlan` that says which blocks run and runs the up block where a skip step starts (keeping or
taking back the features entering it, or, when it starts inside the block, running its layers here as
the block's forward does).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .hooks import ModuleHook, add_hook, get_hook, remove_hook

HOOK = "deepcache"
BRANCHES_PER_BLOCK = 3  # DeepCache numbers skip branches as SD 1.x has them: three per down block
SAG_CAPTURE = "sag_capture"  # the name of SAG's hook on the mid block's first transformer (pipelines/sag.py)


def check_params(unet: nn.Module, cache_interval: int, cache_branch_id: int) -> None:
    n = len(unet.down_blocks)
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise ValueError(
            f"cache_interval must be an integer >= 1 (1 runs the whole UNet at every step); got {cache_interval!r}"
        )
    last = BRANCHES_PER_BLOCK * n - 1
    if isinstance(cache_branch_id, bool) or not isinstance(cache_branch_id, int) or not 0 <= cache_branch_id <= last:
        raise ValueError(
            f"cache_branch_id must be an integer in 0..{last} for this UNet ({n} down blocks, "
            f"{BRANCHES_PER_BLOCK} branches each); got {cache_branch_id!r}"
        )


def enable(unet: nn.Module, cache_interval: int = 3, cache_branch_id: int = 0) -> None:
    """DeepCache on ``unet`` (replacing settings it had); it acts during pipeline calls."""
    check_params(unet, cache_interval, cache_branch_id)
    add_hook(unet, HOOK, DeepCache(len(unet.down_blocks), cache_interval, cache_branch_id))


def disable(unet: nn.Module) -> None:
    remove_hook(unet, HOOK)


@contextlib.contextmanager
def counting_steps(unet: nn.Module | None, scheduler: Any, state: Any):
    """For the length of a pipeline call: the UNet's DeepCache (if on) reads the call's steps from
    ``state``; on leaving, the count and the cached features are dropped."""
    hook = get_hook(unet, HOOK) if unet is not None else None
    if hook is None:
        yield
        return
    hook.begin(scheduler, state)
    try:
        yield
    finally:
        hook.end()


def step_plan(unet: nn.Module) -> StepPlan | None:
    """What this forward of ``unet`` runs: ``None`` for all of it, without caching."""
    hook = get_hook(unet, HOOK)
    return None if hook is None else hook.plan(unet)


class DeepCache(ModuleHook):
    """The settings on a UNet, and during a call, its count of steps and the cached features."""

    def __init__(self, num_down_blocks: int, cache_interval: int, cache_branch_id: int):
        self.interval = cache_interval
        block, self.layer = divmod(cache_branch_id, BRANCHES_PER_BLOCK)
        # a skip step runs down blocks 0 .. down - 1 and up blocks first_up .. n - 1 (first_up partly)
        self.down = min(num_down_blocks, block + (self.layer > 0))
        self.first_up = max(0, num_down_blocks - 1 - block)
        self.end()

    def begin(self, scheduler: Any, state: Any) -> None:
        self.end()
        self.scheduler, self.state = scheduler, state

    def end(self) -> None:
        self.scheduler = self.state = None
        self.positions: dict[float, int] | None = None  # timestep -> its first position in the schedule
        self.start: int | None = None  # the position of the call's first step
        self.index = self.calls = -1  # the loop's step of the last UNet call, and its calls in that step
        self.caches: dict[int, Kept] = {}  # per call within a step

    def _position(self, i: int) -> int:
        t = self.state.timesteps[i]
        if self.positions is None:
            self.positions = {}
            for position, value in enumerate(self.scheduler.timesteps.tolist()):
                self.positions.setdefault(value, position)
        return self.positions.get(t.item(), i)  # (a timestep the schedule lacks: the loop's count)

    @torch.compiler.disable
    def plan(self, unet: nn.Module) -> StepPlan | None:
        """Plain Python, kept out of a compiled UNet (``pipe.compile()``): it reads the step as a number.
        What the compiled body then reads of the plan (full or skip, and at a skip step the kept
        tensors) is the same at every full step and at every skip step, so it compiles once for each."""
        state = self.state
        if state is None or state.timesteps is None or self.interval == 1:
            return None  # outside a pipeline's denoising loop, or nothing to reuse
        i = state.step_index
        self.calls = self.calls + 1 if i == self.index else 0
        self.index = i
        position = self._position(i)
        if self.start is None:
            self.start = position
        cache = self.caches.setdefault(self.calls, Kept())
        full = (position - self.start) % self.interval == 0 or cache.sample is None
        return StepPlan(self, full, cache, _sag_capture(unet))


class Kept:
    """What a full step keeps for the skip steps after it (one per UNet call within a step)."""

    __slots__ = ("skips", "sample", "sag")

    def __init__(self):
        self.skips = 0  # how many skip features a full step has
        self.sample: torch.Tensor | None = None  # the features entering the first layer a skip step runs
        self.sag: tuple | None = None  # SAG's attention map, heads and map size


class StepPlan:
    """One forward's part in DeepCache: a full step keeps what skip steps take back."""

    def __init__(self, hook: DeepCache, full: bool, cache: Kept, capture: Any):
        self.full, self.cache, self.layer = full, cache, hook.layer
        self.down = None if full else hook.down  # how many down blocks run (None: all)
        self.first_up = hook.first_up
        self.capture = capture  # SAG's map of the mid block's attention: kept, or given back
        if capture is not None and not full:
            capture.probs, capture.heads, capture.map_size = cache.sag

    @property
    def runs_mid(self) -> bool:
        return self.full

    def runs_up(self, k: int) -> bool:
        return self.full or k >= self.first_up

    def skips(self, skips: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        """The skip features, as many as a full step has: a skip step lacks those of the down blocks it
        does not run, which only the layers it does not run read."""
        if self.full:
            self.cache.skips = len(skips)
            return skips
        return skips + (None,) * (self.cache.skips - len(skips))

    def enter(self, block: nn.Module, sample, res, emb, upsample_size, kwargs: dict) -> torch.Tensor:
        """Up block ``first_up``: at a full step, the block, keeping what enters the layers a skip step
        runs; at a skip step, those layers from what was kept."""
        first = max(0, len(block.resnets) - 1 - self.layer)  # the first layer a skip step runs
        if self.full:
            if self.capture is not None:  # the mid block has run: this is this call's map
                self.cache.sag = (self.capture.probs, self.capture.heads, self.capture.map_size)
            if first == 0:
                self.cache.sample = sample
                return block(sample, res, emb, upsample_size=upsample_size, **kwargs)
            return up_layers(block, sample, res, emb, upsample_size, kwargs, start=0, keep=(self.cache, first))
        if first == 0:
            return block(self.cache.sample, res, emb, upsample_size=upsample_size, **kwargs)
        return up_layers(block, self.cache.sample, res, emb, upsample_size, kwargs, start=first)


def up_layers(block, sample, res, emb, upsample_size, kwargs: dict, *, start: int, keep=None) -> torch.Tensor:
    """An up block's layers from ``start`` on, then its upsampler (the block's own forward, told where to
    start). ``keep=(cache, first)`` keeps in ``cache.sample`` the features entering layer ``first``."""
    after = None
    if keep is not None:
        cache, first = keep

        def after(i, h):
            if i == first - 1:
                cache.sample = h
            return h

    return block(sample, res, emb, upsample_size=upsample_size, start=start, after_layer=after, **kwargs)


def _sag_capture(unet: nn.Module) -> Any:
    """SAG's capture of the mid block's self-attention map, when a SAG call has one on this UNet."""
    attentions = getattr(getattr(unet, "mid_block", None), "attentions", None)
    if not attentions:
        return None
    hook = get_hook(attentions[0], SAG_CAPTURE)
    return None if hook is None else hook.capture
