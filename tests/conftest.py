"""Test-wide settings.

Eight simulated CPU devices let the sharding tests run on any machine; the flag must be
set before JAX is first imported, which is why it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
