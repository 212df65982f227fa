"""Helpers under the names the reference's users import them by (``diffusers.utils``)."""

from .images import export_to_gif, export_to_video, load_image, make_image_grid, numpy_to_pil

__all__ = ["export_to_gif", "export_to_video", "load_image", "make_image_grid", "numpy_to_pil"]
