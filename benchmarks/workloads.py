"""What the benchmarks share: models with random weights, realistic patch boundaries, device facts."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dpar.models import ModelConfig, create_model, is_dpar
from dpar.patcher import calibrate_threshold, patch_start_mask
from dpar.validation import check_flags

# Dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU; anything else needs --peak-tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def check_grid(image_sizes: list[int], downsample: int) -> None:
    """The benchmarks' ``--image-size`` / ``--downsample`` flags, by the model config's own rule
    (:meth:`dpar.models.ModelConfig.check`: each size a multiple of the downsampling factor). Raises
    :class:`dpar.errors.UserError` naming both flags (one line, exit 2 under ``run_main``)."""
    for size in image_sizes:
        check_flags(ModelConfig(image_size=size, downsample_size=downsample),
                    {"image_size": "--image-size", "downsample_size": "--downsample"})


def build_model(name: str, *, image_size: int, downsample: int, vocab: int, num_classes: int, device: str,
                model_type: str = "c2i", dtype: torch.dtype = torch.float32, **config) -> torch.nn.Module:
    """A freshly initialised model (seed 0) with LlamaGen's zero-initialised head given random weights,
    so its logits (and any entropies from them) are not all uniform."""
    model_config = ModelConfig(gpt_model=name, model_type=model_type, image_size=image_size,
                               downsample_size=downsample, vocab_size=vocab, num_classes=num_classes, **config)
    torch.manual_seed(0)
    model = create_model(model_config)
    with torch.no_grad():
        model.output.weight.normal_(std=0.02 * 50)
    return model.to(device, dtype=dtype)


def realistic_patch_starts(batch: int, grid: int, tokens_per_patch: float, seed: int = 0,
                           max_patch_length: int | None = 4, row_break: bool = True) -> Tensor:
    """Patch starts cut by the paper's rule from synthetic entropies with image-like structure.

    Real next-token entropies are spatially smooth (flat regions low, edges high), so the synthetic
    ones are Gaussian noise blurred over the token grid; θ is then set so the batch has exactly the
    requested mean patch length (1.81 at 256 px and 2.06 at 384 px in the paper).
    """
    noise = torch.randn(batch, 1, grid, grid, generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    entropies = smooth.flatten(1)
    theta = calibrate_threshold(entropies, grid, tokens_per_patch, max_patch_length=max_patch_length,
                                row_break=row_break)
    return patch_start_mask(entropies, grid_width=grid, threshold=theta, max_patch_length=max_patch_length,
                            row_break=row_break)


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def peak_tflops(device: str, given: float | None) -> float | None:
    """The bf16 peak for MFU: ``given``, or the table's entry for a known GPU, else None (no MFU)."""
    if given is not None:
        return given
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def interleaved(run_a: Callable[[], object], run_b: Callable[[], object], device: str, pairs: int,
                warmup: int = 1) -> dict[str, float]:
    """Time A and B alternately (A B A B ...) in one process, ``pairs`` times after ``warmup`` untimed pairs.

    Both see the same machine state (a shared, noisy CPU; clocks; other jobs), so their ratio is measured
    pair by pair: returns each one's median seconds and the median, min and max of the pairwise ratios A / B.
    """
    for _ in range(warmup):
        run_a()
        run_b()
    seconds_a, seconds_b = [], []
    for _ in range(pairs):
        for run, seconds in ((run_a, seconds_a), (run_b, seconds_b)):
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    ratios = sorted(a / b for a, b in zip(seconds_a, seconds_b))
    return {"a": statistics.median(seconds_a), "b": statistics.median(seconds_b),
            "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def model_pairs(models: list[str]) -> list[list[str]]:
    """Each DGPT-X with its GPT-X when both are listed (DPAR first), every other model alone, in list order."""
    groups, seen = [], set()
    for name in models:
        partner = name.replace("DGPT-", "GPT-") if is_dpar(name) else name.replace("GPT-", "DGPT-", 1)
        if name in seen:
            continue
        group = sorted({name, partner} & set(models), key=lambda n: not is_dpar(n)) if partner in models else [name]
        seen.update(group)
        groups.append(group)
    return groups


def work_of(run: Callable[[], object], models: list[nn.Module | None]) -> dict[str, float]:
    """The FLOPs and the weight bytes that one ``run()`` of ``models`` spends, counted on the run itself.

    ``flops``: every FLOP (``torch.utils.flop_counter``). ``weight_bytes``: the bytes of each linear layer's
    weight, once per call of that layer, whatever the number of rows: the memory traffic a step cannot avoid.
    A KV-cached decoding step is bound by it at small batch (a few rows per weight read) and by its FLOPs at
    large batch. A separate run: the counters slow it down.
    """
    read = [0]

    def count(module: nn.Linear, inputs) -> None:
        read[0] += module.weight.nbytes

    handles = [layer.register_forward_pre_hook(count) for model in models if model is not None
               for layer in model.modules() if isinstance(layer, nn.Linear)]
    try:
        with FlopCounterMode(display=False) as counter:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {"flops": counter.get_total_flops(), "weight_bytes": read[0]}


def ratio_cell(timing: dict[str, float]) -> str:
    """``0.81x (0.79-0.84)``: the median pairwise ratio and its range, for a table."""
    return f"{timing['ratio']:.2f}x ({timing['ratio_min']:.2f}-{timing['ratio_max']:.2f})"


def median_seconds(run: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]
