"""Package layout for setuptools (metadata and dependencies live in pyproject.toml).

Two import packages come from one distribution: ``drpose`` (the trainer, from ``drpose/``) and
``drpose_kernels`` (the fused op, from ``kernels/``). The op is not called ``kernels`` on purpose:
that name belongs to another widely installed package that diffusers and transformers probe for.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["drpose", "drpose.*"])
packages += ["drpose_kernels"] + [f"drpose_kernels.{p}" for p in find_packages("kernels")]

setup(
    packages=packages,
    package_dir={"drpose_kernels": "kernels"},
    package_data={"drpose": ["assets/**/*"]},
    include_package_data=False,
)
