"""ltnet-tf: one-shot segmentation by learned label transfer (LT-Net) on VoxelMorph (TensorFlow).

Version pins live here and only here. voxelmorph/neurite 0.2 are the last TensorFlow releases and
need Keras 2: TensorFlow 2.21 with tf-keras 2.21 (``ltnet_tf.compat`` selects it). The
``tensorflow`` wheel runs on CPU and on NVIDIA GPUs (for CUDA libraries from pip, install
``tensorflow[and-cuda]==2.21.0``).
"""
from setuptools import find_packages, setup

setup(
    name="ltnet-tf",
    version="0.1.0",
    description="LT-Net one-shot segmentation by learned label transfer, on VoxelMorph (TF/Keras 2)",
    license="Apache-2.0",
    packages=find_packages(include=["ltnet_tf", "ltnet_tf.*"]),
    python_requires=">=3.9,<3.14",
    install_requires=[
        "tensorflow==2.21.0",
        "tf-keras==2.21.0",
        "tensorboard==2.21.0",
        "voxelmorph==0.2",
        "neurite==0.2",
        "nibabel>=5.0",
        "numpy>=1.23",
        "scipy>=1.9",
        "absl-py>=1.0",
        "matplotlib>=3.5",
        "SimpleITK>=2.3",
    ],
    extras_require={
        # The tests run deepbet's real networks on a synthetic head (the heads extra).
        "test": ["pytest>=7", "pytest-xdist>=3.5", "tensorflow-serving-api==2.21.0",
                 "deepbet==1.0.2", "torch==2.13.0"],
        # The benchmarks' anchors (ANTs SyN, ConvexAdam on the CPU build of PyTorch); the package
        # itself does not need them.
        "bench": ["antspyx==0.6.3", "convexAdam==0.2.0", "torch==2.13.0"],
        # Brain extraction of whole heads (predict.py --skull_strip): deepbet's networks run in
        # PyTorch; its CPU build is enough (the U-Net runs once per head).
        "heads": ["deepbet==1.0.2", "torch==2.13.0"],
    },
    entry_points={
        "console_scripts": [
            "ltnet-train=ltnet_tf.commands.cli:train_entry",
            "ltnet-predict=ltnet_tf.commands.cli:predict_entry",
            "ltnet-export=ltnet_tf.commands.cli:export_entry",
            "ltnet-merge=ltnet_tf.prediction.merge:entry",
            "ltnet-demo=ltnet_tf.commands.demo:entry",
        ],
    },
)
