"""The FastAPI app around one loaded pipeline: OpenAI images endpoints, A1111 endpoints, a web page.

Seeds: image ``i`` of a request with seed ``s`` is drawn with ``torch.Generator().manual_seed(s + i)``,
one pipeline call per image, so any image can be made again alone with seed ``s + i``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from .pngmeta import infotext, png_base64
from .requests import (
    DEFAULT_STEPS,
    Generation,
    Img2ImgRequest,
    JobRequest,
    OpenAIImageRequest,
    Txt2ImgRequest,
    a1111_generation,
    check_limits,
    decode_image,
    job_generation,
    mask_from_alpha,
    openai_generation,
    parse_size,
    random_seed,
)
from .settings import Settings
from .worker import Closed, QueueFull, Worker

# polling a waiting request's connection: a client that went away cancels its job
DISCONNECT_POLL_S = 0.2

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


# ------------------------------------------------------------------------------------ helpers
def model_name_of(pipe, settings: Settings) -> str:
    if settings.model_name:
        return settings.model_name
    config = getattr(pipe, "config", None) or {}
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    return str(name) if name else type(pipe).__name__


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

    def submit(self, gen: Generation, run=None):
        """Check ``gen`` and queue it (``run(job)``, by default :meth:`run`); a full queue is a 429."""
        check_limits(gen, self.settings)
        self.scheduler_for(gen.sampler)  # an unknown sampler is refused before it queues
        try:
            return self.worker.submit(run or (lambda job: self.run(gen, job)), total_steps=gen.n * gen.steps)
        except QueueFull as e:
            raise HTTPException(429, str(e), headers={"Retry-After": str(self.worker.retry_after())}) from None
        except Closed as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None

    async def generate(self, gen: Generation, request: Request | None = None) -> list:
        """Queue ``gen`` and wait for its images; a client that disconnects meanwhile cancels it."""
        future = self.submit(gen)
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    return waiting.result()
                if request is not None and await request.is_disconnected():
                    self.worker.cancel(future)
                    raise HTTPException(499, "the client closed the request; its job was cancelled")
        except asyncio.CancelledError:
            raise HTTPException(499, "the job was cancelled") from None
        except ValueError as e:  # the pipeline's own checks
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


def create_app(pipe, settings: Settings | None = None, *, job_book=None) -> FastAPI:
    """The app serving ``pipe``; ``job_book`` shares job statuses between replicas (Ray Serve)."""
    settings = settings or Settings()
    server = Server(pipe, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.worker.close()  # lets the running job finish

    app = FastAPI(title="diffpipe serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return await http_error(request, HTTPException(422, "invalid request: " + "; ".join(problems)))

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

    @app.post("/v1/images/generations")
    async def images_generations(body: OpenAIImageRequest, request: Request):
        images = await server.generate(openai_generation(body, settings, server.model), request)
        return {"created": int(time.time()), "data": [{"b64_json": b64} for b64, _, _ in images]}

    from .jobs import register_jobs

    register_jobs(app, server, JobRequest, lambda body: job_generation(body, settings, server.model), job_book)

    # A1111 ------------------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        gen = a1111_generation(body)
        images = await server.generate(gen, request)
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
    async def img2img(body: Img2ImgRequest, request: Request):
        if not body.init_images:
            raise HTTPException(400, "img2img needs init_images: a list with one base64-encoded image")
        image = decode_image(body.init_images[0], "init_images[0]")
        mask = decode_image(body.mask, "mask").convert("L") if body.mask else None
        if mask is not None and body.inpainting_mask_invert:
            mask = mask.point(lambda v: 255 - v)
        if not 0.0 <= body.denoising_strength <= 1.0:
            raise HTTPException(400, f"denoising_strength must be in [0, 1], got {body.denoising_strength}")
        gen = a1111_generation(body, image=image, mask=mask, strength=body.denoising_strength)
        images = await server.generate(gen, request)
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
        width, height = parse_size(str(form.get("size", f"{image.width}x{image.height}")))

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
            seed=seed if seed >= 0 else random_seed(),
            n=number("n", int, 1),
            image=image,
            mask=mask,
            strength=number("strength", float, 1.0 if mask is not None else 0.75),
            sampler=form.get("scheduler") or None,
        )
        images = await server.generate(gen, request)
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
