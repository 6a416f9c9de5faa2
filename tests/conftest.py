import os

from hypothesis import HealthCheck, settings

# CI runs on 2 shared cores: no per-example deadline, a fixed number of examples.
settings.register_profile(
    "ci", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, max_examples=15)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
