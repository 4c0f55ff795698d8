"""Builds the compiled core ``t1t2_fast._C``. Package metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
already installed (build isolation would fetch another torch).

Environment:
  T1T2_NO_EXT=1     skip the extension (the package then runs on the reference path)
  T1T2_CUDA=0|1     force the CUDA sources off/on (default: on when torch has CUDA and a CUDA toolkit)
  DEBUG=1           -O0 -g instead of -O3
  T1T2_SANITIZE=address  build with these sanitizers (-fsanitize=..., as CMake's -DT1T2_SANITIZE); load
                    the result with the sanitizer runtime preloaded (docs/reliability.md,
                    "Fuzzed inputs and sanitizers")
  MAX_JOBS=N        parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def torch_has_cuda(torch, cuda_home) -> bool:
    return torch.cuda.is_available() or (cuda_home is not None and torch.version.cuda is not None)


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

    cuda_env = os.environ.get("T1T2_CUDA")
    if cuda_env not in (None, "", "0", "1"):
        sys.exit(f"t1t2_fast: T1T2_CUDA must be 0 or 1, got {cuda_env!r}")
    use_cuda = torch_has_cuda(torch, CUDA_HOME) if cuda_env in (None, "") else cuda_env == "1"
    if use_cuda and torch.version.cuda is None:
        sys.exit(f"t1t2_fast: T1T2_CUDA=1 but torch {torch.__version__} was built without CUDA; "
                 "install a CUDA build of torch or set T1T2_CUDA=0")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    sources = ["csrc/ops.cpp", "csrc/module.cpp", "csrc/checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))

    # No -std flag: BuildExtension adds the C++ standard this torch's headers need (C++20 for 2.13).
    opt = ["-O0", "-g"] if os.environ.get("DEBUG") == "1" else ["-O3"]
    # -fno-math-errno: sqrt may then vectorize (it never sets errno for the values we feed it).
    # -fno-trapping-math: a select such as Adam's `ŝ > 0 ? term : 0` may compute both sides in a
    # vector (we never enable floating-point traps). Neither changes a result, unlike -ffast-math.
    cxx = opt + ["-fno-math-errno", "-fno-trapping-math", "-fdiagnostics-color=always"]
    link = []
    sanitize = os.environ.get("T1T2_SANITIZE", "")
    if sanitize:
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
        cxx += flags
        link += flags
    if torch.backends.openmp.is_available():  # at::parallel_for runs on OpenMP in such builds
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
                  extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if use_cuda and cuda_sources:
        kwargs["extra_compile_args"]["nvcc"] = list(opt)
        kwargs["define_macros"] = [("T1T2_WITH_CUDA", "1")]
        ext = CUDAExtension("t1t2_fast._C", sources + cuda_sources, **kwargs)
    else:
        ext = CppExtension("t1t2_fast._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


os.chdir(ROOT)  # setuptools wants paths (sources, pyproject.toml) relative to the project root
ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
