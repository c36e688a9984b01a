r"""The machine a benchmark runs on, and its two measured ceilings.

    python tools/gpu/environment.py                         # this machine (CUDA when present)
    python tools/gpu/environment.py --json env.json         # also write the figures as JSON

Prints a markdown table: Python, torch, CUDA and cuDNN versions, the device (name, compute capability,
multiprocessors, memory), the NVIDIA driver (``nvidia-smi``), the packages the project needs and which
packed-attention backends import (xformers, ``torch.nn.attention.varlen``, FlexAttention). Then the two
ceilings every speed figure is read against (tools/gpu/README.md):

- matmul: an ``n x n x n`` product of random normal matrices (bf16 on CUDA, fp32 on a CPU; random data,
  since zeros run faster), the mean of ``--repeats`` products after 3 warm-ups: TFLOP/s = 2 n^3 / time.
  On CUDA this is the peak that tools/gpu/gpu_suite.py gives train_throughput.py for MFU;
- copy: a device-to-device copy of ``--copy-gib`` GiB, bytes read + written over time (CUDA only).

It needs only torch: a package that is missing or fails to import is reported as such (the table names
packages by their import name: ``yaml`` is PyYAML, ``PIL`` is Pillow).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dpar.errors import ArgumentParser, run_main  # noqa: E402  (these three: standard library only)
from dpar.fileio import atomic_write_text, check_output_file  # noqa: E402
from dpar.validation import device as device_flag, number  # noqa: E402

PACKAGES = ("omegaconf", "yaml", "accelerate", "safetensors", "numpy", "scipy", "PIL", "tqdm", "matplotlib", "pytest")
ATTENTION_MODULES = {"xformers": "xformers", "varlen": "torch.nn.attention.varlen",
                     "flex": "torch.nn.attention.flex_attention"}


def package_version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "missing"
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # an installed package that fails to import is a finding, not a crash
        return f"fails to import: {type(error).__name__}: {error}"
    return str(getattr(imported, "__version__", "present"))


def attention_backends() -> dict[str, str]:
    """``imports`` or why not, for each optional packed-attention backend."""
    found = {}
    for name, module in ATTENTION_MODULES.items():
        try:
            found[name] = "imports" if importlib.util.find_spec(module) and importlib.import_module(module) else \
                "not installed"
        except Exception as error:
            found[name] = f"fails to import: {type(error).__name__}: {error}"
    return found


def nvidia_driver() -> str:
    """``nvidia-smi``'s driver version, GPU name, max SM clock and power limit, as it prints them."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi unavailable ({type(error).__name__})"
    return out.stdout.strip() or out.stderr.strip() or f"nvidia-smi exit {out.returncode}"


def _timed(run, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``run()`` over ``repeats`` calls after 3 warm-ups (CUDA events on a GPU)."""
    for _ in range(3):
        run()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def matmul_tflops(device: torch.device, n: int, repeats: int) -> tuple[float, str]:
    """TFLOP/s of an ``n^3`` product of random normal matrices: bf16 on CUDA, fp32 elsewhere."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator, device=device, dtype=dtype) for _ in range(2))
    seconds = _timed(lambda: a @ b, device, repeats)
    return 2 * n ** 3 / seconds / 1e12, str(dtype).removeprefix("torch.")


def copy_tb_per_s(device: torch.device, gib: float, repeats: int) -> float:
    """Device-to-device copy bandwidth: bytes read + bytes written per second, in TB/s."""
    source = torch.randn(int(gib * 2 ** 30) // 4, device=device)
    target = torch.empty_like(source)
    seconds = _timed(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * 4 / seconds / 1e12


def describe(device: torch.device, matmul_size: int, copy_gib: float, repeats: int) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    nvidia_smi=nvidia_driver())
    else:
        info.update(device=f"{platform.processor() or platform.machine()} CPU", threads=torch.get_num_threads())
    info["packages"] = {name: package_version(name) for name in PACKAGES}
    info["attention_backends"] = attention_backends()
    info["matmul_size"] = matmul_size
    info["matmul_tflops"], info["matmul_dtype"] = matmul_tflops(device, matmul_size, repeats)
    if device.type == "cuda":
        info["copy_tb_per_s"] = copy_tb_per_s(device, copy_gib, repeats)
    return info


def markdown(info: dict) -> str:
    labels = {"nvidia_smi": "driver, name, max SM clock, power limit (nvidia-smi)"}
    rows = [(labels.get(key, key), info[key]) for key in ("device", "compute_capability", "multiprocessors",
                                                          "memory_gib", "nvidia_smi", "threads", "python", "torch",
                                                          "cuda", "cudnn") if key in info]
    rows += [(f"package {name}", version) for name, version in info["packages"].items()]
    rows += [(f"attention backend {name}", state) for name, state in info["attention_backends"].items()]
    n = info["matmul_size"]
    rows.append((f"{info['matmul_dtype']} matmul {n}x{n}x{n}, random data", f"{info['matmul_tflops']:.1f} TFLOP/s"))
    if "copy_tb_per_s" in info:
        rows.append(("device-to-device copy (read + write)", f"{info['copy_tb_per_s']:.2f} TB/s"))
    return "| item | value |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is one)")
    parser.add_argument("--matmul-size", type=number(int, min=1), default=None, help="n of the n^3 product "
                        "(default: 8192 on CUDA, as the device notes measured; 1024 on a CPU)")
    parser.add_argument("--copy-gib", type=number(float, gt=0), default=4.0, help="size of the copied buffer (CUDA)")
    parser.add_argument("--repeats", type=number(int, min=1), default=10, help="timed repetitions of each ceiling")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.json is not None:  # before the measurements
        check_output_file(args.json, "--json")
    device = torch.device(args.device)
    size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    info = describe(device, size, args.copy_gib, args.repeats)
    print(markdown(info), flush=True)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(info, indent=1))


if __name__ == "__main__":
    run_main(main)
