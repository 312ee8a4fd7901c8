"""minissl: compact semi-supervised medical image segmentation.

Install with ``pip install -e .``. The C++/CUDA kernels are not built here: they are JIT-compiled
with ninja on first use (``minissl/ops/_build.py``). Their sources live in ``csrc/`` at the top
level; a regular (non-editable) install copies them into the package as ``minissl/_csrc``, and the
dataset converters of ``data_scripts/`` as ``minissl/_data_scripts`` (``minissl data prepare`` runs them).
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithKernelSources(build_py):
    """build_py that also ships ``csrc/`` and ``data_scripts/`` inside the package (``minissl/_csrc``,
    ``minissl/_data_scripts``)."""

    def run(self) -> None:
        super().run()
        for folder, shipped in (("csrc", "_csrc"), ("data_scripts", "_data_scripts")):
            shutil.copytree(ROOT / folder, Path(self.build_lib) / "minissl" / shipped, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(
    name="minissl",
    version="0.1.0",
    description="Compact, tested semi-supervised medical image segmentation with fused C++/CUDA kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minissl", "minissl.*"]),
    cmdclass={"build_py": BuildPyWithKernelSources},
    install_requires=[
        "torch>=2.4,<2.15",
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.8",
        "scikit-image>=0.21",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "ninja>=1.11",
        "pyyaml>=6.0",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "medpy>=0.5", "monai>=1.3",
                 "opencv-python-headless>=4.8", "nbclient>=0.7", "nbformat>=5.7", "ipykernel>=6",
                 "nibabel>=5", "pynrrd>=1.0", "SimpleITK>=2.2", "pillow>=9"],
        "notebooks": ["jupyter", "nbclient>=0.7", "nbformat>=5.7", "ipykernel>=6"],
        "data": ["nibabel>=5", "tifffile>=2023.1", "pynrrd>=1.0", "SimpleITK>=2.2", "pillow>=9"],
    },
    entry_points={"console_scripts": ["minissl=minissl.cli:main"]},
)
