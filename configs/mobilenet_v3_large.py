"""Baseline MobileNetV3-Large (paper Table 3), torchvision's architecture, trained with our recipe.

The recipe of configs/default.py, with the lighter weight decay such networks are
trained with; everything else is shared, so the comparison isolates the architecture.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "mobilenet_v3_large"
    # Depthwise convolutions have few weights each; decaying them as hard as dense
    # kernels slows learning (the MobileNetV3 paper uses 1e-5).
    config.optimizer.weight_decay = 1e-5
    return config
