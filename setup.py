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
    install_requires=[
        "Twisted>=24.3",
        "pyOpenSSL>=26.0",  # public DTLS cookie callbacks with the cookie length checked (CVE-2026-27459)
        "service-identity>=24.1",
        "pylibsrtp>=0.10",
        "zope.interface>=6.0",
        "cryptography>=44",
        "prometheus-client>=0.20",
    ],
    # imageio-ffmpeg: an ffmpeg (libx264, libopus) for the RTP bridge tests and
    # perc demo --media video.
    extras_require={"test": ["hypothesis>=6.100", "imageio-ffmpeg>=0.5"],
                    # perc bench fuzz: coverage-guided fuzzing and its line coverage.
                    "fuzz": ["atheris>=2.3", "coverage>=7.0"]},
    entry_points={"console_scripts": ["perc = perc.scripts.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Conferencing",
    ],
)
