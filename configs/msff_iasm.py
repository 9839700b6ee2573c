"""Ablation 2 (paper Table 2): the base backbone plus IASM attention, without MSP-Conv.

The same recipe as configs/default.py, so the comparison isolates the architecture.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "msff_iasm"
    return config
