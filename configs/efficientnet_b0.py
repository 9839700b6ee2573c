"""Baseline EfficientNet-B0 (paper Table 3), torchvision's architecture, trained with our recipe.

The recipe of configs/default.py, with the lighter weight decay such networks are
trained with; everything else is shared, so the comparison isolates the architecture.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "efficientnet_b0"
    # As for MobileNetV3: depthwise-heavy networks want lighter weight decay.
    config.optimizer.weight_decay = 1e-5
    return config
