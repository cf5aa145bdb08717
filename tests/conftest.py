import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a short ae run: 4 clips a step, small evaluation
FAST = ["--ae-batch-size", "4", "--eval-clips", "8", "--log-every", "1", "--warmup", "2"]
# and a micro teacher: 16 channels, batch 2, 2 sampling steps
MICRO = ["--unet-channels", "16", "--batch-size", "2", "--sample-steps", "2"]


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with an autoencoder and a teacher trained for two steps each (wiring, not quality)."""
    import train
    out = str(tmp_path_factory.mktemp("run"))
    assert train.main(["--stage", "ae", "--steps", "2", "--out", out, *FAST]) == 0
    assert train.main(["--stage", "teacher", "--steps", "2", "--out", out, *MICRO, *FAST]) == 0
    return out
