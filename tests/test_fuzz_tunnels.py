"""
A short run of the tunnel fuzz targets (``perc bench fuzz`` runs them long):
random and structured streams never raise out of either protocol.
"""

import random

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from perc import fuzz


class TunnelFuzzTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, 2**32))
    def test_structured_streams(self, seed):
        data = fuzz.random_stream(random.Random(seed))
        fuzz.key_distributor_target(data, seed)
        fuzz.media_distributor_target(data, seed)

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=400), st.integers(0, 2**16))
    def test_raw_bytes(self, data, seed):
        fuzz.key_distributor_target(data, seed)
        fuzz.media_distributor_target(data, seed)

    def test_a_real_client_hello_reaches_the_engine(self):
        """The structured streams do exercise the DTLS engine, not only the codec."""
        from perc import wire
        import uuid
        hello = fuzz._fixtures()["hello"]
        stream = (wire.SupportedProfiles(0, (9, 10)).encode()
                  + wire.TunneledDtls(uuid.uuid4(), hello).encode())
        fuzz.key_distributor_target(stream)
