"""Builds the effvision package."""

from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    namespace: dict = {}
    exec((Path(__file__).parent / 'effvision' / 'version.py').read_text(), namespace)
    return namespace['__version__']


setup(
    name='effvision',
    version=read_version(),
    description='Efficient vision transformers and decoders for dense prediction on OpenMMLab 2.x',
    packages=find_packages(include=['effvision', 'effvision.*']),
    python_requires='>=3.10',
    include_package_data=True,
)
