"""Fixtures shared by the tests: command-line flags for micro runs, and a micro run folder."""
import pytest

import train


@pytest.fixture(scope="session")
def fast_args():
    """A short run: 4 clips a step for the autoencoder, a small evaluation, a log record every step."""
    return ["--ae-batch-size", "4", "--eval-clips", "8", "--log-every", "1", "--warmup", "2"]


@pytest.fixture(scope="session")
def micro_args():
    """A micro video model: 16 channels, batch 2, 2 sampling steps."""
    return ["--unet-channels", "16", "--batch-size", "2", "--sample-steps", "2"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fast_args, micro_args):
    """A run folder with an autoencoder and a teacher trained for two steps each (wiring, not quality)."""
    out = str(tmp_path_factory.mktemp("run"))
    assert train.main(["--stage", "ae", "--steps", "2", "--out", out, *fast_args]) == 0
    assert train.main(["--stage", "teacher", "--steps", "2", "--out", out, *micro_args, *fast_args]) == 0
    return out
