"""Ablation 1 (paper Table 2): MSP-Conv blocks without IASM attention.

The same recipe as configs/default.py, so the comparison isolates the architecture.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "msff_msp"
    return config
