import os
import sys

# The modules under test live at the repository root, which is not a package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
