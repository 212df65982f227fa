"""A cheap preview of a job's latents: a per-pixel linear map from latent channels to RGB.

The map is fitted once per pipeline, by least squares, from what the pipeline's own VAE decodes a
small random latent to: so it holds for any VAE (SD, SDXL, a fine-tune, a tiny random test model)
with no table of constants, and a preview then costs one small matrix product instead of a decode.
"""

from __future__ import annotations

import base64
import io
import threading

FIT_SIZE = 16  # latent pixels per side used for the fit


class Previewer:
    def __init__(self, vae):
        self.vae = vae
        self._weights = None  # (3, channels + 1) on the CPU, float32
        self._lock = threading.Lock()

    def _fit(self, channels: int):
        import torch

        vae = self.vae
        param = next(vae.parameters())
        config = vae.config
        scale = float(getattr(config, "scaling_factor", None) or 1.0)
        shift = float(getattr(config, "shift_factor", None) or 0.0)
        z = torch.randn(1, channels, FIT_SIZE, FIT_SIZE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = vae.decode((z / scale + shift).to(param.device, param.dtype))
        rgb = (out.sample if hasattr(out, "sample") else out[0]).float().cpu()
        rgb = torch.nn.functional.adaptive_avg_pool2d(rgb, FIT_SIZE)  # one colour per latent pixel
        x = torch.cat([z.reshape(channels, -1), torch.ones(1, FIT_SIZE * FIT_SIZE)])  # (C+1, P)
        y = rgb.reshape(3, -1)  # (3, P)
        return torch.linalg.lstsq(x.T, y.T).solution.T  # (3, C+1)

    def png_base64(self, latents) -> str | None:
        """A PNG (base64) of the first image of ``latents`` (B, C, H, W) or (B, C, F, H, W); None for latents
        this map cannot read (a transformer's packed sequence)."""
        import PIL.Image
        import torch

        if latents is None or latents.ndim not in (4, 5):
            return None
        first = latents[0].float().cpu()
        if first.ndim == 4:  # video: the first frame
            first = first[:, 0]
        channels = first.shape[0]
        with self._lock:
            if self._weights is None or self._weights.shape[1] != channels + 1:
                self._weights = self._fit(channels)
            weights = self._weights
        flat = torch.cat([first.reshape(channels, -1), torch.ones(1, first.shape[1] * first.shape[2])])
        rgb = (weights @ flat).reshape(3, *first.shape[1:])
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
