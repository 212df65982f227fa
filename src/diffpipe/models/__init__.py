"""Models (nn.Modules whose parameter names are the checkpoint keys)."""

# Class name -> "module:attribute"; read by diffpipe.registry (the allow-list).
MODELS: dict[str, str] = {
    "UNet2DConditionModel": "diffpipe.models.unet_2d_condition:UNet2DConditionModel",
    "AutoencoderKL": "diffpipe.models.autoencoder_kl:AutoencoderKL",
    "AsymmetricAutoencoderKL": "diffpipe.models.autoencoder_asym:AsymmetricAutoencoderKL",
    "AutoencoderTiny": "diffpipe.models.autoencoder_tiny:AutoencoderTiny",
    "MotionAdapter": "diffpipe.models.motion:MotionAdapter",
    "UNetMotionModel": "diffpipe.models.unet_motion:UNetMotionModel",
    "UNet2DModel": "diffpipe.models.unet_2d:UNet2DModel",
    "ControlNetModel": "diffpipe.models.controlnet:ControlNetModel",
    "MultiControlNetModel": "diffpipe.models.multicontrolnet:MultiControlNetModel",
    "FluxTransformer2DModel": "diffpipe.models.transformer_flux:FluxTransformer2DModel",
}
