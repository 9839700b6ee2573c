"""Baseline ResNet-50 (paper Table 3), torchvision's architecture, trained with our recipe.

The same recipe as configs/default.py, so the comparison isolates the architecture.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet50"
    # Optional: torchvision ImageNet weights converted to .safetensors; fine-tuning then
    # wants a smaller peak, e.g. --config.optimizer.base_learning_rate=0.01.
    config.pretrained_path = ""
    return config
