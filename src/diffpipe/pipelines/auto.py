"""AutoPipelineFor*: pick the task class of a checkpoint's model family.

A checkpoint names its pipeline class (``_class_name``); the family is looked up in one table whose
columns are the tasks. ``from_pipe`` maps a loaded pipeline to the same family's task class and
reuses its components.
"""

from __future__ import annotations

import os

from ..errors import UnsupportedComponentError
from ..registry import find_class

TASKS = ("text2image", "image2image", "inpainting")

# family -> (text-to-image, image-to-image, inpainting) class names
FAMILIES: dict[str, tuple[str, str, str]] = {
    "stable-diffusion": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "stable-diffusion-xl": (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    "flux": ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    "stable-diffusion-controlnet": (
        "StableDiffusionControlNetPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
    ),
    "stable-diffusion-xl-controlnet": (
        "StableDiffusionXLControlNetPipeline",
        "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
    ),
}
CONTROLNET_SUFFIX = "-controlnet"  # a family's ControlNet variant: what `controlnet=` asks for
_KEEP = object()  # no `controlnet=` given: the pipeline's own variant

# other pipelines of a family that AutoPipeline may be handed (feature pipelines built by from_pipe)
_MEMBERS = {
    "StableDiffusionSAGPipeline": "stable-diffusion",
    "AnimateDiffPipeline": "stable-diffusion",
}


def family_of(class_name: str) -> str | None:
    for family, names in FAMILIES.items():
        if class_name in names:
            return family
    return _MEMBERS.get(class_name)


def task_class(class_name: str, task: str, controlnet=_KEEP):
    """The task's class in ``class_name``'s family; ``controlnet`` (a model, or None) picks the
    family's ControlNet variant (or the plain one), as the reference's AutoPipelines do."""
    family = family_of(class_name)
    if family is None:
        raise UnsupportedComponentError(
            f"AutoPipeline does not know the model family of {class_name!r}; known families: {', '.join(FAMILIES)}"
        )
    if controlnet is not _KEEP:
        plain = family.removesuffix(CONTROLNET_SUFFIX)
        family = plain if controlnet is None else plain + CONTROLNET_SUFFIX
    target = FAMILIES[family][TASKS.index(task)]
    cls = find_class(target)
    if cls is None:
        raise UnsupportedComponentError(f"diffpipe has no {target} yet for the {family} family ({task})")
    return cls


class _AutoPipeline:
    task: str = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built with from_pretrained() or from_pipe(), not called directly")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load the checkpoint with its family's pipeline class for this task."""
        from .. import hub
        from ..io.components import parse_model_index_bytes

        found: dict = {}

        def read_index(files, read):
            if "model_index.json" in files:
                found.update(
                    parse_model_index_bytes(read("model_index.json"), where=str(pretrained_model_name_or_path))
                )
            return ["model_index.json"] if "model_index.json" in files else []

        hub.fetch(
            pretrained_model_name_or_path,
            read_index,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            local_files_only=kwargs.get("local_files_only"),
            token=kwargs.get("token"),
            what=cls.__name__,
        )
        name = found.get("_class_name")
        if not isinstance(name, str):
            raise UnsupportedComponentError(
                f"{cls.__name__}: {pretrained_model_name_or_path} has no model_index.json naming its pipeline class"
            )
        target = task_class(name, cls.task, kwargs.get("controlnet", _KEEP))
        if kwargs.get("controlnet", _KEEP) is None:
            kwargs.pop("controlnet")
        return target.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """The same family's pipeline for this task, sharing ``pipeline``'s components; ``controlnet=``
        a ControlNet (or a list) gives the family's ControlNet pipeline, ``controlnet=None`` the plain one."""
        target = task_class(type(pipeline).__name__, cls.task, kwargs.get("controlnet", _KEEP))
        if kwargs.get("controlnet", _KEEP) is None:
            kwargs.pop("controlnet")
        return target.from_pipe(pipeline, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text2image"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image2image"


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpainting"
