# A shim for old pips: pip 18.1 (Python 3.6's own) and 20.0.2 (Ubuntu 20.04's) cannot make an
# editable install without it ("setup.py not found"). Everything else is in setup.cfg.
from setuptools import setup

setup()
