"""The FastAPI app around one loaded pipeline: OpenAI images endpoints, A1111 endpoints, a web page.

Seeds: image ``i`` of a request with seed ``s`` is drawn with ``torch.Generator().manual_seed(s + i)``,
one pipeline call per image, so any image can be made again alone with seed ``s + i``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from .pngmeta import infotext, png_base64
from .settings import Settings
from .worker import QueueFull, Worker

DEFAULT_STEPS = 30
MAX_SEED = 2**63 - 1
# A1111's names for the schedulers they correspond to (aliases in /sdapi/v1/samplers).
A1111_NAMES = {
    "EulerDiscreteScheduler": ["Euler"],
    "EulerAncestralDiscreteScheduler": ["Euler a"],
    "LMSDiscreteScheduler": ["LMS"],
    "HeunDiscreteScheduler": ["Heun"],
    "DPMSolverMultistepScheduler": ["DPM++ 2M"],
    "DPMSolverSinglestepScheduler": ["DPM++ SDE"],
    "KDPM2DiscreteScheduler": ["DPM2"],
    "KDPM2AncestralDiscreteScheduler": ["DPM2 a"],
    "DDIMScheduler": ["DDIM"],
    "PNDMScheduler": ["PLMS"],
    "UniPCMultistepScheduler": ["UniPC"],
    "LCMScheduler": ["LCM"],
}


# ------------------------------------------------------------------------------------ requests
class OpenAIImageRequest(BaseModel):
    prompt: str
    n: int = 1
    size: str = "512x512"
    response_format: str = "b64_json"
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    model: str | None = None


class Txt2ImgRequest(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    sampler_index: str | None = None
    options: dict = Field(default_factory=dict)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None  # white: repaint
    denoising_strength: float = 0.75


@dataclass
class Generation:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    seed: int
    n: int
    sampler: str | None = None
    image: object = None  # a PIL image: image-to-image (inpainting with ``mask``)
    mask: object = None
    strength: float = 0.75


def decode_image(data: str | bytes, what: str):
    """A base64 string (optionally a ``data:`` URL) or raw bytes -> an RGBA-or-RGB PIL image."""
    import base64
    import io

    import PIL.Image

    try:
        if isinstance(data, str):
            data = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=False)
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as e:  # not an image: a 400 that says which field
        raise HTTPException(400, f"{what} is not a readable image ({type(e).__name__}: {e})") from None


def mask_from_alpha(mask):
    """OpenAI's edit mask: fully transparent pixels are the ones to repaint -> white there, black elsewhere."""

    if "A" in mask.getbands():
        alpha = mask.getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0).convert("L")
    return mask.convert("L")


# ------------------------------------------------------------------------------------ helpers
def model_name_of(pipe, settings: Settings) -> str:
    if settings.model_name:
        return settings.model_name
    config = getattr(pipe, "config", None) or {}
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    return str(name) if name else type(pipe).__name__


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise HTTPException(400, f"size must be WIDTHxHEIGHT, e.g. 512x512; got {size!r}") from None
    return w, h


def check_limits(gen: Generation, settings: Settings) -> None:
    if gen.width < 8 or gen.height < 8:
        raise HTTPException(400, f"width and height must be at least 8; got {gen.width}x{gen.height}")
    if gen.width * gen.height > settings.max_pixels:
        raise HTTPException(
            400,
            f"width*height = {gen.width}x{gen.height} = {gen.width * gen.height} pixels is over the limit "
            f"max_pixels={settings.max_pixels}",
        )
    if not 1 <= gen.steps <= settings.max_steps:
        raise HTTPException(400, f"steps={gen.steps} must be between 1 and the limit max_steps={settings.max_steps}")
    if not 1 <= gen.n <= settings.max_n:
        raise HTTPException(400, f"n={gen.n} images must be between 1 and the limit max_n={settings.max_n}")
    if not 0 <= gen.seed <= MAX_SEED - gen.n:
        raise HTTPException(400, f"seed={gen.seed} must be -1 (random) or between 0 and {MAX_SEED - gen.n}")


