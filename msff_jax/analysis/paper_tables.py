"""The figures the MSFF-EComNet paper publishes, kept apart from anything we measure.

Everything here is copied from the paper's Tables 2 and 3 (percent, parameters in
millions) so the report can print it beside our results under a 'paper' heading. Nothing
in this module is a measurement of ours; `msff_jax.analysis.report` must never put these values in
an 'ours' column. The paper's tables have known inconsistencies: its F1 is not the
harmonic mean of its precision and recall, its ResNet-50 count is the 1000-class
(ImageNet) figure, and its MobileNet-V3 and EfficientNet-B0 counts match no canonical
variant.

The paper's "Precision" is defined in its text as the share of all samples predicted
correctly, i.e. top-1 accuracy; our counterpart is `top1` in eval_results.json.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of a paper table. `None` where the paper gives no figure."""

    label: str  # how the paper names the row
    precision: float  # the paper's "Precision" (top-1 accuracy by its definition), %
    recall: float  # %
    f1: float  # %
    params_m: Optional[float] = None  # millions; Table 3 only
    uses_msp_conv: Optional[bool] = None  # Table 2 only
    uses_iasm: Optional[bool] = None  # Table 2 only


# Table 2 (ablation). Row labels are the paper's ("基准模型" is "base model").
ABLATION = {
    "msff_base": PaperRow("base", 82.35, 72.9, 81.7, uses_msp_conv=False, uses_iasm=False),
    "msff_msp": PaperRow("1", 86.42, 74.7, 86.0, uses_msp_conv=True, uses_iasm=False),
    "msff_iasm": PaperRow("2", 85.18, 75.1, 80.8, uses_msp_conv=False, uses_iasm=True),
    "msff_ecomnet": PaperRow(
        "MSFF-EComNet", 89.56, 81.8, 89.14, uses_msp_conv=True, uses_iasm=True
    ),
}

# Table 3 (comparison with mainstream models).
COMPARISON = {
    "resnet50": PaperRow("ResNet-50", 85.12, 80.5, 84.1, params_m=25.56),
    "mobilenet_v3_large": PaperRow("MobileNet-V3", 79.74, 77.8, 78.9, params_m=7.3),
    "efficientnet_b0": PaperRow("EfficientNet-B0", 87.35, 84.4, 86.4, params_m=10.1),
    "msff_ecomnet": PaperRow("MSFF-EComNet", 89.56, 88.1, 88.3, params_m=11.79),
}

ABLATION_MODELS = tuple(ABLATION)
COMPARISON_MODELS = tuple(COMPARISON)
STUDY_MODELS = ("msff_base", "msff_msp", "msff_iasm", "msff_ecomnet",
                "resnet50", "mobilenet_v3_large", "efficientnet_b0")

SOURCE = (
    "MSFF-EComNet paper, Tables 2 and 3 (DeepFashion, 15 categories, PyTorch 1.13, "
    "one RTX 4060 Ti); training recipe not published"
)
