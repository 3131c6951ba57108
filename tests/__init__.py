"""
The test suite.  Hypothesis judges no test by time here: the machines are
shared, and a slow example draw or a slow example says nothing about
correctness (performance lives in bench/).
"""

from hypothesis import HealthCheck, settings

settings.register_profile("perc", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("perc")
