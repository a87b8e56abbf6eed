"""Builds curvx._C, the compiled kernels behind torch.ops.curvx (metadata: pyproject).

Install with ``pip install --no-build-isolation -e .``; iterate with
``python setup.py build_ext --inplace``. ``CURVX_CUDA=0|1|auto`` (default auto) chooses
whether the CUDA kernels are compiled; auto compiles them when torch is a CUDA build and
nvcc is found. The facts of the build are written to ``curvx/_build_info.json``.
"""

import json
import os
import platform
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-Xcompiler", "-g0"]  # nvcc itself has no -g0

# Defaults torch.utils.cpp_extension needs on a machine with a toolkit but no GPU.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").is_file():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402

if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

from torch.utils import cpp_extension  # noqa: E402


def get_extensions():
    """The curvx._C extension: CPU kernels always, CUDA kernels per CURVX_CUDA."""
    mode = os.environ.get("CURVX_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"CURVX_CUDA must be 0, 1 or auto, got {mode!r}")
    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    toolkit = torch.version.cuda is not None and nvcc is not None and nvcc.is_file()
    if mode == "1" and not toolkit:
        raise SystemExit(
            "CURVX_CUDA=1 but the CUDA kernels cannot be built: torch.version.cuda="
            f"{torch.version.cuda}, nvcc={nvcc} (set CUDA_HOME to the toolkit folder)"
        )
    with_cuda = mode == "1" or (mode == "auto" and toolkit)

    sources = [
        "csrc/ops.cpp",
        "csrc/cpu/lanczos_kernels.cpp",
        "csrc/cpu/block_kernels.cpp",
    ]
    cxx = list(CXX_FLAGS)
    if with_cuda:
        sources += ["csrc/cuda/lanczos_kernels.cu", "csrc/cuda/block_kernels.cu"]
        cxx.append("-DCURVX_WITH_CUDA")
        make = cpp_extension.CUDAExtension
    else:
        make = cpp_extension.CppExtension
    extension = make(
        "curvx._C",
        sources,
        extra_compile_args={"cxx": cxx, "nvcc": list(NVCC_FLAGS)},
        extra_link_args=["-fopenmp"],
    )
    extension.build_info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": with_cuda,
        "cuda_home": str(home) if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx_flags": cxx,
        "nvcc_flags": list(NVCC_FLAGS) if with_cuda else None,
        "python": platform.python_version(),
    }
    return [extension]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, then curvx/_build_info.json next to the built module."""

    def run(self):
        super().run()
        for extension in self.extensions:
            text = json.dumps(extension.build_info, indent=2) + "\n"
            # The source package serves `build_ext --inplace` and editable installs; the
            # build folder serves wheels.
            folders = {ROOT / "curvx", Path(self.build_lib, "curvx")}
            for folder in folders:
                if folder.is_dir():
                    (folder / "_build_info.json").write_text(text)


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
