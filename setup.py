"""Builds dms_ext._C: the CPU ops always; the CUDA ops when torch has CUDA and nvcc exists.

Environment:
  DMS_CUDA_ARCH   nvcc -gencode targets, default "90a" (comma separated, e.g. "90a,100a")
  CUTLASS_DIR     CUTLASS checkout (its include/ is used); default: the nvidia-cutlass package
  DMS_FORCE_CPU=1 build the CPU ops only, even where CUDA is available
  MAX_JOBS        parallel compile jobs (torch's ninja build honours it)
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cutlass_include():
    if os.environ.get("CUTLASS_DIR"):
        return os.path.join(os.environ["CUTLASS_DIR"], "include")
    spec = importlib.util.find_spec("cutlass_library")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "CUTLASS headers not found: pip install --no-deps nvidia-cutlass, or set CUTLASS_DIR")
    return os.path.join(list(spec.submodule_search_locations)[0], "source", "include")


def extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, CUDA_HOME

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-std=c++17"]
    sources = rel("csrc/cpu/*.cpp") + rel("csrc/torch/*.cpp")
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                and os.environ.get("DMS_FORCE_CPU") != "1")
    if not use_cuda:
        sources = [s for s in sources if not s.endswith("_cuda.cpp")]
        return [CppExtension("dms_ext._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, py_limited_api=False)]
    archs = os.environ.get("DMS_CUDA_ARCH", "90a").split(",")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    for a in archs:
        nvcc.append(f"-gencode=arch=compute_{a.strip()},code=sm_{a.strip()}")
    # Tuning builds only, e.g. DMS_NVCC_EXTRA="-DDMS_DECODE_PROBE" (bench/decode_probe.py).
    nvcc += os.environ.get("DMS_NVCC_EXTRA", "").split()
    sources += rel("csrc/kernels/*.cu")
    return [CUDAExtension("dms_ext._C", sources, include_dirs=include_dirs + [cutlass_include()],
                          define_macros=[("DMS_WITH_CUDA", "1")],
                          extra_compile_args={"cxx": cxx + ["-DDMS_WITH_CUDA"], "nvcc": nvcc})]


def build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="dms_ext",
    version="0.1.0",
    description="CUDA kernels and a paged KV cache for Dynamic Memory Sparsification (DMS)",
    packages=find_packages(include=["dms_ext", "dms_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_cls()},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest", "numpy"], "demo": ["matplotlib"]},
)
