"""The CuPy tier's CUDA sources compile for the oldest GPU that CUDA 12 and 13 support, without a GPU.

The row and element kernels (``gpu/_core.py``'s ``row_module``) are templates compiled at run time
for each dtype. A PTX instruction that only newer GPUs accept (``cvt.rn.bf16.f32``, sm_80 and
later) once sat in the bfloat16 store, so every kernel family failed to build on a T4 (sm_75):
CuPy then compiled all dtypes in one module, and float32 failed with bfloat16. The GPU tests run
on an H100, which accepts everything, so only a compile for an older target finds such a line.

This compiles each family's source, instantiated for each dtype, with ``nvcc`` for sm_75. It needs
nvcc (the CUDA toolkit) and no GPU, and skips without nvcc. CuPy is replaced by a stand-in inside
a child process, since only the source strings are read.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

NVCC = shutil.which("nvcc")
OLDEST_ARCH = "sm_75"       # Turing (T4): the oldest compute capability CUDA 13 builds for

pytestmark = pytest.mark.skipif(NVCC is None, reason="compiling the CUDA sources needs nvcc (the CUDA toolkit)")

# Run in a child process: the gpu package imports CuPy, which a stand-in replaces there.
SOURCES = r"""
import json, re, sys
from unittest import mock
for name in ("cupy", "cupyx", "cupy.cuda", "cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.api",
             "cupy_backends.cuda.libs"):
    sys.modules[name] = mock.MagicMock()
import importlib
from minilm.gpu import _core
out = {}
for family, names in {"activations": ["_GELU_SOURCE", "_SOURCE"], "attention": ["_SOURCE"],
                      "layernorm": ["_SOURCE"], "dropout": ["_SOURCE"], "losses": ["_SOURCE"]}.items():
    module = importlib.import_module(f"minilm.gpu.{family}")
    for name in names:
        source = getattr(module, name)
        out[f"{family}.{name}"] = [_core.ROW_PREAMBLE + source, re.findall(r"__global__ void (\w+)\s*\(", source)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{family.name: [ROW_PREAMBLE + source, its kernels' names]}, read in a child process. It runs
    in an empty folder: from a checkout's root, `python -c` would import the source tree's minilm,
    whose gpu package is mapped in only by the install (pyproject's package-dir)."""
    done = subprocess.run([sys.executable, "-c", SOURCES], capture_output=True, text=True,
                          cwd=tmp_path_factory.mktemp("sources"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_family_and_dtype_compiles_for_the_oldest_gpu(sources, tmp_path):
    assert len(sources) == 6
    failures = []
    for family, (source, kernels) in sources.items():
        assert kernels, family
        for ctype in ("float", "double", "half16", "bf16"):
            # a host-side reference to each kernel's instance makes nvcc compile it for the device
            refs = ", ".join(f"(void*)&{kernel}<{ctype}>" for kernel in kernels)
            path = tmp_path / f"{family}_{ctype}.cu"
            path.write_text(f"{source}\nvoid* minilm_instances[] = {{ {refs} }};\n", encoding="utf-8")
            done = subprocess.run([NVCC, "-c", f"-arch={OLDEST_ARCH}", "-std=c++14", str(path),
                                   "-o", os.fspath(path.with_suffix(".o"))], capture_output=True, text=True)
            if done.returncode != 0:
                failures.append(f"{family} <{ctype}>: {done.stderr.strip()[-400:]}")
    assert not failures, "\n".join(failures)
