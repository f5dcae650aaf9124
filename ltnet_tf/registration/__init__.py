"""Carrying the atlas's labels onto a scan: rigid + affine alignment (SimpleITK), LT-Net's networks
(G_F, G_B, the discriminator) and losses, warping and label transfer (``transfer``), test-time
refinement, labels pulled onto the scan's own grid (``native``), label fusion of several atlases,
and the set of atlases a prediction uses.

May import: the shared facts and ``ltnet_tf.io``.
"""
