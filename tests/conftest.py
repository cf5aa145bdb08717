import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a short ae run: 4 clips a step, small evaluation
FAST = ["--ae-batch-size", "4", "--eval-clips", "8", "--log-every", "1", "--warmup", "2"]
