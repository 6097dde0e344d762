# Builds fastlm._C with torch.utils.cpp_extension and ninja: the C++ CPU kernels always, the CUDA kernels
# too when torch is a CUDA build and nvcc is found. The Triton kernels in kernels/ ship as fastlm.kernels.
# Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_arch_flags():
    # The extension is built on the machine that runs it, so it targets that CPU (AVX-512/AVX2 vectors
    # in at::vec); FASTLM_CPU_ARCH overrides, e.g. FASTLM_CPU_ARCH=x86-64-v3 for a portable AVX2 build.
    arch = os.environ.get("FASTLM_CPU_ARCH", "native")
    if platform.machine() in ("x86_64", "AMD64"):
        return [f"-march={arch}"]
    return [f"-mcpu={arch}"]


def build_cuda():
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def torch_requirement():
    # The extension links against this torch's C++ ABI, so the package needs this release (a CUDA or CPU
    # build's local label, "+cu128", matches either way; torch is not a build requirement, see pyproject.toml).
    return f"torch=={torch.__version__.split('+')[0]}"


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -g0: Python's own CFLAGS add -g, which made the extension 33 MB (1.3 MB without the debug information).
    cxx_flags = ["-O3", "-g0", "-std=c++17", "-fopenmp", *cpu_arch_flags()]
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    if build_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        kwargs["define_macros"] = [("FASTLM_WITH_CUDA", None)]  # for what the device-generic sources ask of CUDA
        return cpp_extension.CUDAExtension("fastlm._C", sources, **kwargs)
    return cpp_extension.CppExtension("fastlm._C", sources, **kwargs)


setup(
    name="fastlm",
    version="0.1.0",
    description="Fused kernels for training small and mid-size language models",
    packages=["fastlm", "fastlm.ops", "fastlm.nn", "fastlm.models", "fastlm.data", "fastlm.kernels"],
    package_dir={"fastlm.kernels": "kernels"},
    package_data={"fastlm.data": ["names.txt", "names.LICENSE"]},
    entry_points={"console_scripts": ["fastlm = fastlm.cli:main"]},
    install_requires=[torch_requirement(), "tqdm"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
