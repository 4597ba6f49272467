"""Which library runs convolutions on the CPU, chosen before JAX starts its backend.

jaxlib 0.10-0.11 hands CPU convolutions to YNNPACK. On the 2-core CPU of
docs/benchmarks.md, YNNPACK's convolutions are up to 2x slower than XLA's Eigen path in
the forward pass and 10x slower for kernel gradients (ResNet-20's 32x32x16 layers), so
importing cnn_jax asks XLA for Eigen's convolutions; YNNPACK keeps its other work
(reductions, elementwise fusions). Only XLA's CPU compiler reads the flag: GPU and TPU
programs are unchanged.

A setting of the same flag in XLA_FLAGS wins, e.g. XLA's own default back:
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`. The flag
takes effect only if cnn_jax is imported before JAX compiles anything.
"""
from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = f"{FLAG}=-individual_convolution"


def prefer_eigen_convolutions(environ=os.environ) -> None:
    """Add EIGEN_CONVOLUTIONS to XLA_FLAGS unless XLA_FLAGS already sets FLAG."""
    flags = environ.get("XLA_FLAGS", "")
    if FLAG not in flags:
        environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
