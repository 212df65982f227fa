"""One way to attach behaviour to a module and take it off again: named hooks in a per-module registry.

Everything diffpipe attaches to a model at run time goes through here: LoRA (the adapters of a model,
and the low-rank addition on each target layer), IP-Adapter (the attention processors it swaps in),
CPU offload (moving a model or a leaf module to the accelerator for its forward) and SAG's capture of
the mid block's attention map. The CPU-kernel mode and the pipelines find out what is attached by
asking the registry, never by attribute names of their own.

A hook is a :class:`ModuleHook` under a name, at most one per name and module. Adding one installs a
single pair of torch forward hooks on the module (only if some hook of it acts on forward), which
run the module's hooks in the order they were added. Removing a module's last hook removes the torch
hooks and the registry, so ``remove_hook`` / ``remove_all_hooks`` leave the module as it was before:
same attributes, same ``state_dict``, same forward.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

_REGISTRY = "_diffpipe_hooks"
# The name of CPU offload's hook on a model; such a hook has ``device``: where the model's forward runs.
OFFLOAD = "offload"


class ModuleHook:
    """Behaviour attached to one module. Override what the hook needs:

    - ``pre_forward(module, args, kwargs)``: runs before forward; may return new ``(args, kwargs)``;
    - ``post_forward(module, args, kwargs, output)``: runs after forward; returns the output;
    - ``on_remove(module)``: undo what attaching did (put a processor back, drop a module it added).

    A hook that overrides neither forward method only keeps state for the module (a model's LoRA
    adapters) and costs its forward nothing.
    """

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        return None

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        return output

    def on_remove(self, module: nn.Module) -> None:
        pass


def _acts_on(hook: ModuleHook, method: str) -> bool:
    return getattr(type(hook), method) is not getattr(ModuleHook, method)


class HookRegistry:
    """The named hooks of one module, in the order they were added."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.hooks: dict[str, ModuleHook] = {}
        self._handles: list = []

    def _pre(self, module, args, kwargs):
        for hook in list(self.hooks.values()):
            changed = hook.pre_forward(module, args, kwargs)
            if changed is not None:
                args, kwargs = changed
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        for hook in list(self.hooks.values()):
            output = hook.post_forward(module, args, kwargs, output)
        return output

    def _sync(self) -> None:
        """Torch hooks on the module exactly when some hook acts on its forward."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        hooks = self.hooks.values()
        if any(_acts_on(h, "pre_forward") for h in hooks):
            self._handles.append(self.module.register_forward_pre_hook(self._pre, with_kwargs=True))
        if any(_acts_on(h, "post_forward") for h in hooks):
            self._handles.append(self.module.register_forward_hook(self._post, with_kwargs=True))


def _registry(module: nn.Module, create: bool = False) -> HookRegistry | None:
    # getattr, not ``module.__dict__.get``: a compiled module (``pipe.compile()``) reads the registry
    # in its forward, and torch.compile guards an attribute's presence but not a missing dict key, so
    # a hook added after the first compiled call would go unseen
    registry = getattr(module, _REGISTRY, None)
    if registry is None and create:
        registry = module.__dict__[_REGISTRY] = HookRegistry(module)
    return registry


def add_hook(module: nn.Module, name: str, hook: ModuleHook) -> ModuleHook:
    """Attach ``hook`` to ``module`` under ``name`` (removing a hook of that name first)."""
    if get_hook(module, name) is not None:
        remove_hook(module, name)
    registry = _registry(module, create=True)
    registry.hooks[name] = hook
    registry._sync()
    return hook


def get_hook(module: nn.Module, name: str) -> ModuleHook | None:
    registry = _registry(module)
    return None if registry is None else registry.hooks.get(name)


def remove_hook(module: nn.Module, name: str) -> None:
    """Detach the hook ``name`` (its ``on_remove`` runs); nothing happens when there is none."""
    registry = _registry(module)
    hook = None if registry is None else registry.hooks.pop(name, None)
    if hook is None:
        return
    hook.on_remove(module)
    registry._sync()
    if not registry.hooks:
        del module.__dict__[_REGISTRY]


def hooks_named(root: nn.Module, name: str) -> Iterator[tuple[str, nn.Module, ModuleHook]]:
    """(path, module, hook) for every module under ``root`` (itself included) with a hook ``name``."""
    for path, module in root.named_modules():
        hook = get_hook(module, name)
        if hook is not None:
            yield path, module, hook


def remove_all_hooks(root: nn.Module, name: str | None = None) -> None:
    """Detach every hook (or every hook called ``name``) from ``root`` and all its submodules."""
    for module in list(root.modules()):
        registry = _registry(module)
        if registry is None:
            continue
        for hook_name in [n for n in registry.hooks if name is None or n == name]:
            remove_hook(module, hook_name)
