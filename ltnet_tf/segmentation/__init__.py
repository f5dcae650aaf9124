"""A segmentation network trained from what the label transfer produces: a 3D U-Net (``network``),
the labelled examples it learns from — synthesised from the atlas warped by the product's
registrations with other scans' appearance, and pseudo-labelled scans (``synthesis``) — its
fitting (``fitting``), the trained segmenter on the atlas grid and on a scan's own grid, its files
in the run folder (``segmenter``) and its own SavedModel for TF Serving (``export``).

May import: the shared facts, ``io``, ``registration``, ``reporting``, ``serving`` and
``training``; only ``prediction`` and ``commands`` import it.
"""
