"""Flux.1-dev end to end at 256x256 on this 24 GiB CPU machine, with the GGUF Q4_0 transformer.

    python benchmarks/flux_gguf_step.py        # first: writes _work/flux-dev-Q4_0.gguf
    python benchmarks/flux_gguf_pipeline.py [--steps 2]

diffpipe only (the reference's GGUF loader needs the same file; its one-step numbers are in
flux_gguf_step.py). The other components have the published sizes with random weights, built in memory:
T5-XXL's encoder (4.7B, bf16), CLIP ViT-L (fp32), the 16-channel VAE (fp32); the tokenizers are tiny.
Prints the CPU flags, the time of each phase and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def random_module(build, dtype):
    """``build()`` on the meta device in ``dtype``, then real storage with small random values."""
    from diffpipe.nn.construction import empty_modules

    torch.set_default_dtype(dtype)
    try:
        with empty_modules():
            module = build()
    finally:
        torch.set_default_dtype(torch.float32)
    module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
        for name, buffer in module.named_buffers():  # computed buffers (CLIP's position ids) get real values
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    import diffpipe
    from flux_factory import write_t5_tokenizer
    from flux_gguf_step import FILE
    from run import machine

    print(f"Machine: {machine()}", flush=True)
    work = HERE / "_work"
    start = time.perf_counter()
    transformer = diffpipe.FluxTransformer2DModel.from_single_file(
        FILE, quantization_config=diffpipe.GGUFQuantizationConfig(compute_dtype=torch.float32)
    )
    t5_config = T5Config(
        d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False,
    )  # fmt: skip
    text_encoder_2 = random_module(lambda: T5EncoderModel(t5_config), torch.bfloat16)
    clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          vocab_size=49408, max_position_embeddings=77, projection_dim=768)  # fmt: skip
    text_encoder = random_module(lambda: CLIPTextModel(clip), torch.float32)
    vae = random_module(
        lambda: diffpipe.AutoencoderKL(
            latent_channels=16, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
        torch.float32,
    )  # fmt: skip
    write_t5_tokenizer(work / "t5-tokenizer")
    pipe = diffpipe.FluxPipeline(
        scheduler=diffpipe.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer-src"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5TokenizerFast.from_pretrained(work / "t5-tokenizer"),
        transformer=transformer,
    )
    loaded = time.perf_counter() - start
    print(f"components ready in {loaded:.0f} s; peak RSS {peak() / 1e9:.2f} GB", flush=True)
    times = []

    def on_step(pipe, i, t, tensors):
        times.append(time.perf_counter())
        print(f"  step {i + 1} at {times[-1] - start:.0f} s, peak RSS {peak() / 1e9:.2f} GB", flush=True)
        return tensors

    start = time.perf_counter()
    image = pipe(
        "a photo of a cat on a beach",
        height=256,
        width=256,
        num_inference_steps=args.steps,
        guidance_scale=3.5,
        max_sequence_length=512,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=on_step,
    ).images[0]
    total = time.perf_counter() - start
    image.save(work / "flux-gguf-256.png")
    print(
        f"256x256, {args.steps} steps: {total:.0f} s in all (prompt + first step {times[0] - start:.0f} s, then "
        f"{(times[-1] - times[0]) / max(len(times) - 1, 1):.0f} s per step); peak RSS {peak() / 1e9:.2f} GB",
        flush=True,
    )


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
