"""One model of the paper's study (Tables 2 and 3), on a chosen recipe.

    python launch.py --config configs/study.py:MODEL[,demo][,tiny] --workdir runs/MODEL

MODEL is one of the seven study models. By default the config is the model's own file,
configs/MODEL.py (configs/default.py for msff_ecomnet), all of them configs/default.py's
recipe with the model name changed, so every model trains with the same recipe.
',demo' takes configs/demo.py's shortened CPU recipe instead; its narrow MSFF widths are
MSFF fields, so the baselines keep their default architecture. ',tiny' sets
`model_overrides` to TINY_OVERRIDES[MODEL] (tests). `msff_jax.analysis.study` runs all seven.
"""

import importlib

import ml_collections

from configs import default, demo

STUDY_MODELS = ("msff_base", "msff_msp", "msff_iasm", "msff_ecomnet",
                "resnet50", "mobilenet_v3_large", "efficientnet_b0")
OPTIONS = ("demo", "tiny")


def get_config(arg: str = "msff_ecomnet") -> ml_collections.ConfigDict:
    model, *options = arg.split(",")
    if model not in STUDY_MODELS:
        raise ValueError(f"configs/study.py: model {model!r} is not one of {STUDY_MODELS}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"configs/study.py: unknown options {unknown}; known: {OPTIONS}")

    if "demo" in options:
        config = demo.get_config()
        if not model.startswith("msff"):
            config.model_overrides = ml_collections.ConfigDict()
    elif model == "msff_ecomnet":
        config = default.get_config()
    else:
        config = importlib.import_module(f"configs.{model}").get_config()
    config.model = model
    if "tiny" in options:
        from msff_jax.models import TINY_OVERRIDES

        config.model_overrides = ml_collections.ConfigDict(TINY_OVERRIDES[model])
    return config
