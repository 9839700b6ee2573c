"""Test-wide settings.

Eight simulated CPU devices let the sharding tests run on any machine; the flag must be
set before JAX is first imported, which is why it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests are written for the CPU (simulated devices, float tolerances); on a GPU host
# they still run there unless JAX_PLATFORMS says otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# PyTorch (for the torchvision equivalence and peer-benchmark tests) must be loaded
# before TensorFlow: triton's native library, which torch._dynamo loads, crashes the
# process with a segmentation fault when TensorFlow's is already loaded (seen with
# tensorflow-cpu 2.21 and torch 2.14.1). Loading it first here fixes the order for the
# whole session. Without torch installed the torch tests fail on their own imports.
try:
    import torch  # noqa: E402,F401
    import torch._dynamo  # noqa: E402,F401
except ImportError:
    pass

# Start JAX's CPU backend now, with the eight devices: tests that set XLA_FLAGS for
# their subprocesses (monkeypatch.setenv) would otherwise decide the device count of
# this process too when they happen to run first. (JAX's CUDA plugin, installed for
# --mode plan, is imported as every program imports it: without its driver notices.)
from msff_jax import cuda_plugin  # noqa: E402

cuda_plugin.quiet_start()
import jax  # noqa: E402

assert jax.device_count() == 8, "XLA_FLAGS from the environment overrides the 8 simulated devices"

# Files with a minute or more of tests on the 2-core machine, longest first. They run
# first, so that under `-n 2 --dist loadfile` (the README's command) no long file starts
# last and runs alone while the other worker idles; the order within each file, and of
# the other files, is kept.
LONG_FILES_FIRST = (
    "test_workdir_lock.py", "test_resume.py", "test_distributed_preemption.py",
    "test_gpu_scripts.py", "test_digits.py", "test_study.py", "test_flat_update.py",
    "test_speed_options.py", "test_batch_norm.py", "test_train_steps.py",
    "test_checkpoint_files.py", "test_plan.py", "test_distributed.py", "test_console.py",
    "test_catalogue_training.py", "test_save_failures.py", "test_benchmark.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
