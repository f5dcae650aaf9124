"""ltnet_tf: one-shot segmentation by learned label transfer (LT-Net, CVPR 2020) on VoxelMorph."""
from ltnet_tf import compat  # noqa: F401  (must run before TensorFlow is imported)

__version__ = "0.1.0"
