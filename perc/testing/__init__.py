"""
Helpers for exercising PERC deployments from tests and benchmarks (not used
by the daemons themselves).
"""
