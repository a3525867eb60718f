"""Peak FLOP/s of the GPUs scalelab knows: the denominator of MFU."""

from __future__ import annotations

#: Published dense (no sparsity) BF16 tensor-core peaks in FLOP/s per GPU, matched
#: against torch.cuda.get_device_name (first match wins: specific names first).
#: Sources (NVIDIA datasheets, which print the sparse figure; dense is half):
#: H100 SXM5 / H200 1,979 sparse -> 989 dense; H100 PCIe 1,513 -> 756; A100 624 -> 312
#: (nanoGPT's estimate_mfu uses the same 312e12); L40S 733 -> 362; L4 242 -> 121.
#: docs/benchmarks.md carries the table with its sources.
PEAK_BF16_DENSE: tuple[tuple[str, float, str], ...] = (
    ("H200", 989e12, "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity"),
    ("H100 PCIe", 756e12, "NVIDIA H100 datasheet (PCIe): BF16 1,513 TFLOPS with sparsity"),
    ("H100", 989e12, "NVIDIA H100 datasheet (SXM5): BF16 1,979 TFLOPS with sparsity"),
    ("A100", 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
    ("L40S", 362e12, "NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity"),
    ("L4", 121e12, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity"),
)


def peak_bf16(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, source) of a GPU by name, None when not in the table."""
    for key, flops, source in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return flops, source
    return None
