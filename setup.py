"""Installs the CrossMAE transfer benchmark suite: `pip install -e .[test]`."""
from setuptools import find_packages, setup

setup(
    name="crossmae-suite",
    version="0.1.0",
    description="MAE / CrossMAE pretraining and a downstream-transfer benchmark suite "
                "(ViTDet COCO, UperNet ADE20K, iNaturalist 2019, Places365, ImageNet).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["crossmae*", "transfer*", "slurm*", "benchmarks*"]),
    include_package_data=True,
    install_requires=[
        # torch and torchvision are pinned as a pair (torchvision's compiled ops need its torch).
        # With no torch installed pip takes the registry's regular (CUDA) build, which also runs on
        # CPU; torchvision does not import against a CPU-only torch wheel.
        "torch==2.15.0",
        "torchvision==0.29.2",
        # timm's key names and VisionTransformer signature (final_norm, fc_norm) are relied upon.
        "timm==1.0.31",
        "submitit==1.5.4",
        "pycocotools>=2.0.8",
        # crossmae.zoo: hf:// and timm: downloads (hf_hub_download, endpoint read per call)
        "huggingface_hub>=0.24",
        # polygon crop of the COCO LSJ (detectron2/fvcore CropTransform.apply_polygons uses shapely)
        "shapely>=2.0",
        # mmengine's Config (Python configs, _base_, --cfg-options); 0.10.x is the current line.
        "mmengine==0.10.7",
        "tensorboard>=2.14",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "scipy>=1.10",  # sparse products in the leaderboard's COCO bootstrap
        "pillow>=10.0",
        "safetensors>=0.4",
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        # mmsegmentation is the ADE20K parity oracle of every test run (tests/test_ade20k_parity.py,
        # tests/test_ade20k_recipe.py). mmcv-lite is mmcv's pure-Python wheel (no compiled ops, so no
        # compiler and no torch-specific build); the declared dependencies of both are pure Python
        # (prettytable is the only one not already required above). mmseg 1.2.x accepts mmcv < 2.2.
        "test": ["pytest>=8.0", "mmsegmentation==1.2.2", "mmcv-lite==2.1.0"],
        # pure-Python dependencies of a detectron2 source tree, for tests/test_coco_parity.py
        # (DETECTRON2_SRC=<checkout>); detectron2 itself is on no registry and is never installed
        "detectron2-parity": ["fvcore", "iopath", "omegaconf", "hydra-core"],
    },
)
