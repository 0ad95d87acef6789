import os
import sys

# tests import the run-time modules from the repository root and the parity checker from tests/
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