def a1111_generation(body: Txt2ImgRequest, **image) -> Generation:
    """An A1111 request (txt2img, or img2img with ``image``/``mask``/``strength``) as a Generation."""
    return Generation(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or None,
        width=body.width,
        height=body.height,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=body.seed if body.seed >= 0 else _random_seed(),
        n=body.batch_size * body.n_iter,
        sampler=body.sampler_name or body.sampler_index,
        **image,
    )


def _random_seed() -> int:
    return random.randrange(2**32 - 1)


class Server:
    """The pipeline, its single worker, and what the endpoints share."""

    def __init__(self, pipe, settings: Settings):
        self.pipe = pipe
        self.settings = settings
        self.model = model_name_of(pipe, settings)
        self.worker = Worker(settings.max_queue)
        self.options = {"sd_model_checkpoint": self.model, "samples_format": "png"}
        scheduler = getattr(pipe, "scheduler", None)
        self.scheduler_config = dict(scheduler.config) if scheduler is not None else {}
        self.default_scheduler = scheduler

    # schedulers -------------------------------------------------------------------------
    def samplers(self) -> list[dict]:
        scheduler = self.default_scheduler
        classes = list(getattr(scheduler, "compatibles", []) or []) if scheduler is not None else []
        if scheduler is not None and type(scheduler) not in classes:
            classes.insert(0, type(scheduler))
        seen, out = set(), []
        for cls in classes:
            if cls.__name__ in seen:
                continue
            seen.add(cls.__name__)
            out.append({"name": cls.__name__, "aliases": A1111_NAMES.get(cls.__name__, []), "options": {}})
        return out

    def scheduler_for(self, name: str | None):
        """The scheduler class called ``name`` (a class name or an A1111 alias), or None for the default."""
        if not name:
            return None
        wanted = name.strip().lower()
        classes = {cls.__name__: cls for cls in getattr(self.default_scheduler, "compatibles", []) or []}
        if self.default_scheduler is not None:
            classes.setdefault(type(self.default_scheduler).__name__, type(self.default_scheduler))
        for cls_name, cls in classes.items():
            if wanted == cls_name.lower() or wanted in (a.lower() for a in A1111_NAMES.get(cls_name, [])):
                return cls
        raise HTTPException(400, f"unknown sampler {name!r}; GET /sdapi/v1/samplers lists the ones this model takes")

    # generation ---------------------------------------------------------------------------
    def run(self, gen: Generation, job) -> list:
        """In the worker thread: one pipeline call per image, image i seeded with ``seed + i``."""
        import torch

        cls = self.scheduler_for(gen.sampler)
        pipe = self.task_pipe(gen)
        if cls is not None:
            pipe.scheduler = cls.from_config(self.scheduler_config)
        try:
            sampler = type(pipe.scheduler).__name__ if getattr(pipe, "scheduler", None) is not None else "?"
            images = []
            for i in range(gen.n):
                if i and job.interrupted:
                    break
                call = dict(
                    prompt=gen.prompt,
                    height=gen.height,
                    width=gen.width,
                    num_inference_steps=gen.steps,
                    generator=torch.Generator().manual_seed(gen.seed + i),
                    callback_on_step_end=job.step_callback(i, gen.steps),
                )
                if gen.image is not None:
                    call.update(image=gen.image.convert("RGB"), strength=gen.strength)
                    if gen.mask is not None:
                        call["mask_image"] = gen.mask
                if gen.negative_prompt:
                    call["negative_prompt"] = gen.negative_prompt
                if gen.guidance_scale is not None:
                    call["guidance_scale"] = gen.guidance_scale
                image = pipe(**call).images[0]
                text = infotext(
                    gen.prompt,
                    gen.negative_prompt,
                    steps=gen.steps,
                    sampler=sampler,
                    cfg_scale=gen.guidance_scale if gen.guidance_scale is not None else 7.5,
                    seed=gen.seed + i,
                    width=gen.width,
                    height=gen.height,
                    model=self.model,
                )
                images.append((png_base64(image, text), gen.seed + i, text))
            return images
        finally:
            if cls is not None:
                pipe.scheduler = self.default_scheduler

    def task_pipe(self, gen: Generation):
        """The loaded pipeline, or its image-to-image / inpainting sibling sharing every component."""
        if gen.image is None:
            return self.pipe
        from ..pipelines.auto import AutoPipelineForImage2Image, AutoPipelineForInpainting

        task = "inpaint" if gen.mask is not None else "image"
        cache = self.__dict__.setdefault("_task_pipes", {})
        if task not in cache:
            auto = AutoPipelineForInpainting if task == "inpaint" else AutoPipelineForImage2Image
            cache[task] = auto.from_pipe(self.pipe)
            cache[task].set_progress_bar_config(disable=True)
        return cache[task]

    async def generate(self, gen: Generation) -> list:
        check_limits(gen, self.settings)
        self.scheduler_for(gen.sampler)  # an unknown sampler is refused before it queues
        try:
            future = self.worker.submit(lambda job: self.run(gen, job), total_steps=gen.n * gen.steps)
        except QueueFull as e:
            raise HTTPException(429, str(e)) from None
        try:
            return await asyncio.wrap_future(future)
        except HTTPException:
            raise
        except ValueError as e:  # the pipeline's own checks (sizes not divisible by 8, ...)
            raise HTTPException(400, " ".join(str(e).split())) from None


