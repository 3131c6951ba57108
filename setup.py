import re

from setuptools import find_packages, setup


def read_version():
    """perc/__init__.py's ``__version__``, read without importing perc (its dependencies)."""
    with open("perc/__init__.py", encoding="utf-8") as source:
        return re.search(r'^__version__ = "([^"]+)"$', source.read(), re.MULTILINE).group(1)


setup(
    name="perc",
    version=read_version(),
    description=(
        "PERC key exchange: the DTLS tunnel between a Media Distributor and a "
        "Key Distributor (RFC 9185), with Twisted daemons and a reference endpoint"
    ),
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.11",
    # package_dir maps the root explicitly so that an editable install puts the
    # checkout itself on sys.path (a static .pth): Twisted finds plugins by
    # scanning sys.path for twisted/plugins directories, which an import-hook
    # editable install would hide.
    package_dir={"": "."},
    packages=find_packages(include=["perc", "perc.*"]) + ["twisted.plugins"],
    # twisted/plugins has no __init__.py (it would shadow Twisted's own
    # package); the plugin module is shipped as package data so that a plain
    # install drops it into site-packages/twisted/plugins.
    package_data={"twisted.plugins": ["perc_plugins.py"], "perc": ["py.typed"]},
    include_package_data=False,
    # The minimums are what .ci/run tests (a second venv with each one pinned).
    install_requires=[
        # 25.5: Site(parsePOSTFormSubmission=); 26.10: twistd exits 1 on a usage error.
        "Twisted>=26.10",
        # 26.0: public DTLS cookie callbacks with the cookie length checked
        # (CVE-2026-27459); 26.2: Connection.set_options, which tests/test_tls.py reads.
        "pyOpenSSL>=26.2",
        "service-identity>=24.2",  # 24.1 calls X509.get_extension, gone from pyOpenSSL 26
        "pylibsrtp>=1.0",  # the MD's in-place batch protect needs 1.0's libsrtp binding constants
        "zope.interface>=8.0",  # Twisted 26.10 needs it
        "cryptography>=46",  # pyOpenSSL 26.2 needs it
        "prometheus-client>=0.20",
    ],
    # imageio-ffmpeg: an ffmpeg (libx264, libopus) for the RTP bridge tests and
    # perc demo --media video; before 0.8 its ffmpeg fails the bridge test.
    # postgresql: perc-kd --db postgresql://... (psycopg 3.2+: notifies(timeout=);
    # 3.2.0 itself names a psycopg-binary that was never released).
    extras_require={"postgresql": ["psycopg[binary]>=3.2.1"],
                    "test": ["hypothesis>=6.100", "imageio-ffmpeg>=0.8", "psycopg[binary]>=3.2.1"],
                    # perc bench fuzz: coverage-guided fuzzing and its line coverage.
                    "fuzz": ["atheris>=2.3", "coverage>=7.0"],
                    # perc bench scale: its PNG plots (3.6: the first with Python 3.11 wheels).
                    "bench": ["matplotlib>=3.6"],
                    # .ci/run's checks (pyproject.toml), pinned so that a new
                    # release's rules cannot fail a commit that did not change.
                    "lint": ["ruff==0.17.6", "mypy==2.4.1", "mypy-zope==1.0.17"]},
    entry_points={"console_scripts": ["perc = perc.scripts.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Conferencing",
    ],
)
