"""One model of the paper's study (Tables 2 and 3), on a chosen recipe.

    python launch.py --config configs/study.py:MODEL[,demo][,tiny] --workdir runs/MODEL

MODEL is one of the seven study models. By default the config is configs/default.py:MODEL,
the same recipe for every model.
',demo' takes configs/demo.py's shortened CPU recipe instead; its narrow MSFF widths are
MSFF fields, so the baselines keep their default architecture. ',tiny' sets
`model_overrides` to TINY_OVERRIDES[MODEL] (tests). `msff_jax.analysis.study` runs all seven.

`msff_base@matched` and `msff_iasm@matched` are the parameter-matched ablations: read
literally, the 3x3 conv unit that replaces MSP-Conv keeps the full model's widths and
gives 2.6-2.7x its parameters, so Table 2 would mix the module's effect with capacity.
The matched variants narrow the stage widths (the conv unit's width) so the total is
within 2% of msff_ecomnet's on the same recipe (MATCHED_STAGE_WIDTHS; checked by
tests/test_study_statistics.py with `count_params`).
"""

import ml_collections

from configs import default, demo

STUDY_MODELS = ("msff_base", "msff_msp", "msff_iasm", "msff_ecomnet",
                "resnet50", "mobilenet_v3_large", "efficientnet_b0")
OPTIONS = ("demo", "tiny")
MATCHED = "@matched"
# recipe -> model -> stage widths; parameters at 15 classes against msff_ecomnet's:
# default 11,764,882 and 11,750,353 vs 11,784,491; demo 88,495 and 88,810 vs 88,443;
# tiny 6,065 and 6,021 vs 6,006.
MATCHED_STAGE_WIDTHS = {
    "default": {"msff_base": (101, 202, 404, 808), "msff_iasm": (100, 200, 400, 800)},
    "demo": {"msff_base": (20, 40, 61, 81), "msff_iasm": (20, 40, 60, 80)},
    "tiny": {"msff_base": (11, 21), "msff_iasm": (10, 21)},
}
MATCHED_MODELS = ("msff_base", "msff_iasm")


def get_config(arg: str = "msff_ecomnet") -> ml_collections.ConfigDict:
    model, *options = arg.split(",")
    matched = model.endswith(MATCHED)
    model = model.removesuffix(MATCHED)
    if matched and model not in MATCHED_MODELS:
        raise ValueError(f"configs/study.py: {model}{MATCHED}: only {MATCHED_MODELS} have "
                         "parameter-matched variants")
    if model not in STUDY_MODELS:
        raise ValueError(f"configs/study.py: model {model!r} is not one of {STUDY_MODELS}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"configs/study.py: unknown options {unknown}; known: {OPTIONS}")

    if "demo" in options:
        config = demo.get_config()
        if not model.startswith("msff"):
            config.model_overrides = ml_collections.ConfigDict()
    else:
        config = default.get_config(model)
    config.model = model
    if "tiny" in options:
        from msff_jax.models import TINY_OVERRIDES

        config.model_overrides = ml_collections.ConfigDict(TINY_OVERRIDES[model])
    if matched:
        recipe = "tiny" if "tiny" in options else "demo" if "demo" in options else "default"
        config.model_overrides.stage_widths = MATCHED_STAGE_WIDTHS[recipe][model]
    return config
