"""Builds the compiled core ``t1t2_fast._C``. Package metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
already installed (build isolation would fetch another torch).

Environment:
  T1T2_NO_EXT=1     skip the extension (the package then runs on the reference path)
  T1T2_CUDA=0|1     force the CUDA sources off/on (default: on when torch has CUDA and nvcc is found)
  DEBUG=1           -O0 -g instead of -O3
  MAX_JOBS=N        parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_build():
    if os.environ.get("T1T2_NO_EXT") == "1":
        print("t1t2_fast: T1T2_NO_EXT=1, building without the compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("t1t2_fast: building the extension needs torch installed first, then "
                 "`pip install --no-build-isolation -e .` (or set T1T2_NO_EXT=1 to skip it)")

    debug = os.environ.get("DEBUG") == "1"
    cuda_env = os.environ.get("T1T2_CUDA")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) if cuda_env is None else cuda_env == "1"
    use_cuda = use_cuda and bool(cuda_sources)

    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++17", "-fdiagnostics-color=always"]
    if torch.backends.openmp.is_available():
        cxx += ["-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
                  extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])
    if use_cuda:
        kwargs["extra_compile_args"]["nvcc"] = (["-O0", "-g"] if debug else ["-O3"]) + ["-std=c++17"]
        kwargs["define_macros"] = [("T1T2_WITH_CUDA", "1")]
        ext = CUDAExtension("t1t2_fast._C", sources + cuda_sources, **kwargs)
    else:
        ext = CppExtension("t1t2_fast._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
