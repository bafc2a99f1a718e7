import os

from setuptools import find_packages, setup

# A local version label (PEP 440: 0.1.0+LABEL) for a build that must differ from the last one installed, such as
# the package failover-test's rolling-upgrade scenario deploys (congressctl.deploy.build_wheelhouse sets it).
LOCAL_VERSION = os.environ.get("CONGRESSCTL_LOCAL_VERSION", "")

setup(
    name="congressctl",
    version="0.1.0" + (f"+{LOCAL_VERSION}" if LOCAL_VERSION else ""),
    description="Deploy, run, watch and failure-test a highly available Congress-style policy service",
    packages=find_packages(include=["congressctl", "congressctl.*"]),
    # congressctl/templates is a link to the top-level templates/ folder; wheels carry the files themselves.
    package_data={"congressctl": ["templates/*.j2", "templates/ocf/*", "templates/bin/*", "templates/fence/*",
                                  "templates/faults/*"]},
    python_requires=">=3.11",
    install_requires=[
        "click>=8.1",
        "rich>=13.0",
        "pyyaml>=6.0",
        "jinja2>=3.1",
        "paramiko>=3.4",
        "redis>=5.0",
        "starlette>=0.37",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "packaging>=23.0",
        "uvloop>=0.19",
        "httptools>=0.6",
        "hiredis>=2.0",
        # the nodes' /metrics (issue 16) and the cluster CA and certificates deploy makes (issue 13)
        "prometheus_client>=0.20",
        "cryptography>=42",
    ],
    extras_require={
        # The linters are pinned: a new release's new rules would fail CI on code nobody changed.
        "test": ["pytest>=8.0", "hypothesis>=6.100", "pytest-timeout>=2.3",
                 "ruff==0.17.5", "mypy==2.4.1", "types-PyYAML==6.0.12.20261113", "types-paramiko==5.1.0.20261030",
                 # the unit tests run on two workers (pytest-xdist); the suite drives the nodes with the real
                 # Congress clients and fuzzes the API from its OpenAPI document
                 "pytest-xdist>=3.5", "python-congressclient==2.0.1", "python-openstackclient>=6.0", "schemathesis>=3.30"],
    },
    entry_points={"console_scripts": ["congressctl=congressctl.cli:main"]},
)
