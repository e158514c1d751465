"""The project installs as itself and does not impersonate other libraries."""

import importlib.metadata


def test_hub_kernels_library_not_detected():
    # Our top-level `kernels` package must not make transformers think the Hub's `kernels`
    # library is installed (it would then try to use it).
    from transformers.utils import is_kernels_available

    assert is_kernels_available() is False


def test_distribution_installed():
    assert importlib.metadata.version("octo-trainer")


def test_public_names():
    import kernels
    from octo import OctoConfig, OctoForCausalLM

    assert callable(kernels.rms_norm) and callable(kernels.apply_rope)
    assert callable(kernels.cross_entropy) and callable(kernels.linear_cross_entropy)
    assert OctoForCausalLM(OctoConfig.preset("tiny")).num_parameters() > 0
