"""Entry point: `python launch.py --config configs/default.py --workdir DIR [--mode MODE]`.

The flags and modes live in `msff_jax/main.py`; `pip install -e .` also installs this as
the `msff-launch` command.
"""

from msff_jax.main import run

if __name__ == "__main__":
    run()