# ------------------------------------------------------------------------------------ middleware
class Guard:
    """Pure ASGI middleware: the body size limit, then the API key (every endpoint but GET /)."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.settings.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reply(send, 413, f"request body of {declared} bytes is over max_body_bytes={limit}")
        key = self.settings.api_key
        if key and not (scope["method"] == "GET" and scope["path"] == "/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return await self._reply(
                    send, 401, "missing or wrong API key: send `Authorization: Bearer KEY`", bearer=True
                )
        # read the body up to the limit (a chunked body has no content-length), then replay it
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._reply(
                    send, 413, f"request body of over {limit} bytes is over max_body_bytes={limit}"
                )
            chunks.append(body)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)

    @staticmethod
    async def _reply(send, status: int, message: str, bearer: bool = False):
        body = json.dumps({"detail": message, "error": {"message": message, "code": status}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if bearer:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------ the app
def index_html() -> str:
    return resources.files("diffpipe.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(pipe, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    server = Server(pipe, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.worker.close()  # lets the running job finish

    app = FastAPI(title="diffpipe serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        body = {"detail": exc.detail}
        if request.url.path.startswith("/v1/"):  # OpenAI clients read error.message
            body["error"] = {"message": exc.detail, "type": "invalid_request_error", "code": exc.status_code}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return index_html()

    # OpenAI ----------------------------------------------------------------------------------
    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "diffpipe"}]}

    def openai_generation(body: OpenAIImageRequest) -> Generation:
        if body.response_format != "b64_json":
            raise HTTPException(
                400, f"response_format={body.response_format!r} is not supported: use 'b64_json' (no 'url')"
            )
        width, height = _parse_size(body.size)
        return Generation(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            width=width,
            height=height,
            steps=body.steps if body.steps is not None else min(DEFAULT_STEPS, settings.max_steps),
            guidance_scale=body.guidance_scale,
            seed=body.seed if body.seed is not None and body.seed >= 0 else _random_seed(),
            n=body.n,
        )

    @app.post("/v1/images/generations")
    async def images_generations(body: OpenAIImageRequest):
        images = await server.generate(openai_generation(body))
        return {"created": int(time.time()), "data": [{"b64_json": b64} for b64, _, _ in images]}

    from .jobs import register_jobs

    register_jobs(app, server, OpenAIImageRequest, openai_generation)

    # A1111 ------------------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest):
        gen = a1111_generation(body)
        images = await server.generate(gen)
        seeds = [seed for _, seed, _ in images]
        info = {
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "seed": gen.seed,
            "all_seeds": seeds,
            "all_prompts": [body.prompt] * len(images),
            "steps": body.steps,
            "cfg_scale": body.cfg_scale,
            "width": body.width,
            "height": body.height,
            "sampler_name": body.sampler_name or body.sampler_index,
            "sd_model_name": server.model,
            "infotexts": [text for _, _, text in images],
        }
        return {"images": [b64 for b64, _, _ in images], "parameters": body.model_dump(), "info": json.dumps(info)}

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest):
        if not body.init_images:
            raise HTTPException(400, "img2img needs init_images: a list with one base64-encoded image")
        image = decode_image(body.init_images[0], "init_images[0]")
        mask = decode_image(body.mask, "mask").convert("L") if body.mask else None
        if not 0.0 <= body.denoising_strength <= 1.0:
            raise HTTPException(400, f"denoising_strength must be in [0, 1], got {body.denoising_strength}")
        gen = a1111_generation(body, image=image, mask=mask, strength=body.denoising_strength)
        images = await server.generate(gen)
        info = {"seed": gen.seed, "all_seeds": [seed for _, seed, _ in images], "infotexts": [t for _, _, t in images]}
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return {"images": [b64 for b64, _, _ in images], "parameters": parameters, "info": json.dumps(info)}

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        form = await request.form()
        upload = form.get("image")
        if upload is None or not hasattr(upload, "read"):
            raise HTTPException(400, "images/edits needs an image file (multipart field 'image')")
        image = decode_image(await upload.read(), "image")
        mask_file = form.get("mask")
        mask = mask_from_alpha(decode_image(await mask_file.read(), "mask")) if hasattr(mask_file, "read") else None
        if mask is None and "A" in image.getbands():  # OpenAI: the image's own transparency is the mask
            alpha = image.getchannel("A")
            if alpha.getextrema()[0] == 0:
                mask = mask_from_alpha(image)
        if form.get("response_format", "b64_json") != "b64_json":
            raise HTTPException(400, "response_format is not supported: use 'b64_json' (no 'url')")
        width, height = _parse_size(str(form.get("size", f"{image.width}x{image.height}")))

        def number(name, kind, default):
            value = form.get(name)
            try:
                return default if value in (None, "") else kind(value)
            except ValueError:
                raise HTTPException(400, f"{name} must be a {kind.__name__}, got {value!r}") from None

        seed = number("seed", int, -1)
        gen = Generation(
            prompt=str(form.get("prompt", "")),
            negative_prompt=form.get("negative_prompt") or None,
            width=width,
            height=height,
            steps=number("steps", int, min(DEFAULT_STEPS, settings.max_steps)),
            guidance_scale=number("guidance_scale", float, None),
            seed=seed if seed >= 0 else _random_seed(),
            n=number("n", int, 1),
            image=image,
            mask=mask,
            strength=number("strength", float, 1.0 if mask is not None else 0.75),
        )
        images = await server.generate(gen)
        return {"created": int(time.time()), "data": [{"b64_json": b64} for b64, _, _ in images]}

    @app.get("/sdapi/v1/progress")
    def progress():
        return server.worker.progress()

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        return {"interrupted": server.worker.interrupt()}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        filename = str(getattr(pipe, "snapshot_folder", "") or server.model)
        return [{"title": server.model, "model_name": Path(server.model).name or server.model, "filename": filename}]

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return server.samplers()

    @app.get("/sdapi/v1/options")
    def get_options():
        return server.options

    @app.post("/sdapi/v1/options")
    def set_options(body: dict):
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None and wanted != server.model:
            raise HTTPException(400, f"this server serves one model, {server.model!r}; it cannot switch to {wanted!r}")
        server.options.update(body)
        return server.options

    return app
