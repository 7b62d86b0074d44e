"""Make ``import dvfl`` work when a pipeline is run as a script from a checkout.

``python pipelines/x.py`` puts ``pipelines/`` first on sys.path, where ``profile.py`` would shadow
the standard library's ``profile`` module (torch imports it); swap it for the repository root.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
