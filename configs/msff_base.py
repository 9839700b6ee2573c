"""Ablation 'base' (paper Table 2): the MSFF-EComNet backbone with every MSP-Conv replaced by one 3x3 conv unit of the same width, and no IASM.

The same recipe as configs/default.py, so the comparison isolates the architecture.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "msff_base"
    return config
