"""Machinery that acts while pipelines and models run, beside the building blocks in ``nn/``:
the hook registry every attached behaviour goes through (``hooks``), the CPU-kernel mode for bf16/fp16
weights on CPUs without instructions for them (``cpu_kernels``), and the paused garbage collector of
loading (``collector``)."""
