"""CPU offload: keep models in CPU memory and move each to the accelerator only while it runs.

Model offload (``enable_model_cpu_offload``) puts a forward pre-hook on every model component. The
hooks share one :class:`OffloadGroup`: when a model is called, the group moves the model that was
on the accelerator back to the CPU and this one onto the accelerator, so at most one model is there
at a time. Because the hooks live on the component objects and the group is found through them,
a pipeline made with ``from_pipe`` inherits working offload without re-applying it, and the source
pipeline's offload keeps working (the reference's hooks break in both cases: upstream issues 5281
and 7448). Sequential offload (``enable_sequential_cpu_offload``) does the same per leaf module:
lowest memory, most transfers.
"""

from __future__ import annotations

import torch

from ..runtime.hooks import OFFLOAD, ModuleHook, add_hook, get_hook, remove_hook

_LEAF = "offload_leaf"


class OffloadGroup:
    """Models that take turns on ``device``; everything else stays on ``home`` (the CPU)."""

    def __init__(self, device: torch.device, home: torch.device = torch.device("cpu")):
        self.device = torch.device(device)
        self.home = torch.device(home)
        self.active: torch.nn.Module | None = None
        self.log: list[tuple[str, str]] = []  # (event, module name): what moved where, for tests and debugging
        self.names: dict[int, str] = {}

    def bring(self, module: torch.nn.Module) -> None:
        if self.active is module:
            return
        if self.active is not None:
            self.send_home(self.active)
        module.to(self.device)
        self.active = module
        self.log.append(("to_device", self.names.get(id(module), type(module).__name__)))

    def send_home(self, module: torch.nn.Module) -> None:
        module.to(self.home)
        self.log.append(("to_home", self.names.get(id(module), type(module).__name__)))
        if self.active is module:
            self.active = None

    def release(self) -> None:
        """Move the model still on the accelerator home (after a pipeline call)."""
        if self.active is not None:
            self.send_home(self.active)


class ModelOffload(ModuleHook):
    """Model offload: the model joins its group's device whenever it is called. ``device`` is where its
    forward runs (the CPU-kernel mode reads it)."""

    def __init__(self, group: OffloadGroup):
        self.group = group
        self.device = group.device

    def pre_forward(self, module, args, kwargs):
        self.group.bring(module)


class SequentialOffload(ModuleHook):
    """Sequential offload, on the model: where its leaves run; removing it removes theirs too."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.group = None

    def on_remove(self, module) -> None:
        for leaf in module.modules():
            remove_hook(leaf, _LEAF)


class LeafOffload(ModuleHook):
    """Sequential offload, on a module with weights of its own: on ``device`` for its forward only."""

    def __init__(self, device: torch.device, home: torch.device):
        self.device, self.home = torch.device(device), torch.device(home)

    def pre_forward(self, module, args, kwargs):
        module.to(self.device)

    def post_forward(self, module, args, kwargs, output):
        module.to(self.home)
        return output


def attach(group: OffloadGroup, name: str, module: torch.nn.Module) -> None:
    """Bring ``module`` to the group's device when called (replacing any other offload it had)."""
    group.names[id(module)] = name
    hook = get_hook(module, OFFLOAD)
    if isinstance(hook, ModelOffload) and hook.group is group:
        return
    add_hook(module, OFFLOAD, ModelOffload(group))
    module.to(group.home)


def group_of(components: dict) -> OffloadGroup | None:
    """The offload group the components already belong to (shared through from_pipe), if any."""
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            hook = get_hook(component, OFFLOAD)
            if isinstance(hook, ModelOffload):
                return hook.group
    return None


def bring_to_device(module: torch.nn.Module) -> None:
    """Under model offload, bring ``module`` to the accelerator before calling a method other than
    forward (a VAE's ``decode``)."""
    hook = get_hook(module, OFFLOAD)
    if isinstance(hook, ModelOffload):
        hook.group.bring(module)


def attach_sequential(module: torch.nn.Module, device: torch.device, home: torch.device) -> None:
    """Per leaf module: onto ``device`` just before its forward, home right after."""
    if not isinstance(get_hook(module, OFFLOAD), SequentialOffload):
        add_hook(module, OFFLOAD, SequentialOffload(device))
    for leaf in module.modules():
        if any(True for _ in leaf.parameters(recurse=False)) or any(True for _ in leaf.buffers(recurse=False)):
            if get_hook(leaf, _LEAF) is not None:
                continue
            add_hook(leaf, _LEAF, LeafOffload(device, home))
            leaf.to(home)


class OffloadMixin:
    """``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` for DiffusionPipeline."""

    def _default_accelerator(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        raise RuntimeError(
            "CPU offload moves models to an accelerator while they run, and none is available; pass device= "
            "explicitly (for example device='cpu' to test the hooks)"
        )

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep models on the CPU; each moves to ``device`` when it runs (one model there at a time)."""
        device = torch.device(device) if device is not None else self._default_accelerator()
        if device.type != "cpu" and device.index is None and gpu_id is not None:
            device = torch.device(device.type, gpu_id)
        group = group_of(self.components)
        if group is None or group.device != device:
            group = OffloadGroup(device)
        for name, module in self._modules_in_order():
            attach(group, name, module)
        object.__setattr__(self, "_offload_device", device)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Lowest memory: every leaf module moves to ``device`` only for its own forward."""
        device = torch.device(device) if device is not None else self._default_accelerator()
        if device.type != "cpu" and device.index is None and gpu_id is not None:
            device = torch.device(device.type, gpu_id)
        for _, module in self._modules_in_order():
            remove_hook(module, OFFLOAD)
            attach_sequential(module, device, torch.device("cpu"))
        object.__setattr__(self, "_offload_device", device)

    def remove_all_hooks(self) -> None:
        """Turn CPU offload off: every model component loses its offload hooks (and stays where it is)."""
        for _, module in self._modules_in_order():
            remove_hook(module, OFFLOAD)
        object.__setattr__(self, "_offload_device", None)

    def maybe_free_model_hooks(self) -> None:
        """After a call: the model left on the accelerator goes back to the CPU."""
        group = group_of(self.components)
        if group is not None:
            group.release()

    def _inherit_offload(self, source) -> None:
        """Called by from_pipe: the new pipeline joins the source's offload, its new models too."""
        device = getattr(source, "_offload_device", None)
        if device is None:
            return
        group = group_of(source.components)
        object.__setattr__(self, "_offload_device", device)
        if group is not None:
            for name, module in self._modules_in_order():
                attach(group, name, module)
        else:  # sequential offload: new leaf modules get the same per-module hooks
            for _, module in self._modules_in_order():
                attach_sequential(module, device, torch.device("cpu"))
