"""Pipelines: thin task files over shared stages."""

# Class name -> "module:attribute"; read by diffpipe.registry (the allow-list).
PIPELINES: dict[str, str] = {
    "DiffusionPipeline": "diffpipe.pipelines.pipeline:DiffusionPipeline",
    "StableDiffusionPipeline": "diffpipe.pipelines.stable_diffusion:StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "diffpipe.pipelines.sd_img2img:StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "diffpipe.pipelines.sd_inpaint:StableDiffusionInpaintPipeline",
    "StableDiffusionSAGPipeline": "diffpipe.pipelines.sag:StableDiffusionSAGPipeline",
    "StableDiffusionXLPipeline": "diffpipe.pipelines.sd_xl:StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "diffpipe.pipelines.sd_xl_img2img:StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline": "diffpipe.pipelines.sd_xl_inpaint:StableDiffusionXLInpaintPipeline",
    "StableDiffusionControlNetPipeline": "diffpipe.pipelines.controlnet_sd:StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline": "diffpipe.pipelines.controlnet_sd:StableDiffusionControlNetImg2ImgPipeline",  # noqa: E501
    "StableDiffusionControlNetInpaintPipeline": "diffpipe.pipelines.controlnet_sd:StableDiffusionControlNetInpaintPipeline",  # noqa: E501
    "StableDiffusionXLControlNetPipeline": "diffpipe.pipelines.controlnet_sdxl:StableDiffusionXLControlNetPipeline",
    "FluxPipeline": "diffpipe.pipelines.flux:FluxPipeline",
    "FluxImg2ImgPipeline": "diffpipe.pipelines.flux_image:FluxImg2ImgPipeline",
    "FluxInpaintPipeline": "diffpipe.pipelines.flux_image:FluxInpaintPipeline",
    "AnimateDiffPipeline": "diffpipe.pipelines.animatediff:AnimateDiffPipeline",
    "DDPMPipeline": "diffpipe.pipelines.unconditional:DDPMPipeline",
    "DDIMPipeline": "diffpipe.pipelines.unconditional:DDIMPipeline",
    "AutoPipelineForText2Image": "diffpipe.pipelines.auto:AutoPipelineForText2Image",
    "AutoPipelineForImage2Image": "diffpipe.pipelines.auto:AutoPipelineForImage2Image",
    "AutoPipelineForInpainting": "diffpipe.pipelines.auto:AutoPipelineForInpainting",
    "StableDiffusionSafetyChecker": "diffpipe.pipelines.safety_checker:StableDiffusionSafetyChecker",
}
