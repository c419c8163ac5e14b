"""Build script for cdfast.

The Python package lives in cdfast/; the Triton kernels in kernels/ are
``cdfast.kernels`` (cdfast/kernels links there, so a plain checkout imports them
too); the C++/CUDA ops in csrc/ are compiled into ``cdfast._C`` (torch.library
namespace ``cdfast``).

Environment flags:
    CDFAST_BUILD_EXT=0    skip the compiled extension entirely (cdfast then uses its PyTorch reference)
    CDFAST_BUILD_CUDA=0/1 skip / force the CUDA kernels (default: build them when a CUDA toolkit is found)
    TORCH_CUDA_ARCH_LIST  GPU targets (default here: "8.0;9.0", i.e. A100 and H100, when no GPU is visible)
    MAX_JOBS              parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import find_packages, setup


def env_flag(name: str):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def extension_modules():
    if env_flag("CDFAST_BUILD_EXT") is False:
        print("cdfast: CDFAST_BUILD_EXT=0, not building the compiled ops (the PyTorch reference will be used)")
        return [], {}
    # torch looks for the toolkit in CUDA_HOME; the usual location is a safe default.
    if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = env_flag("CDFAST_BUILD_CUDA")
    with_cuda = (CUDA_HOME is not None and torch.version.cuda is not None) if want_cuda is None else want_cuda
    if with_cuda and CUDA_HOME is None:
        raise RuntimeError("CDFAST_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to it")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU to ask: target A100 and H100

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))  # schemas, autograd, CPU
    cxx = ["-O3"]  # the C++ standard comes from torch (C++20 for torch >= 2.13)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension("cdfast._C", sources, extra_compile_args={
            "cxx": cxx + ["-DCDFAST_WITH_CUDA"], "nvcc": ["-O3", "-DCDFAST_WITH_CUDA"]})
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU")
        print(f"cdfast: building cdfast._C with CPU and CUDA kernels (CUDA {torch.version.cuda}, arch {arch}, "
              f"toolkit {CUDA_HOME})")
    else:
        ext = CppExtension("cdfast._C", sources, extra_compile_args={"cxx": cxx})
        print("cdfast: building cdfast._C with CPU kernels only (no CUDA toolkit found or CDFAST_BUILD_CUDA=0)")
    return [ext], {"build_ext": recording_torch_version(BuildExtension).with_options(use_ninja=True)}


def recording_torch_version(build_ext):
    """build_ext that writes the torch version the library was built against next to it
    (``cdfast/_C.torch_version``): cdfast loads ``_C`` only under that torch."""

    class BuildExt(build_ext):
        def run(self):
            import torch

            for ext in self.extensions:  # a library left in build/ by another torch is rebuilt, not restamped
                stamp = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_C.torch_version")
                if os.path.isfile(stamp) and open(stamp).read().strip() != torch.__version__:
                    self.force = True
            super().run()
            import torch

            for ext in self.extensions:
                path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_C.torch_version")
                with open(path, "w") as f:
                    f.write(torch.__version__ + "\n")

    return BuildExt


ext_modules, cmdclass = extension_modules()

setup(
    # cdfast/kernels is a link to the top-level kernels/ folder (found like any subpackage, copied into wheels)
    packages=find_packages(include=["cdfast", "cdfast.*"]),
    package_data={"cdfast.presets": ["*.yaml", "experiments/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
