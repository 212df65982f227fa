"""StableDiffusionSafetyChecker: CLIP image embeddings compared with fixed concept embeddings.

A transformers ``PreTrainedModel`` with a ``CLIPConfig`` (checkpoints store it as ``config.json`` +
``model.safetensors``), with the reference's parameter names: ``vision_model.*``,
``visual_projection``, ``concept_embeds``, ``special_care_embeds`` and their ``*_weights``
thresholds. An image is flagged when its cosine similarity to any concept exceeds that concept's
threshold; once a "special care" concept fires, every later threshold is lowered by 0.01.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel

logger = logging.getLogger(__name__)

NUM_CONCEPTS = 17
NUM_SPECIAL = 3
SPECIAL_CARE_ADJUSTMENT = 0.01


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (nn.functional.normalize(a) @ nn.functional.normalize(b).t()).cpu().float().numpy()


class StableDiffusionSafetyChecker(PreTrainedModel):
    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]
    _library_name = "stable_diffusion"  # what model_index.json records for this class

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        dim = config.projection_dim
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(NUM_CONCEPTS, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(NUM_SPECIAL, dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(NUM_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(NUM_SPECIAL), requires_grad=False)
        self.post_init()

    def _init_weights(self, module):  # weights always come from the checkpoint
        pass

    @torch.no_grad()
    def flags(self, clip_input: torch.Tensor) -> list[bool]:
        """Whether each image shows a flagged concept."""
        embeds = self.visual_projection(self.vision_model(clip_input)[1])
        special = _cosine(embeds, self.special_care_embeds)
        concepts = _cosine(embeds, self.concept_embeds)
        special_thresholds = self.special_care_embeds_weights.float().cpu().numpy()
        concept_thresholds = self.concept_embeds_weights.float().cpu().numpy()
        flagged = []
        for i in range(embeds.shape[0]):
            adjustment = 0.0
            for k in range(special.shape[1]):  # sequential: a firing concept lowers the later thresholds
                if np.round(special[i, k] - special_thresholds[k] + adjustment, 3) > 0:
                    adjustment = SPECIAL_CARE_ADJUSTMENT
            scores = np.round(concepts[i] - concept_thresholds + adjustment, 3)
            flagged.append(bool((scores > 0).any()))
        return flagged

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images):
        """(images with flagged ones replaced by black, flags)."""
        flagged = self.flags(clip_input)
        for idx, bad in enumerate(flagged):
            if bad:
                images[idx] = (
                    torch.zeros_like(images[idx]) if torch.is_tensor(images[idx]) else np.zeros(images[idx].shape)
                )
        if any(flagged):
            logger.warning(
                "Potential NSFW content was detected in one or more images; a black image is returned instead. "
                "Try again with a different prompt and/or seed."
            )
        return images, flagged
